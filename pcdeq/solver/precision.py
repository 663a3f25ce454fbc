"""Mixed precision (``solver.precision``): bfloat16 iterations first, then the caller's precision.

``mixed`` iterates in bfloat16 until the relative step reaches what bfloat16 resolves (:data:`BF16_SWITCH`, its
machine epsilon 2^-7) or stops decreasing, then continues in the caller's precision from that iterate to the
configured tolerance with the same stopping rule, so it reaches the same fixed point as a solve in the caller's
precision; ``bf16`` stops after the bfloat16 phase (an approximate fixed point, relative accuracy about 1e-2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pcdeq.solver.stats import SolverStats
from pcdeq.solver.stopping import EVERY_ITERATION, CheckSchedule, FixedPointMap

Tensor = torch.Tensor
PRECISIONS = ("off", "mixed", "bf16")  # the values of solver.precision: no bfloat16 phase, mixed, bfloat16 only
BF16_SWITCH = torch.finfo(torch.bfloat16).eps  # 2^-7: the relative step below which bfloat16 rounding dominates


PhaseRunner = Callable[[FixedPointMap, Tensor, float, CheckSchedule, bool], tuple[Tensor, SolverStats]]


def solve_in_precision(run: PhaseRunner, f: FixedPointMap, f_low: FixedPointMap, z0: Tensor, tol: float, precision: str,
                       schedule: CheckSchedule) -> tuple[Tensor, SolverStats]:
    """Mixed-precision solve: bfloat16 iterations first, then (``mixed``) ``f`` in z0's precision to ``tol``.

    Switch-over rule: the bfloat16 phase stops once its relative step is <= max(tol, :data:`BF16_SWITCH`) (below
    that, bfloat16 rounding of the iterate dominates the step) or the step stops decreasing (its rounding floor),
    or at the iteration cap. ``mixed`` then iterates ``f`` from that point with the configured tolerance,
    stopping rule and check schedule (``schedule``), so it ends where a solve in z0's precision ends: within the
    tolerance of the same fixed point. ``bf16`` returns the bfloat16 iterate (in z0's dtype) with its stats.

    Args:
        run: ``run(map, start, tol, schedule, stall) -> (z, stats)``, the configured solver.
        f, f_low: the map in z0's precision and in bfloat16.
        z0: the start (in z0's precision).
        tol: the configured tolerance.
        precision: "mixed" or "bf16".
        schedule: the check schedule of the final phase.

    Returns:
        The fixed point in z0's dtype and the combined statistics (``iters`` counts both phases, the history runs
        on across them, ``low_precision_iters`` the bfloat16 part).
    """
    switch = max(tol, BF16_SWITCH)
    z_low, low = run(f_low, z0.to(torch.bfloat16), switch, EVERY_ITERATION, True)
    low.low_precision_iters = low.iters
    z = z_low.to(z0.dtype)
    if precision == "bf16" or low.nonfinite:
        return z, low
    z, high = run(f, z, tol, schedule, False)
    high.low_precision_iters = low.iters
    high.history_iters = [low.iters + k for k in high.iterations()] if high.history else []
    high.history = low.history + high.history
    high.history_iters = low.iterations() + high.history_iters
    high.iters += low.iters
    return z, high
