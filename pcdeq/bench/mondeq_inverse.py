"""Time the monDEQ resolvent and W, spatial and in the frequency domain, on the single-conv models.

For each dataset (default: CIFAR-10, 81 channels on a 34x34 grid, and MNIST, 54 channels on 30x30) prints the
median wall time of, without gradient tracking: building V = (I + alpha (I - W))^-1 on its own (kernel spectra
+ one C x C complex inverse per frequency of the half spectrum); building W's spectra
(``ConvTiersMonotone.frequency_weight``) and V from those shared spectra (what ``solver.mondeq_w=frequency``
does once per forward pass); one application of V and of V^T to a batch; one application of W and W^T with
circular convolutions (``spatial``) and per frequency (``frequency``). Then the largest difference between the
two W's, and one full training step (forward, cross-entropy, implicit backward, Adam step) with each setting,
Peaceman-Rachford forward and backward. ``ratio`` is step / (forward iterations x t(V) + backward iterations x
t(V^T)): how much a step costs beyond its resolvent applications; ``overhead`` is the rest of the step in units
of t(V), so that at n iterations in all the ratio would be about 1 + overhead / n.

The batch is random (N(0, 1) images, random labels) on a freshly initialised model, where the solves take a few
iterations only; ``--iters N`` forces N forward and N backward iterations (tolerance 0), closer to training.

Usage:
    python -m pcdeq.bench.mondeq_inverse [--datasets cifar10 mnist] [--batch 128] [--repeats 3]
        [--step-repeats 3] [--iters 10] [--threads 1] [--arch conv] [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pcdeq.families.mondeq import PAPER_SOLVER, build_mondeq


def median_time(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` calls, after one warm-up call.

    Args:
        fn: the work to time.
        repeats: number of timed calls.
        warmup: make one untimed call first.

    Returns:
        The median in seconds.
    """
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_dataset(dataset: str, args: argparse.Namespace) -> None:
    """Print the operator timings, the W difference and the training steps of one dataset's model.

    Args:
        dataset: dataset name (gives the model size and grid).
        args: the parsed command line.
    """
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    solver = dataclasses.replace(PAPER_SOLVER, alpha=args.alpha, alpha_tuning=False)
    if args.iters:
        solver = dataclasses.replace(solver, fwd_tol=0.0, bwd_tol=0.0, fwd_max_iter=args.iters,
                                     bwd_max_iter=args.iters)
    model: Any = build_mondeq(args.arch, dataset, solver=solver).to(dtype)  # duck-typed: operator, head
    op: Any = model.operator  # a monDEQ operator: ConvTiersMonotone for these architectures
    masks = op.state_masks(torch.zeros(1, dtype=dtype))
    # state-like inputs: nonnegative with a zero border
    z = [torch.relu(torch.randn(*s, dtype=dtype)) * mk for s, mk in zip(op.state_shapes(args.batch), masks,
                                                                          strict=True)]
    print(f"{args.arch} {dataset}: channels {op.channels}, grids {op.grids}, batch {args.batch}, {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats} (steps: {args.step_repeats})")
    t: dict[str, float] = {}
    with torch.no_grad():
        R, fw = op.resolvent(args.alpha), op.frequency_weight()
        rows = [
            ("build V (own spectra)", lambda: op.resolvent(args.alpha)),
            ("build W spectra", op.frequency_weight),
            ("build V (shared spectra)", lambda: fw.resolvent(args.alpha)),
            ("apply V", lambda: R.apply(z)),
            ("apply V^T", lambda: R.apply(z, transpose=True)),
            ("apply W spatial", lambda: op.matvec(z)),
            ("apply W^T spatial", lambda: op.matvec(z, transpose=True)),
            ("apply W frequency", lambda: fw.apply(z)),
            ("apply W^T frequency", lambda: fw.apply(z, transpose=True)),
        ]
        for name, fn in rows:
            t[name] = median_time(fn, args.repeats)
            base = "build V (own spectra)" if name.startswith("build") else "apply V"
            print(f"  {name:<26} {1e3 * t[name]:9.1f} ms   {t[name] / t[base]:5.2f} x {base}")
        for transpose in (False, True):
            ref = op.matvec(z, transpose)
            diff = max(float((a - b).abs().max()) for a, b in zip(fw.apply(z, transpose), ref, strict=True))
            scale = max(float(r.abs().max()) for r in ref)
            w = "W^T" if transpose else "W"
            print(f"  max|{w} frequency - {w} spatial| {diff:.2e} (max|{w} z| {scale:.2f})")

    x = torch.randn(args.batch, *model.input_shape, dtype=dtype)
    y = torch.randint(0, model.head.linear.out_features, (args.batch,))
    state = copy.deepcopy(model.state_dict())
    for mode in ("spatial", "frequency"):
        model.load_state_dict(state)  # both settings step from the same weights, with a fresh optimizer
        model.solver = dataclasses.replace(model.solver, mondeq_w=mode)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        ts = median_time(step, args.step_repeats, warmup=False)
        fwd, bwd = model.last_stats["forward"], model.last_stats["backward"]
        assert fwd is not None and bwd is not None
        applications = fwd.iters * t["apply V"] + bwd.iters * t["apply V^T"]
        print(f"  training step, mondeq_w={mode:<9} {ts:7.2f} s   iterations {fwd.iters} + {bwd.iters}   "
              f"ratio {ts / applications:5.2f}   overhead {(ts - applications) / t['apply V']:5.1f} x t(V)")


def main() -> None:
    """Parse the arguments and run every dataset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "mnist"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=0, help="force this many iterations per solve (0: tol 1e-2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arch", default="conv", choices=["conv", "multitier"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dataset in args.datasets:
        bench_dataset(dataset, args)


if __name__ == "__main__":
    main()
