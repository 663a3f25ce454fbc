"""Fixed-point solvers for z = f(z) and the registry of every family's solvers.

Every solver has the signature ``solver(f, z0, *, tol, max_iter, stop_mode) -> (z, SolverStats)`` and runs
without gradient tracking (callers wrap it in ``torch.no_grad()``). Loops are precision-agnostic: no dtype is
hard-coded, the small constants come from ``torch.finfo`` of the iterate, so the same code serves float64
tests, float32 training and reduced-precision experiments.

Stopping rule: the relative step ``||z_{k+1} - z_k|| / (||z_{k+1}|| + eps)``.

* ``stop_mode="batch"`` (default): the reference implementation's criterion, one norm over the whole batch (as
  monDEQ's splitting solvers too), so iteration counts compare with the papers.
* ``stop_mode="sample"``: the norm is taken per sample (dim 0 is the batch); the solve stops when every sample
  is below ``tol``.

In both modes the reported ``residual_mean`` / ``residual_max`` are per-sample residuals of the last step (mean
and max over the batch), so a batch-mode solve still shows how far its slowest sample was from the tolerance.

A non-finite iterate ends the solve as a failure (``nonfinite=True``, ``converged=False``); hitting
``max_iter`` is reported through ``converged=False`` and ``n_not_converged``. ``tol=0`` never stops early: the
solve runs exactly ``max_iter`` iterations (benchmarks force iteration counts this way).

Residual-check schedule (:class:`CheckSchedule`, ``solver.check``): a check costs a subtraction, two norms and,
on a GPU, a host synchronisation. ``every`` checks after each iteration; ``periodic`` every ``check_every``
iterations; ``prior`` (the default) checks first one iteration before the previous solve of the same kind
stopped, then after each iteration, so a solve as long as the last one does no wasted application and skips
its early checks. A late first check can only add iterations (a more accurate fixed point), never remove one.
The residual history then holds the checked iterations only; ``SolverStats.history_iters`` says which ones.

Mixed precision (``solver.precision``, :mod:`~pcdeq.solver.precision`): bfloat16 iterations first, then
the caller's precision to the same tolerance (``mixed``), or bfloat16 only (``bf16``, approximate).

Modules: one per loop (:mod:`~pcdeq.solver.fixed_point`, :mod:`~pcdeq.solver.anderson`), the stopping rule and
check schedule (:mod:`~pcdeq.solver.stopping`), the statistics (:mod:`~pcdeq.solver.stats`), the bfloat16
switch-over (:mod:`~pcdeq.solver.precision`) and the solver settings (:mod:`~pcdeq.solver.config`). This module
holds the registry (:data:`SOLVERS`, :func:`register_solver`, :func:`get_solver`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pcdeq.errors import ConfigError
from pcdeq.solver.anderson import anderson
from pcdeq.solver.fixed_point import fixed_point_iter
from pcdeq.solver.stats import SolverStats

SolverFn = Callable[..., tuple[Any, SolverStats]]
SOLVERS: dict[str, SolverFn] = {}
SOLVER_KINDS: dict[str, str] = {}  # name -> the problem the solver takes: "map" (z = f(z)) or "splitting"


def register_solver(name: str, fn: SolverFn, kind: str = "map") -> None:
    """Make ``fn`` available by name.

    Args:
        name: registry key (``solver.fwd_solver`` / ``solver.bwd_solver`` in the configs).
        fn: the solver. Kind "map": ``fn(f, z0, *, tol, max_iter, stop_mode)`` as :func:`fixed_point_iter`;
            kind "splitting": ``fn(problem, alpha, *, tol, max_iter, stop_mode)`` as monDEQ's
            :func:`pcdeq.families.mondeq.splitting.peaceman_rachford`.
            kind "ode": ``fn(func, y0, *, solver)`` as the Neural ODE family's
            :func:`pcdeq.families.node.solve.ode_solver`.
        kind: the problem the solver takes; a model family runs solvers of one kind.
    """
    SOLVERS[name] = fn
    SOLVER_KINDS[name] = kind


def solver_kind(name: str) -> str:
    """The kind of a registered solver; the error lists the valid names."""
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; valid choices: {', '.join(sorted(SOLVERS))}")
    return SOLVER_KINDS[name]


def get_solver(name: str, kind: str | None = None) -> SolverFn:
    """Look a solver up by name (and check its kind); the error lists the valid names."""
    if solver_kind(name) != (kind or SOLVER_KINDS[name]):
        valid = ", ".join(sorted(n for n, k in SOLVER_KINDS.items() if k == kind))
        raise ConfigError(f"solver {name!r} is a {SOLVER_KINDS[name]} solver, not a {kind} solver; valid: {valid}")
    return SOLVERS[name]


register_solver("fixed_point", fixed_point_iter)
register_solver("anderson", anderson)
