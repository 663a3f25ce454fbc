"""``make gpu-check``: the prepared check for the first GPU at hand (issue 21), in one command, under 8 minutes.

Stages, each a subprocess with its own time limit (a stage that runs over is recorded as such, the rest go on):

1. ``tests``: the tests that need the device (``tests/test_device.py``: forward and backward of every family on
   the device against the CPU, a float64 gradient check there, the solver's syncs under CUDA's sync debug mode).
2. ``bench``: ``python -m pcdeq.bench --device D --plain`` over the paper architectures (with ``--reference PATH``
   the authors' implementation beside ours, ratios in the same run); peak GPU memory is in its steps table.
3. ``switches``: each speed switch against the default on the pcDEQ architectures, interleaved in one run each
   (``solver.precision=mixed``: bfloat16 iterations with a float32 polish; ``solver.compile``;
   ``model.channels_last=false``), and a whole run with ``--tf32`` (compare its times with stage 2's).
4. ``epochs``: one real epoch per MNIST architecture through ``train.py trainer=gpu`` (``dataset.synthetic=true``
   where MNIST is not under ``--data-dir``), its s / epoch read back from results.json.

Each stage writes ``<out>/gpu_<stage>.txt`` whose first lines are the command, the stage's own command and the
device. ``--device cpu`` runs every stage on the CPU (``make gpu-check DEVICE=cpu``: the script proven end to end;
``--quick`` keeps that short), writing under ``logs/gpu_check/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcdeq.bench.cli import cpu_name, git_commit
from pcdeq.bench.setup import ROOT

MNIST_EXPERIMENTS = ("pcdeq_linear_mnist", "pcdeq_conv_mnist", "pcdeq_multiconv_mnist", "mondeq_fc_mnist",
                     "mondeq_conv_mnist", "mondeq_multitier_mnist")
SWITCH_RUNS = (("switch_precision", ["--switch", "precision=mixed"]),
               ("switch_channels_last", ["--switch", "model.channels_last=false"]),
               ("tf32", ["--tf32"]), ("switch_compile", ["--switch", "compile=true"]))
BUDGET_S = 8 * 60  # the whole check; stages that would start after it are skipped and recorded
QUICK_BENCH = ["--quick", "--width-scale", "0.1", "--batch", "8"]


@dataclass
class Stage:
    """The subprocesses of one part of the check; ``timeout_s`` bounds all of them together."""

    name: str
    commands: list[list[str]]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)


def device_line(device: str) -> str:
    """The device, torch and commit, for the first lines of every output file."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        what = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = f"{cpu_name()} ({os.cpu_count()} cores)"
    return (f"# device: {device}: {what}; torch {torch.__version__}; commit {git_commit()}; "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


def mnist_on_disk(data_dir: Path) -> bool:
    """Whether torchvision's MNIST files are under ``data_dir`` (``MNIST/raw``)."""
    return (data_dir / "MNIST" / "raw").is_dir() and any((data_dir / "MNIST" / "raw").iterdir())


def stages(args: argparse.Namespace, out: Path) -> list[Stage]:
    """The stages of the check for the parsed command line."""
    py = sys.executable
    quick = QUICK_BENCH if args.quick else []
    bench = [py, "-m", "pcdeq.bench", "--device", args.device, *quick]
    reference = ["--reference", str(args.reference)] if args.reference else []
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"]
    result = [
        Stage("tests", [tests], 60, {"PCDEQ_TEST_DEVICE": args.device}),
        Stage("bench", [[*bench, "--plain", *reference, "--json", str(out / "gpu_bench.json")]], 120),
        # compile last: its compilation is the slowest part, and what the budget cuts first
        Stage("switches", [[*bench, "--archs", "pcdeq", *flags, "--json", str(out / f"gpu_{name}.json")]
                           for name, flags in SWITCH_RUNS], 150),
    ]
    synthetic = not mnist_on_disk(args.data_dir)
    epochs = []
    for exp in MNIST_EXPERIMENTS:
        cmd = [py, "train.py", f"experiment={exp}", "trainer.max_epochs=1", "logger=none",
               f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}", f"paths.data_dir={args.data_dir}",
               "dataset.download=false", "trainer.enable_progress_bar=false", "test_every_epoch=false",
               f"hydra.run.dir={out / 'gpu_epochs' / exp}"]
        if synthetic:
            cmd.append("dataset.synthetic=true")
        if args.quick:
            cmd += ["trainer.limit_train_batches=2", "trainer.limit_test_batches=2", "dataset.synthetic_size=[64,32]"]
        epochs.append(cmd)
    result.append(Stage("epochs", epochs, 150, {"WANDB_MODE": "disabled"}))
    return result


