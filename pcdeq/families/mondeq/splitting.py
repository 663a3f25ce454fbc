"""Operator-splitting solvers for monDEQs, their implicit backward and the alpha-tuning rule.

A :class:`SplittingProblem` asks for z with z = prox(L z + b), where I - L is strongly monotone and prox is
the projection onto a convex cone. The forward pass uses L = W and prox = relu (with the zero border of
convolutional states); the implicit backward uses L = W^T and prox = multiplication by the 0/1 relu derivative
at the equilibrium (inactive components pinned to 0). Both directions therefore share the same two solvers:

* forward-backward (FB): z+ = prox((1 - a) z + a (L z + b)); converges for a <= 2m / ||I - W||^2.
* Peaceman-Rachford (PR): from z = u = 0, u_half = 2z - u; z_half = V (u_half + a b); u = 2 z_half - u_half;
  z = prox(u), with V = (I + a (I - L))^-1 (the resolvent, V^T in the backward); converges for any a > 0.

Stopping (as the authors): the relative change ||z+ - z|| / (||z+|| + eps) of every tier, summed over tiers,
over the whole batch (``stop_mode="batch"``) or per sample (``"sample"``: every sample must pass). A
non-finite iterate ends the solve as a failure. Statistics are :class:`pcdeq.solver.stats.SolverStats`, as for
pcDEQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pcdeq.solver import get_solver, register_solver
from pcdeq.solver.stats import SolverStats
from pcdeq.solver.stopping import check_solver_args, finish_stats, relative_residual

from .solver_config import MondeqSolverConfig

Tensor = torch.Tensor
Tiers = list[Tensor]


@dataclass
class SplittingProblem:
    """z = prox(L z + b) with I - L strongly monotone.

    Attributes:
        linear: z -> L z (needed by forward-backward).
        resolvent: r -> (I + alpha (I - L))^-1 r for the alpha the solver is called with (needed by
            Peaceman-Rachford), or None. It returns new tensors, not its argument (which Peaceman-Rachford may
            overwrite afterwards).
        prox: the projection applied after each linear step.
        bias: b, one tensor per tier.
        bias_in_prox: Peaceman-Rachford adds alpha b before the prox instead of before the resolvent. Both
            reach the same fixed point of the same problem when prox is linear (the implicit backward, where it
            is multiplication by the 0/1 relu derivative); the authors' backward does this, so its iterates and
            iteration counts are theirs.
        skip_zero_resolvent: with ``bias_in_prox``, Peaceman-Rachford's first step from z = u = 0 applies the
            resolvent to 0, which is 0 (it is linear): skip it, the same iterates with one resolvent fewer.
    """

    linear: Callable[[Tiers], Tiers]
    resolvent: Callable[[Tiers], Tiers] | None
    prox: Callable[[Tiers], Tiers]
    bias: Tiers
    bias_in_prox: bool = False
    skip_zero_resolvent: bool = False


def _iterate(step: Callable[[Any], tuple[Any, Tiers]], state: Any, z: Tiers, tol: float, max_iter: int,
             stop_mode: str) -> tuple[Tiers, SolverStats]:
    """Run ``state, z_new = step(state)`` until the summed relative change of z is <= tol."""
    check_solver_args(tol, max_iter, stop_mode)
    stats = SolverStats()
    res = torch.full((1,), math.inf)
    z_prev = z

    def summed(new: Tiers, old: Tiers, mode: str) -> Tensor:
        return torch.stack([relative_residual(a, b, mode) for a, b in zip(new, old, strict=True)]).sum(0)

    for k in range(1, max_iter + 1):
        state, z_new = step(state)
        res = summed(z_new, z, stop_mode)
        stats.iters = k
        rmax = float(res.max())  # one host sync per iteration: the stopping decision needs it
        if not math.isfinite(rmax):  # a NaN/Inf in any tier makes the summed residual NaN
            return z_new, finish_stats(stats, res, tol, nonfinite=True, batch_size=z[0].shape[0])
        stats.history.append(rmax)
        z_prev, z = z, z_new
        if rmax <= tol:
            break
    per_sample = summed(z, z_prev, "sample") if stop_mode == "batch" else None
    return z, finish_stats(stats, res, tol, nonfinite=False, batch_size=z[0].shape[0], per_sample=per_sample)


def forward_backward(problem: SplittingProblem, alpha: float, *, tol: float = 1e-2, max_iter: int = 300,
                     stop_mode: str = "batch") -> tuple[Tiers, SolverStats]:
    """Forward-backward splitting z+ = prox((1 - alpha) z + alpha (L z + b)) from z = 0.

    Args:
        problem: the problem (``linear`` is used).
        alpha: step size, > 0 (diverges on trained models above about 0.125).
        tol: tolerance on the summed relative change.
        max_iter: iteration cap.
        stop_mode: "batch" (the authors' whole-batch norm) or "sample".

    Returns:
        The last iterate (one tensor per tier) and its :class:`SolverStats`.
    """
    b = problem.bias

    def step(z: Tiers) -> tuple[Tiers, Tiers]:
        lz = problem.linear(z)
        pre = [(1 - alpha) * zi + alpha * (li + bi) for zi, li, bi in zip(z, lz, b, strict=True)]
        z_new = problem.prox(pre)
        return z_new, z_new

    z0 = [torch.zeros_like(bi) for bi in b]
    return _iterate(step, z0, z0, tol, max_iter, stop_mode)


def peaceman_rachford(problem: SplittingProblem, alpha: float, *, tol: float = 1e-2, max_iter: int = 300,
                      stop_mode: str = "batch") -> tuple[Tiers, SolverStats]:
    """Peaceman-Rachford splitting from z = u = 0 (the paper's training solver).

    Args:
        problem: the problem (``resolvent`` must be built for the same ``alpha``).
        alpha: step size, > 0.
        tol, max_iter, stop_mode: as in :func:`forward_backward`.

    Returns:
        The last iterate z (one tensor per tier) and its :class:`SolverStats`.
    """
    resolvent = problem.resolvent
    if resolvent is None:
        raise ValueError("peaceman_rachford needs the problem's resolvent (I + alpha (I - L))^-1")
    ab = [alpha * bi for bi in problem.bias]

    def reflect(z_half: Tiers, u_half: Tiers) -> Tiers:
        # 2 z_half - u_half, written over u_half (made in this step, used nowhere else): the same numbers as
        # the plain expression (2 z_half is exact) without a fresh state-sized tensor, whose page faults cost
        # more than the arithmetic on a CPU
        return [2 * zh - uh if zh.data_ptr() == uh.data_ptr() else uh.neg_().add_(zh, alpha=2)
                for zh, uh in zip(z_half, u_half, strict=True)]

    z0 = [torch.zeros_like(bi) for bi in problem.bias]
    skip_first = problem.bias_in_prox and problem.skip_zero_resolvent

    def step(state: tuple[Tiers, Tiers]) -> tuple[tuple[Tiers, Tiers], Tiers]:
        z, u = state
        if skip_first and z is z0 and u is z0:
            # from z = u = 0: u_half = 0, its resolvent 0, the reflection 0; only the prox of alpha b is left
            # (u stays the zero start, which is never written)
            z = problem.prox(ab)
            return (z, z0), z
        u_half = [zi.mul(2).sub_(ui) for zi, ui in zip(z, u, strict=True)]  # 2 z - u
        if problem.bias_in_prox:
            z_half = resolvent(u_half)
            u = reflect(z_half, u_half)
            z = problem.prox([ui + abi for ui, abi in zip(u, ab, strict=True)])
        else:
            z_half = resolvent([uh + abi for uh, abi in zip(u_half, ab, strict=True)])
            u = reflect(z_half, u_half)
            z = problem.prox(u)
        return (z, u), z

    return _iterate(step, (z0, z0), z0, tol, max_iter, stop_mode)


register_solver("peaceman_rachford", peaceman_rachford, kind="splitting")
register_solver("forward_backward", forward_backward, kind="splitting")


def tune_alpha(iters_at: Callable[[float], int], current: float, max_iter: int, *, start: float = 1.0,
               min_alpha: float = 1e-4) -> float:
    """The authors' alpha-tuning rule.

    Start from ``start``; halve alpha while the forward iteration count does not increase; keep the last alpha
    whose halving did not increase it. If that alpha's count is ``max_iter`` (in particular when every
    candidate from the start on hit the cap), keep ``current``. Halving stops once alpha / 2 would not exceed
    ``min_alpha`` (the authors' floor of 1e-4).

    Args:
        iters_at: forward iteration count of a solve at a given alpha (a failed, non-finite solve should
            count as ``max_iter``).
        current: the alpha in use, kept when tuning fails.
        max_iter: the solver's iteration cap.
        start: first candidate.
        min_alpha: floor of the search.

    Returns:
        The alpha to use from now on.
    """
    a = start
    n = iters_at(a)
    while a / 2 > min_alpha:
        n_half = iters_at(a / 2)
        if n_half > n:
            break
        a, n = a / 2, n_half
    return current if n >= max_iter else a


@dataclass
class ImplicitBackwardSpec:
    """What the implicit backward needs from the forward pass.

    Attributes:
        matvec: (z, transpose) -> W z or W^T z (called without gradient tracking).
        resolvent: the forward pass's resolvent object (``apply(r, transpose)``), or None when the backward
            solver needs none.
        active: per tier the 0/1 relu derivative at the output (border and inactive units 0).
        alpha: the splitting step the forward pass used (and the resolvent was built for).
        solver: the settings; the backward solve uses ``bwd_solver``, ``bwd_tol``, ``bwd_max_iter``.
        record: receives the backward :class:`SolverStats`.
    """

    matvec: Callable[[Tiers, bool], Tiers]
    resolvent: Any
    active: Tiers
    alpha: float
    solver: MondeqSolverConfig
    record: Callable[[SolverStats], None]


class _ImplicitGrad(torch.autograd.Function):
    """Identity on the tracked output relu(W z* + U x + b); its backward applies (I - W^T J)^-1.

    With J the relu derivative at z*, the gradient of the equilibrium output is
    g^T (I - J W)^-1 df/dtheta, so the incoming g is replaced by v = g + W^T u where u = J (W^T u + g): a
    linear monotone splitting problem with L = W^T and prox = multiplication by J.
    """

    @staticmethod
    def forward(ctx: Any, spec: ImplicitBackwardSpec, *out: Tensor) -> tuple[Tensor, ...]:
        ctx.spec = spec
        return tuple(o.view_as(o) for o in out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        spec: ImplicitBackwardSpec = ctx.spec
        with torch.no_grad():
            # unused outputs may come without a gradient
            g = [torch.zeros_like(a) if gr is None else gr for gr, a in zip(grads, spec.active, strict=True)]
            res = spec.resolvent
            problem = SplittingProblem(
                linear=lambda u: spec.matvec(u, True),
                resolvent=(lambda r: res.apply(r, transpose=True)) if res is not None else None,
                prox=lambda w: [wi * ji for wi, ji in zip(w, spec.active, strict=True)],
                bias=g,
                bias_in_prox=spec.solver.bwd_bias == "prox",
                skip_zero_resolvent=spec.solver.skip_zero_product,
            )
            cfg = spec.solver
            solve = get_solver(cfg.bwd_solver, kind="splitting")
            u, stats = solve(problem, spec.alpha, tol=cfg.bwd_tol, max_iter=cfg.bwd_max_iter,
                             stop_mode=cfg.stop_mode)
            wtu = spec.matvec(u, True)
            v = [gi + wi for gi, wi in zip(g, wtu, strict=True)]
        spec.record(stats)
        return (None, *v)


def implicit_backward(out: Tiers, spec: ImplicitBackwardSpec) -> Tiers:
    """Attach the implicit backward to the tracked equilibrium output (identity in the forward pass).

    Args:
        out: relu(W z* + U x + b) per tier, computed with z* detached and the parameters tracked.
        spec: the backward settings.

    Returns:
        The same values, whose gradient is routed through the implicit solve.
    """
    return list(_ImplicitGrad.apply(spec, *out))
