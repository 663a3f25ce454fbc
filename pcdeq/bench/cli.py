"""`make bench` (``python -m pcdeq.bench``): step times of the paper architectures, against their compute floor,
the plain path and the authors' reference implementation; memory of the implicit vs the unrolled backward;
Lightning's epoch overhead; host synchronisations per step.

What each mode measures is in its module: :mod:`pcdeq.bench.setup` (architectures, configs, the batch),
:mod:`~pcdeq.bench.timing` (steps, interleaving, iterations), :mod:`~pcdeq.bench.floor` (compute floor),
:mod:`~pcdeq.bench.reference` (the authors' code), :mod:`~pcdeq.bench.memory` (``--memory``),
:mod:`~pcdeq.bench.epoch` (``--epoch``), :mod:`~pcdeq.bench.syncs` (host syncs), :mod:`~pcdeq.bench.report`.
Modules run on their own: ``python -m pcdeq.bench.switches`` (accuracy with every switch on and off),
``python -m pcdeq.bench.node_steps`` (Neural ODE steps on real data), ``python -m pcdeq.bench.gpu_estimate``,
``python -m pcdeq.bench.gpu_check`` (``make gpu-check``).

* ``--plain``: the same pcDEQ model with every performance switch at its plain value beside the default ("best")
  path; ratios plain/best (for monDEQ: W applied spatially instead of in the frequency domain).
* ``--switch KEY=VALUE`` (repeatable): the default path with these solver settings changed beside it, e.g.
  ``--switch skip_zero_product=false``: one optimisation's effect, interleaved; ratios switched/best;
  ``--switch model.channels_last=false`` for a model option.
* ``--tf32``: TensorFloat-32 for the whole run (compare its JSON with one without).
* ``--reference PATH``: the authors' pcDEQ implementation from a checkout at PATH; ratios ref/ours.
* ``--memory``: implicit vs unrolled backward memory at forced iteration counts, one fresh process per point.
* ``--epoch``: the second of two epochs through Lightning against a bare loop and a minimal LightningModule.

Usage:
    python -m pcdeq.bench [--archs all|pcdeq|mondeq|NAME,...] [--plain] [--switch KEY=VALUE] [--reference PATH]
        [--memory] [--epoch] [--device cpu|cuda] [--repeats N] [--warmup N] [--threads N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pcdeq.bench.architecture import bench_arch
from pcdeq.bench.epoch import bench_epoch
from pcdeq.bench.memory import bench_memory, memory_point
from pcdeq.bench.reference import import_reference
from pcdeq.bench.report import finite, report
from pcdeq.bench.setup import ARCHS, ROOT, progress, select_archs
from pcdeq.errors import ConfigError
from pcdeq.family import solver_fields
from pcdeq.perf import PLAIN
from pcdeq.training.device import apply_tf32

DEFAULT_JSON = ROOT / "results" / "bench" / "bench.json"
MEMORY_ARCH = "pcdeq_multiconv_mnist"
EPOCH_ARCHS = ("pcdeq_linear_mnist", "pcdeq_multiconv_mnist", "mondeq_fc_mnist")
MODEL_SWITCHES = tuple(k for k in PLAIN if k.startswith("model."))  # e.g. model.channels_last


def git_commit() -> str | None:
    """HEAD of the checkout (with "+dirty" for uncommitted changes to tracked files)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), or what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def meta(args: argparse.Namespace, argv: Sequence[str], device: torch.device) -> dict[str, Any]:
    """What ran where: command, versions, device, threads, load."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"command": "python -m pcdeq.bench " + shlex.join(argv), "git_commit": git_commit(),
            "torch": torch.__version__, "device": str(device), "device_name": name, "threads": args.threads,
            "tf32": args.tf32, "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z")}


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="all", help="all, none, pcdeq, mondeq or comma-separated names: "
                                                   + ", ".join(ARCHS))
    p.add_argument("--plain", action="store_true", help="also time pcDEQ with every switch at its plain value")
    p.add_argument("--switch", action="append", default=[], metavar="KEY=VALUE",
                   help="also time the default path with this solver setting changed (repeatable), e.g. "
                        "skip_zero_product=false")
    p.add_argument("--reference", type=Path, help="checkout of the authors' pcDEQ code: time it beside ours")
    p.add_argument("--memory", action="store_true", help="implicit vs unrolled backward memory, forced iterations")
    p.add_argument("--memory-arch", default=MEMORY_ARCH, choices=[a for a in ARCHS if a.startswith("pcdeq")])
    p.add_argument("--epoch", action="store_true", help="Lightning epoch overhead")
    p.add_argument("--epoch-archs", default=",".join(EPOCH_ARCHS),
                   help="architectures of the --epoch run (those also benchmarked in this run)")
    p.add_argument("--epoch-repeats", type=int, default=3,
                   help="interleaved repetitions of the three --epoch runs (medians; --quick: 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tf32", action="store_true", help="TensorFloat-32 products and convolutions for the whole run "
                                                        "(CUDA; compare with a run without it)")
    p.add_argument("--repeats", type=int, help="timed repetitions (default: per architecture)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps, at least 1 (default: per architecture)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 1 warm-up, tiny epoch/memory")
    p.add_argument("--batch", type=int, help="batch size instead of the paper's")
    p.add_argument("--width-scale", type=float, default=1.0, help="scale the hidden sizes (smoke tests)")
    p.add_argument("--tol", type=float, help="solver tolerance, both directions (0: exactly --max-iter)")
    p.add_argument("--max-iter", type=int, help="solver iteration cap, both directions")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--memory-point", nargs=2, metavar=("BACKWARD", "ITERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = args.repeats or 1, args.warmup or 1
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be at least 1")
    if args.epoch_repeats < 1:
        p.error("--epoch-repeats must be at least 1")
    try:
        args.switch = parse_switches(args.switch)
    except ValueError as err:
        p.error(str(err))
    return args


def parse_switches(items: Sequence[str]) -> dict[str, Any]:
    """``--switch KEY=VALUE`` items as solver-setting changes (true/false, numbers, strings), checked by the classes
    that declare the keys (the shared SolverConfig and the families' own, :func:`pcdeq.family.solver_fields`);
    ``model.KEY=VALUE`` for a model performance option (one of :data:`pcdeq.perf.PLAIN`'s ``model.*`` keys).

    Raises:
        ValueError: an item without "=", a key that is not a solver setting, or a value it rejects.
    """
    known = solver_fields()
    fields = set(known)
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("solver.")
        if sep and key in MODEL_SWITCHES:
            changes[key] = {"true": True, "false": False}.get(raw.strip().lower(), raw.strip())
            continue
        if not sep or key not in fields:
            raise ValueError(f"--switch {item!r}: expected KEY=VALUE with KEY a solver setting "
                             f"(e.g. skip_zero_product=false); valid keys: {', '.join(sorted(fields))}")
        value: Any = {"true": True, "false": False}.get(raw.strip().lower(), raw.strip())
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
        changes[key] = value
    try:
        for cls in dict.fromkeys(owner for owner, _ in known.values()):  # each class checks the keys it declares
            names = {f.name for f in dataclasses.fields(cls)}
            cls(**{k: v for k, v in changes.items() if k in names and k not in MODEL_SWITCHES})
    except ConfigError as err:
        raise ValueError(f"--switch: {err}") from None
    return changes


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables, write the JSON and return the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU is visible here; use --device cpu", file=sys.stderr)
        raise SystemExit(2)
    apply_tf32(args.tf32)
    if device.type == "cpu":  # as our CPU runs do (pcdeq.training.pipeline.make_trainer) and the reference's script,
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # which never imports Lightning, does: no NVML probes
    if args.memory_point:
        point = memory_point(select_archs(args.archs)[0], args.memory_point[0], int(args.memory_point[1]), args,
                             device)
        print("MEMORY_POINT " + json.dumps(point), flush=True)
        return point
    archs = select_archs(args.archs)
    networks = import_reference(args.reference) if args.reference else None
    results: dict[str, Any] = {"meta": meta(args, argv, device), "archs": {}, "skipped": []}
    t0 = time.perf_counter()
    for arch in archs:
        results["archs"][arch.name] = bench_arch(arch, args, device, networks)
    if args.memory:
        results["memory"] = bench_memory(args)
    if args.epoch:
        results["epoch"] = {}
        for arch in select_archs(args.epoch_archs):
            if arch.name not in results["archs"]:
                results["skipped"].append(f"epoch: {arch.name} was not benchmarked in this run")
                continue
            progress(f"epoch: {arch.name}")
            bare = results["archs"][arch.name]["variants"]["best"]["train_ms"]
            results["epoch"][arch.name] = bench_epoch(arch, args, bare, device)
    results["meta"].update(wall_s=time.perf_counter() - t0, load_average_end=list(os.getloadavg()))
    print(report(results), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(finite(results), indent=1, allow_nan=False) + "\n")
    progress(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
