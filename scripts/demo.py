"""`make demo`: train pcDEQ-1 (tanh) and pcDEQ-2 (sigmoid) on the embedded digits and print a table.

Runs the real CLI (train.py) once per activation, offline, then reads each run's results.json.
Extra arguments are passed to every run, e.g. `python scripts/demo.py trainer.max_epochs=5`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("pcDEQ-1", "tanh"), ("pcDEQ-2", "sigmoid")]


def main(extra: list[str]) -> int:
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    rows = []
    for label, act in RUNS:
        run_dir = ROOT / "logs" / "demo" / stamp / act
        cmd = [sys.executable, str(ROOT / "train.py"), "model=pcdeq_conv", "dataset=digits",
               f"model.activation={act}", f"hydra.run.dir={run_dir}", "trainer.enable_model_summary=false", *extra]
        print(f"[demo] {label} ({act}): {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
        if proc.returncode != 0:
            print(f"[demo] {label} failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
        res = json.loads((run_dir / "results.json").read_text())
        rows.append((label, act, res, time.perf_counter() - t0))
    print()
    print(f"{'model':<9} {'activation':<10} {'params':>7} {'test acc':>9} {'fwd it':>7} {'bwd it':>7} "
          f"{'s/epoch':>8} {'total s':>8}")
    for label, act, r, wall in rows:
        print(f"{label:<9} {act:<10} {r['num_params']:>7,} {100 * r['test/acc']:>8.2f}% {r['fwd_iters']:>7.1f} "
              f"{r['bwd_iters']:>7.1f} {r['epoch_time_s']:>8.2f} {wall:>8.1f}")
    print(f"\nruns: {ROOT / 'logs' / 'demo' / stamp}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