def epoch_summary(out: Path) -> str:
    """s / epoch and accuracy of each training run of the ``epochs`` stage."""
    lines = [f"{'experiment':<26} {'status':<10} {'s/epoch':>8} {'test acc':>9} {'fwd it':>7} {'bwd it':>7}"]
    for exp in MNIST_EXPERIMENTS:
        path = out / "gpu_epochs" / exp / "results.json"
        if not path.is_file():
            lines.append(f"{exp:<26} {'no result':<10}")
            continue
        r = json.loads(path.read_text())
        epoch = r.get("epoch_time_s")
        acc, fwd, bwd = r.get("test/acc"), r.get("fwd_iters"), r.get("bwd_iters")
        lines.append(f"{exp:<26} {r.get('status', '?'):<10} {epoch if epoch is None else f'{epoch:8.2f}':>8} "
                     f"{'-' if acc is None else f'{100 * acc:8.2f}%':>9} {'-' if fwd is None else f'{fwd:7.1f}':>7} "
                     f"{'-' if bwd is None else f'{bwd:7.1f}':>7}")
    return "\n".join(lines) + "\n"


def tf32_summary(out: Path) -> str:
    """Training / evaluation times of the TF32 run against the default run of the ``bench`` stage."""
    try:
        base = json.loads((out / "gpu_bench.json").read_text())["archs"]
        tf32 = json.loads((out / "gpu_tf32.json").read_text())["archs"]
    except (OSError, KeyError, json.JSONDecodeError):
        return "tf32: no comparison (a run is missing)\n"
    lines = ["TF32 run vs default run (separate runs, not interleaved: read with the run-to-run noise)",
             f"{'arch':<24} {'train tf32/default':>19} {'eval tf32/default':>18}"]
    for name, r in tf32.items():
        if name in base:
            a, b = r["variants"]["best"], base[name]["variants"]["best"]
            lines.append(f"{name:<24} {a['train_ms'] / b['train_ms']:>19.2f} {a['eval_ms'] / b['eval_ms']:>18.2f}")
    return "\n".join(lines) + "\n"


def run_stage(stage: Stage, out: Path, header: str, deadline: float) -> bool:
    """Run the stage's commands in turn into ``<out>/gpu_<name>.txt``; False when one failed or ran out of time."""
    path = out / f"gpu_{stage.name}.txt"
    deadline = min(deadline, time.monotonic() + stage.timeout_s)
    ok = True
    with path.open("w") as f:
        f.write(header)
        for cmd in stage.commands:
            shown = shlex.join([Path(c).name if c == sys.executable else c for c in cmd])
            f.write(f"# stage: {shown}\n")
            f.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                f.write("# SKIPPED: the stage's time budget was spent\n")
                ok = False
                continue
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **stage.env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=left)
                f.write(proc.stdout)
                f.write(f"# exit {proc.returncode} after {time.monotonic() - t0:.0f} s\n")
                ok = ok and proc.returncode == 0
            except subprocess.TimeoutExpired as e:
                f.write((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
                f.write(f"# TIMED OUT after {time.monotonic() - t0:.0f} s\n")
                ok = False
        if stage.name == "epochs":
            f.write("\n" + epoch_summary(out))
        if stage.name == "switches":
            f.write("\n" + tf32_summary(out))
    print(f"[gpu-check] {stage.name}: {'ok' if ok else 'FAILED (see the file)'} -> {path}", flush=True)
    return ok


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--reference", type=Path, help="checkout of the authors' pcDEQ code (ratios in the bench stage)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data", help="folder holding MNIST/raw (else synthetic)")
    p.add_argument("--out", type=Path, help="output folder (default: results/bench on cuda, logs/gpu_check on cpu)")
    p.add_argument("--quick", action="store_true", help="tiny networks and two batches per epoch (a dry run)")
    p.add_argument("--stages", default="tests,bench,switches,epochs", help="comma-separated subset of the stages")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns 0 when every stage passed, 1 when one failed, 2 for a bad command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: make gpu-check needs a CUDA GPU and none is visible here (torch.cuda.is_available() is "
              "False); on a CPU, make gpu-check DEVICE=cpu runs the same script end to end", file=sys.stderr)
        return 2
    if args.reference is not None and not (args.reference / "networks.py").is_file():
        print(f"error: --reference {args.reference}: no networks.py there; pass a checkout of the authors' pcDEQ "
              "code", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    out = args.out or (ROOT / "results" / "bench" if args.device == "cuda" else ROOT / "logs" / "gpu_check")
    all_stages = {s.name: s for s in stages(args, out)}
    unknown = [s for s in chosen if s not in all_stages]
    if unknown:
        print(f"error: --stages {','.join(unknown)}: unknown; valid: {', '.join(all_stages)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    header = f"$ python -m pcdeq.bench.gpu_check {shlex.join(argv)}\n{device_line(args.device)}\n"
    deadline = time.monotonic() + BUDGET_S
    results = [run_stage(all_stages[name], out, header, deadline) for name in chosen]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
