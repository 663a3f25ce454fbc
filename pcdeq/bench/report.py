"""The printed tables of a benchmark run, and its JSON made strict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant figures, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with a title line."""
    cells = [list(headers)] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines) + "\n"


def iters_cell(fwd: Any, bwd: Any) -> str:
    """Forward/backward iterations as "f/b"."""
    return f"{fmt(fwd)}/{fmt(bwd)}"


def steps_table(archs: dict[str, Any], device: str) -> str:
    """Times, iterations, throughput and memory of the default path."""
    rows = []
    for name, r in archs.items():
        b = r["variants"]["best"]
        mem = b["peak_cuda_mb"] if b.get("peak_cuda_mb") is not None else b["saved_for_backward_mb"]
        rows.append([name, r["batch"], r["repeats"], b["train_ms"], b["eval_ms"], iters_cell(b["fwd_iters"],
                     b["bwd_iters"]), b["eval_fwd_iters"], iters_cell(b.get("syncs_train"), b.get("syncs_eval")),
                     b["train_samples_per_s"], b["eval_samples_per_s"], mem])
    mem_label = "peak MB" if device.startswith("cuda") else "saved MB"
    return table("Steps (default path; medians; iterations f/b of the training step, f of evaluation; host syncs "
                 "of one training / evaluation step)",
                 ["arch", "batch", "reps", "train ms", "eval ms", "iters f/b", "eval f", "syncs t/e", "train sps",
                  "eval sps", mem_label], rows)


def floor_table(archs: dict[str, Any]) -> str:
    """Compute floors and the default path's step / floor ratios."""
    rows = [[name, r["floor"]["unit"], "+".join(fmt(u) for u in r["floor"]["unit_ms_per_block"]),
             r["floor"]["train_floor_ms"], r["floor"]["train_ratio"], r["floor"]["eval_floor_ms"],
             r["floor"]["eval_ratio"]] for name, r in archs.items()]
    return table("Compute floor = t_unit x (iterations + 1), summed over blocks",
                 ["arch", "unit", "t_unit ms", "train floor ms", "train/floor", "eval floor ms", "eval/floor"], rows)


def report(results: dict[str, Any]) -> str:
    """The printed tables."""
    archs = results["archs"]
    out = [steps_table(archs, results["meta"]["device"]), floor_table(archs)] if archs else []
    rows = [[name, r["variants"]["plain"]["train_ms"], r["variants"]["best"]["train_ms"], p["train_ratio"],
             p["train_ratio_paired"], r["variants"]["plain"]["eval_ms"], r["variants"]["best"]["eval_ms"],
             p["eval_ratio"], p["eval_ratio_paired"]]
            for name, r in archs.items() if (p := r["plain_vs_best"])]
    if rows:
        out.append(table("Plain switches vs best (ratio of medians; median of paired ratios)",
                         ["arch", "plain train ms", "best train ms", "plain/best", "paired", "plain eval ms",
                          "best eval ms", "plain/best", "paired"], rows))
    rows = [[name, r["variants"]["switched"]["train_ms"], r["variants"]["best"]["train_ms"], p["train_ratio"],
             p["train_ratio_paired"], r["variants"]["switched"]["eval_ms"], r["variants"]["best"]["eval_ms"],
             p["eval_ratio"], p["eval_ratio_paired"], iters_cell(r["variants"]["switched"]["fwd_iters"],
                                                                r["variants"]["switched"]["bwd_iters"])]
            for name, r in archs.items() if (p := r.get("switched_vs_best"))]
    if rows:
        changes = " ".join(f"{k}={v}" for k, v in next(r["switch"] for r in archs.values() if r.get("switch")).items())
        out.append(table(f"Switched ({changes}) vs best (ratio of medians; median of paired ratios)",
                         ["arch", "switched train ms", "best train ms", "switched/best", "paired",
                          "switched eval ms", "best eval ms", "switched/best", "paired", "iters f/b"], rows))
    rows = []
    for name, r in archs.items():
        if not (c := r["reference"]):
            continue
        ref, best = r["variants"]["reference"], r["variants"]["best"]
        rows.append([name, ref["train_ms"], best["train_ms"], c["train_ratio"], c["train_ratio_paired"],
                     ref["eval_ms"], best["eval_ms"], c["eval_ratio"], c["eval_ratio_paired"],
                     iters_cell(ref["fwd_iters"], ref["bwd_iters"]), f"{c['max_fixed_point_diff']:.1e}",
                     f"{c['grad_rel_err']:.1e}", "ok" if c["passed"] else "FAILED"])
    if rows:
        out.append(table("Reference implementation vs ours (reference evaluated with grad enabled, as-is)",
                         ["arch", "ref train ms", "ours", "ref/ours", "paired", "ref eval ms", "ours", "ref/ours",
                          "paired", "ref iters f/b", "max|dz|", "grad rel err", "check"], rows))
    if results.get("memory"):
        out.append(memory_table(results["memory"]))
    if results.get("epoch"):
        rows = [[name, e["batches"], e["epoch_s"], e["bare_epoch_s"], e["overhead_pct"], e["minimal_epoch_s"],
                 e["lightning_floor_pct"], e["module_pct"], e["in_batch_s"], e["steps_s"],
                 iters_cell(e["train_fwd_iters"], e["train_bwd_iters"])]
                for name, e in results["epoch"].items()]
        out.append(table("Lightning epoch vs the same epoch as a bare loop and through a minimal LightningModule "
                         "(second of two; medians)",
                         ["arch", "batches", "epoch s", "bare s", "overhead %", "minimal s", "Lightning %",
                          "module %", "in-batch s", "fixed-step sum s", "iters f/b"], rows))
    grouped: dict[str, list[str]] = {}
    for name, r in archs.items():
        for note in r["notes"]:
            grouped.setdefault(note, []).append(name)
    notes = [f"{note}: {', '.join(names)}" for note, names in grouped.items()] + results.get("skipped", [])
    if notes:
        out.append("Notes\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(out)


def memory_table(memory: dict[str, Any]) -> str:
    """The two memory series side by side."""
    cuda = memory["implicit"][0]["peak_cuda_mb"] is not None
    rows = []
    for imp, unr in zip(memory["implicit"], memory["unrolled"], strict=True):
        row = [imp["iters"], imp["saved_for_backward_mb"], unr["saved_for_backward_mb"]]
        row += [imp["peak_cuda_mb"], unr["peak_cuda_mb"]] if cuda else [imp["peak_rss_growth_mb"],
                                                                       unr["peak_rss_growth_mb"]]
        rows.append(row)
    kind = "peak CUDA MB" if cuda else "peak RSS growth MB"
    return table(f"Training-step memory, {memory['arch']}, iterations forced (tol 0): implicit vs unrolled backward",
                 ["iters", "saved MB implicit", "saved MB unrolled", f"{kind} implicit", f"{kind} unrolled"], rows)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


