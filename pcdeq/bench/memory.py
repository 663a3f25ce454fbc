"""``--memory``: one training step with the iteration count forced (tol 0), implicit against unrolled backward,
each point in a fresh subprocess: peak saved-for-backward bytes, peak RSS growth (CPU) or peak CUDA memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from typing import Any

import torch

from pcdeq.bench.setup import ARCHS, ROOT, Arch, build_ours, make_setup, progress
from pcdeq.bench.timing import instrumented_step, our_variant

MEMORY_ITERS = (10, 25, 50, 100)


def proc_status_bytes(key: str) -> int | None:
    """A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM"; Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0; a no-op where not possible)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The process's peak RSS since :func:`reset_peak_rss`.

    Not ``ru_maxrss`` where /proc has it: Linux carries ru_maxrss across execve, so a subprocess would start with
    its parent's peak.
    """
    hwm = proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_point(arch: Arch, backward: str, iters: int, args: argparse.Namespace, device: torch.device) -> dict:
    """One training step with exactly ``iters`` forward (and implicit backward) iterations: its memory.

    Meant for a fresh process (``--memory-point``), so that the peak RSS belongs to this step alone.
    """
    setup = make_setup(arch, args, device)
    model = build_ours(setup, backward=backward, fwd_tol=0.0, bwd_tol=0.0, fwd_max_iter=iters,
                       bwd_max_iter=iters).to(device)
    variant = our_variant(backward, model, setup)
    gc.collect()
    reset_peak_rss()
    rss_before = proc_status_bytes("VmRSS") or peak_rss_bytes()
    instrumented_step(variant, device)
    variant.record_train()
    return {"backward": backward, "iters": iters, "fwd_iters": variant.train_iters["forward"],
            "bwd_iters": variant.train_iters["backward"],
            "saved_for_backward_mb": variant.stats["saved_for_backward_mb"],
            "peak_rss_growth_mb": max(0, peak_rss_bytes() - rss_before) / 2**20,
            "peak_cuda_mb": variant.stats["peak_cuda_mb"]}


def run_memory_point(arch: Arch, backward: str, iters: int, args: argparse.Namespace) -> dict:
    """:func:`memory_point` in a fresh ``python -m pcdeq.bench`` process, run from the checkout (its pcdeq)."""
    cmd = [sys.executable, "-m", "pcdeq.bench", "--memory-point", backward, str(iters),
           "--archs", arch.name, "--device", args.device, "--threads", str(args.threads),
           "--width-scale", str(args.width_scale)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_POINT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory point {backward} {iters} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("MEMORY_POINT "):])


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Implicit vs unrolled backward at forced iteration counts, one fresh process per point."""
    arch = ARCHS[args.memory_arch]
    iters = (2, 4) if args.quick else MEMORY_ITERS
    series: dict[str, list[dict]] = {"implicit": [], "unrolled": []}
    for n in iters:
        for backward in series:
            progress(f"memory: {arch.name}, {backward} backward, {n} iterations")
            series[backward].append(run_memory_point(arch, backward, n, args))
    return {"arch": arch.name, "iters": list(iters), **series,
            "measures": "saved_for_backward_mb: peak live bytes autograd saved (saved_tensors_hooks); "
                        "peak_rss_growth_mb: peak RSS during the step (VmHWM, reset before it) minus RSS "
                        "before it, in a fresh process; "
                        "peak_cuda_mb: torch.cuda.max_memory_allocated (CUDA only)"}


