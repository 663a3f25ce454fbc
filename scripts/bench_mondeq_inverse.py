"""Time the monDEQ resolvent on the CIFAR-10 single-conv model (81 channels, 34x34 grid).

Prints the median wall time of: building V = (I + alpha (I - W))^-1 (kernel FFTs + one 81x81 complex
inverse per frequency of the half spectrum), one application of V and of V^T to a batch, and one application
of W (four circular 3x3 convolutions), all without gradient tracking.

Usage:
    python scripts/bench_mondeq_inverse.py [--batch 128] [--repeats 5] [--arch conv] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pcdeq.mondeq import build_mondeq


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` calls, after one warm-up call.

    Args:
        fn: the work to time.
        repeats: number of timed calls.

    Returns:
        The median in seconds.
    """
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Parse the arguments, build the model and print the timings."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arch", default="conv", choices=["conv", "multitier"])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = build_mondeq(args.arch, args.dataset).to(dtype)
    op = model.operator
    z = [torch.rand(*s, dtype=dtype) for s in op.state_shapes(args.batch)]
    print(f"{args.arch} {args.dataset}: channels {op.channels}, grids {op.grids}, batch {args.batch}, "
          f"{args.dtype}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    with torch.no_grad():
        R = op.resolvent(args.alpha)
        rows = [
            ("build V (inverse)", lambda: op.resolvent(args.alpha)),
            ("apply V", lambda: R.apply(z)),
            ("apply V^T", lambda: R.apply(z, transpose=True)),
            ("apply W", lambda: op.matvec(z)),
        ]
        for name, fn in rows:
            print(f"  {name:<18} {1e3 * median_time(fn, args.repeats):9.1f} ms")


if __name__ == "__main__":
    main()
