"""Train the same run twice, every optimisation on (the defaults) and every one off (pcdeq.perf.PLAIN), and print
the accuracies side by side: the performance switches must not move accuracy beyond seed noise (issue 10).

    python -m pcdeq.bench.switches                                # digits, pcDEQ-1 single conv, seed 0
    python -m pcdeq.bench.switches model=pcdeq_linear dataset=mnist trainer.max_epochs=1 num_threads=1

Arguments are train.py overrides shared by both runs; each run's results.json is read back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pcdeq.bench.setup import ROOT
from pcdeq.perf import plain_overrides

DEFAULTS = ["model=pcdeq_conv", "dataset=digits", "seed=0"]


def run(name: str, overrides: list[str], out: Path) -> dict:
    """One train.py run in ``out/name``; returns its results.json."""
    run_dir = out / name
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
           "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false"]
    print(f"[check] {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[check] the {name} run failed with exit code {proc.returncode}")
    res = json.loads((run_dir / "results.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    bad = [a for a in args if a.startswith("-") or ("=" not in a and not a.startswith("~"))]
    if bad:
        print(f"[check] not a train.py override: {' '.join(bad)}; pass key=value overrides (see --help)",
              file=sys.stderr)
        return 2
    shared = DEFAULTS + args  # later overrides win
    out = ROOT / "logs" / "check_switches" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    fast = run("optimised", shared, out)
    plain = run("plain", shared + plain_overrides(), out)
    print(f"\nshared overrides: {' '.join(shared)}\nplain overrides: {' '.join(plain_overrides())}\n")
    print(f"{'path':<10} {'test acc':>9} {'fwd it':>7} {'bwd it':>7} {'s/epoch':>8} {'wall s':>7}")
    for name, r in (("optimised", fast), ("plain", plain)):
        print(f"{name:<10} {100 * r['test/acc']:>8.2f}% {r['fwd_iters']:>7.1f} {r['bwd_iters']:>7.1f} "
              f"{r['epoch_time_s']:>8.2f} {r['wall_s']:>7.1f}")
    diff = 100 * (fast["test/acc"] - plain["test/acc"])
    print(f"\naccuracy difference (optimised - plain): {diff:+.2f} points; epoch time ratio plain/optimised: "
          f"{plain['epoch_time_s'] / fast['epoch_time_s']:.2f}x\nruns: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
