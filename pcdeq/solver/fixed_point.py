"""Plain (Picard) iteration, the paper's solver (registered as ``fixed_point``)."""

from __future__ import annotations

import math

import torch

from pcdeq.solver.stats import SolverStats
from pcdeq.solver.stopping import (
    EVERY_ITERATION,
    CheckSchedule,
    FixedPointMap,
    _batch_size,
    _relative,
    check_solver_args,
    finish_stats,
    tolerance_met,
)

Tensor = torch.Tensor


def fixed_point_iter(
    f: FixedPointMap,
    z0: Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    stop_mode: str = "sample",
    schedule: CheckSchedule = EVERY_ITERATION,
    inplace: bool = False,
    stall: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Plain (Picard) iteration z_{k+1} = f(z_k), the paper's solver.

    Args:
        f: the map whose fixed point is sought.
        z0: starting point (its shape is the iterate's shape; dim 0 is the batch).
        tol: tolerance on the relative step (0: run exactly ``max_iter`` iterations).
        max_iter: maximum number of applications of f.
        stop_mode: "sample" (every sample below tol) or "batch" (the reference's whole-batch norm).
        schedule: after which iterations the residual is checked (default: every one); the last is always.
        inplace: ``f`` returns a fresh tensor at every call (never its argument or a tensor kept elsewhere), so
            a check may overwrite the previous iterate with the difference instead of allocating one. ``z0`` is
            never written.
        stall: also stop when the residual does not decrease from one check to the next (the bfloat16 phase
            of mixed precision stops at its rounding floor this way).

    Returns:
        The last iterate and a :class:`SolverStats`.
    """
    check_solver_args(tol, max_iter, stop_mode)
    stats = SolverStats()
    z, owned = z0, False  # owned: z came from f, so it may be overwritten
    diff: Tensor | None = None
    res = torch.full((_batch_size(z0, stop_mode),), math.inf, device=z0.device)
    last = math.inf
    for k in range(1, max_iter + 1):
        z_new = f(z)
        stats.iters = k
        if k < max_iter and not schedule.due(k):
            z, owned = z_new, True
            continue
        with torch.no_grad():  # the check is never differentiated (backward="unrolled" tracks f itself)
            diff = z.sub_(z_new) if (inplace and owned and z.data_ptr() != z_new.data_ptr()) else z_new - z
            res = _relative(diff, z_new, stop_mode)
        # One host sync per check: the stopping decision needs it. A NaN or Inf anywhere in z_new makes its
        # sample's residual NaN (inf / inf), and max propagates NaN, so this one check also catches non-finite z.
        rmax = float(res.max())
        if not math.isfinite(rmax):
            return z_new, finish_stats(stats, res, tol, nonfinite=True, batch_size=z0.shape[0])
        stats.record(k, rmax)
        z, owned = z_new, True
        if tolerance_met(rmax, tol) or (stall and rmax >= last):
            break
        last = rmax
    with torch.no_grad():
        per_sample = _relative(diff, z, "sample") if stop_mode == "batch" and diff is not None else None
    return z, finish_stats(stats, res, tol, nonfinite=False, batch_size=z0.shape[0], per_sample=per_sample)
