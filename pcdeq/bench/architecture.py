"""One architecture: its variants (default, plain, switched, reference) timed together, with their floor."""

from __future__ import annotations

import argparse
import statistics
from types import ModuleType
from typing import Any

import torch

from pcdeq.bench.floor import floor_ops, floor_summary
from pcdeq.bench.reference import reference_variant
from pcdeq.bench.setup import Arch, build_ours, make_setup, progress
from pcdeq.bench.timing import Variant, median_ms, our_variant, time_evaluation, time_training


def variant_summary(v: Variant, batch: int) -> dict[str, Any]:
    """Times, iterations, throughput and memory of one variant."""
    train_ms, eval_ms = median_ms(v.train_times), median_ms(v.eval_times)
    fwd, bwd = v.train_iters.get("forward", []), v.train_iters.get("backward", [])
    return {
        "train_ms": train_ms, "eval_ms": eval_ms, "train_ms_all": [t * 1e3 for t in v.train_times],
        "eval_ms_all": [t * 1e3 for t in v.eval_times],
        "train_samples_per_s": batch / train_ms * 1e3, "eval_samples_per_s": batch / eval_ms * 1e3,
        "fwd_iters": statistics.mean(fwd) if fwd else None, "bwd_iters": statistics.mean(bwd) if bwd else None,
        "eval_fwd_iters": statistics.mean(v.eval_iters) if v.eval_iters else None,
        "fwd_iters_per_block": fwd, "bwd_iters_per_block": bwd, "eval_fwd_iters_per_block": v.eval_iters,
        **v.stats,
    }


def ratios(num: Variant, den: Variant) -> dict[str, float]:
    """num/den for training and evaluation: ratio of the medians, and the median of per-repetition ratios."""
    out = {}
    for phase in ("train", "eval"):
        a, b = getattr(num, f"{phase}_times"), getattr(den, f"{phase}_times")
        out[f"{phase}_ratio"] = statistics.median(a) / statistics.median(b)
        out[f"{phase}_ratio_paired"] = statistics.median(x / y for x, y in zip(a, b, strict=True))
    return out


def bench_arch(arch: Arch, args: argparse.Namespace, device: torch.device,
               networks: ModuleType | None) -> dict[str, Any]:
    """Every measurement of one architecture (see the module docstring)."""
    repeats = args.repeats or arch.repeats
    warmup = args.warmup or arch.warmup
    setup = make_setup(arch, args, device)
    best = our_variant("best", build_ours(setup).to(device), setup)
    variants, notes = [best], []
    if args.plain:
        plain = our_variant("plain", build_ours(setup, plain=True).to(device), setup)
        plain.model.load_state_dict(best.model.state_dict())
        variants.append(plain)
    if args.switch:
        switched = our_variant("switched", build_ours(setup, **args.switch).to(device), setup)
        switched.model.load_state_dict(best.model.state_dict())
        variants.append(switched)
    check = None
    if networks is not None and arch.family == "pcdeq":
        ref, check = reference_variant(networks, setup, best)
        variants.append(ref)
        progress(f"{arch.name}: reference check |dz| {check['max_fixed_point_diff']:.2e}, "
                 f"grad rel err {check['grad_rel_err']:.2e} ({'ok' if check['passed'] else 'FAILED'})")
    elif networks is not None:
        notes.append("reference: the authors' implementation has pcDEQ networks only")
    progress(f"{arch.name}: batch {setup.batch}, channels {setup.config['model']['channels']}, "
             f"{warmup} warm-up + {repeats} timed repetitions of {', '.join(v.name for v in variants)}")
    unit, ops = floor_ops(best)
    floor_times = time_training(variants, ops, repeats, warmup, device)
    time_evaluation(variants, repeats, warmup, device)
    by_name = {v.name: v for v in variants}
    result: dict[str, Any] = {
        "family": arch.family, "arch": arch.arch, "dataset": arch.dataset, "batch": setup.batch,
        "channels": setup.config["model"]["channels"], "repeats": repeats, "warmup": warmup,
        "variants": {v.name: variant_summary(v, setup.batch) for v in variants},
        "floor": floor_summary(unit, floor_times, best), "notes": notes,
        "plain_vs_best": ratios(by_name["plain"], best) if "plain" in by_name else None,
        "switch": dict(args.switch) or None,
        "switched_vs_best": ratios(by_name["switched"], best) if "switched" in by_name else None,
        "reference": None,
    }
    if "reference" in by_name:
        result["reference"] = {**ratios(by_name["reference"], best), **(check or {}),
                               "eval_mode": "reference: gradients enabled (as its scripts); ours: inference_mode"}
    return result


