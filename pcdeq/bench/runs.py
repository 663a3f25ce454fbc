"""Whole runs against the reference implementation's script: wall time and peak memory of a short linear MNIST
training run, as processes, interleaved in pairs; and the import time of the model API (issue 10).

    python -m pcdeq.bench.runs --reference /path/to/authors/pcdeq --data-dir /path/with/MNIST/raw --pairs 3

Ours: ``train.py model=pcdeq_linear dataset=mnist trainer.max_epochs=E`` (the pcDEQ protocol otherwise). The
reference: its ``train_mnist.py -net linear_pcdeq_1 -activ tanh -epochs E`` with the same learning rate, weight
decay and batch size, run unchanged from a scratch directory in which ``MNIST`` links to the data (its loader reads
``./MNIST``; the files are found, so nothing is downloaded). Both train and test once per epoch. Peak memory is each
process's maximum resident set size (``os.wait4``), children such as data-loader workers not included.
Without ``--reference`` only our runs and the import times are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd``; returns (wall seconds, peak RSS in MiB). Raises on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"[bench_runs] {' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def import_time(module: str, repeats: int = 5) -> float:
    """Median wall time of ``python -c 'import <module>'`` in a fresh process (seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = [timed([sys.executable, "-c", f"import {module}"], ROOT, env)[0] for _ in range(repeats)]
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, help="a checkout of the authors' pcdeq repository")
    ap.add_argument("--data-dir", type=Path, required=True, help="folder holding MNIST/raw")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both (OMP_NUM_THREADS)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "runs.json")
    args = ap.parse_args(argv)
    if not (args.data_dir / "MNIST" / "raw").is_dir():
        raise SystemExit(f"[bench_runs] no MNIST/raw under {args.data_dir}; pass --data-dir with the MNIST files")
    if args.reference is not None and not (args.reference / "train_mnist.py").is_file():
        raise SystemExit(f"[bench_runs] {args.reference} has no train_mnist.py; pass the authors' repository")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    scratch = Path(tempfile.mkdtemp(prefix="pcdeq-bench-runs-"))
    (scratch / "MNIST").symlink_to((args.data_dir / "MNIST").resolve())
    ours = [sys.executable, str(ROOT / "train.py"), "model=pcdeq_linear", "dataset=mnist",
            f"trainer.max_epochs={args.epochs}", f"num_threads={args.threads}", f"paths.data_dir={args.data_dir}",
            "dataset.download=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={scratch}/ours"]
    ref = None
    if args.reference is not None:
        ref = [sys.executable, str(args.reference / "train_mnist.py"), "-net", "linear_pcdeq_1", "-activ", "tanh",
               "-lr", "5e-4", "-epochs", str(args.epochs), "-wd", "1.5e-2", "-b", "64", "-m", "30"]
    rows: dict[str, list[tuple[float, float]]] = {"ours": [], "reference": []}
    for k in range(args.pairs):
        rows["ours"].append(timed(ours, ROOT, env))
        print(f"[bench_runs] pair {k + 1}: ours {rows['ours'][-1][0]:.1f} s, {rows['ours'][-1][1]:.0f} MiB", flush=True)
        if ref is not None:
            rows["reference"].append(timed(ref, scratch, env))
            print(f"[bench_runs] pair {k + 1}: reference {rows['reference'][-1][0]:.1f} s, "
                  f"{rows['reference'][-1][1]:.0f} MiB", flush=True)
    imports = {m: import_time(m) for m in ("torch", "pcdeq", "lightning")}
    summary: dict[str, object] = {"epochs": args.epochs, "pairs": args.pairs, "threads": args.threads,
                                  "command_ours": " ".join(ours[1:]), "import_s": imports}
    print(f"\n{'run':<10} {'wall s (median)':>16} {'peak MiB (max)':>15}")
    for name, vals in rows.items():
        if vals:
            wall, mem = statistics.median(v[0] for v in vals), max(v[1] for v in vals)
            summary[name] = {"wall_s": [v[0] for v in vals], "peak_mib": [v[1] for v in vals]}
            print(f"{name:<10} {wall:>16.1f} {mem:>15.0f}")
    if rows["reference"]:
        ratios = [r[0] / o[0] for o, r in zip(rows["ours"], rows["reference"], strict=True)]
        summary["wall_ratio_ref_over_ours"] = statistics.median(ratios)
        print(f"\nwall time, reference / ours (median of pairs): {statistics.median(ratios):.2f}x")
    print("import (s, median of 5 fresh processes): " + ", ".join(f"{m} {t:.2f}" for m, t in imports.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
