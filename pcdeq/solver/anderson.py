"""Anderson acceleration (type II), solved per sample (registered as ``anderson``)."""

from __future__ import annotations

import math

import torch

from pcdeq.solver.stats import SolverStats
from pcdeq.solver.stopping import FixedPointMap, check_solver_args, finish_stats, relative_residual, tolerance_met

Tensor = torch.Tensor


def anderson(
    f: FixedPointMap,
    z0: Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    stop_mode: str = "sample",
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II) with memory ``m``, solved per sample.

    Each iterate mixes the last ``m`` evaluations with coefficients that minimise the residual
    ||G alpha|| subject to sum(alpha) = 1 (a small regularised KKT system per sample, ``lam`` is the
    Tikhonov term, ``beta`` the damping). The stopping residual is the relative step of the plain map
    at the current mixed point, so it is comparable with :func:`fixed_point_iter`.

    Args:
        f, z0, tol, max_iter, stop_mode: as in :func:`fixed_point_iter`.
        m: history size.
        lam: regularisation of the least-squares system.
        beta: mixing parameter (1 = undamped).

    Returns:
        The last iterate and a :class:`SolverStats`.
    """
    check_solver_args(tol, max_iter, stop_mode)
    if m < 2:  # the start-up below writes history slot 1, so m = 1 would index out of range
        raise ValueError(f"anderson memory m must be >= 2, got {m}")
    stats = SolverStats()
    bsz, shape = z0.shape[0], z0.shape
    n = z0[0].numel()
    X = z0.new_zeros(bsz, m, n)  # past points
    F = z0.new_zeros(bsz, m, n)  # f at past points
    X[:, 0] = z0.reshape(bsz, -1)
    F[:, 0] = f(z0).reshape(bsz, -1)
    stats.iters = 1
    z = F[:, 0].reshape(shape)
    res = relative_residual(F[:, 0].reshape(shape), z0, stop_mode)
    rmax = float(res.max())
    if not math.isfinite(rmax):  # non-finite values in z make the residual NaN (see fixed_point_iter)
        return z, finish_stats(stats, res, tol, nonfinite=True, batch_size=z0.shape[0])
    stats.record(1, rmax)
    if tolerance_met(rmax, tol) or max_iter == 1:
        per_sample = relative_residual(z, z0, "sample") if stop_mode == "batch" else None
        return z, finish_stats(stats, res, tol, nonfinite=False, batch_size=z0.shape[0], per_sample=per_sample)
    X[:, 1] = F[:, 0]
    F[:, 1] = f(X[:, 1].reshape(shape)).reshape(bsz, -1)
    stats.iters = 2
    k = 2
    while True:
        # The residual of the newest point decides whether to stop.
        newest = (k - 1) % m
        x_k, f_k = X[:, newest].reshape(shape), F[:, newest].reshape(shape)
        res = relative_residual(f_k, x_k, stop_mode)
        rmax = float(res.max())
        if not math.isfinite(rmax):
            return f_k, finish_stats(stats, res, tol, nonfinite=True, batch_size=z0.shape[0])
        stats.record(k, rmax)
        if tolerance_met(rmax, tol) or k >= max_iter:
            per_sample = relative_residual(f_k, x_k, "sample") if stop_mode == "batch" else None
            return f_k, finish_stats(stats, res, tol, nonfinite=False, batch_size=z0.shape[0], per_sample=per_sample)
        n_hist = min(k, m)
        G = F[:, :n_hist] - X[:, :n_hist]  # [B, n_hist, n]
        H = torch.zeros(bsz, n_hist + 1, n_hist + 1, dtype=z0.dtype, device=z0.device)
        H[:, 0, 1:] = H[:, 1:, 0] = 1
        H[:, 1:, 1:] = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n_hist, dtype=z0.dtype, device=z0.device)
        y = torch.zeros(bsz, n_hist + 1, 1, dtype=z0.dtype, device=z0.device)
        y[:, 0] = 1
        alpha = torch.linalg.solve(H, y)[:, 1:, 0]  # [B, n_hist]
        slot = k % m
        mixed = beta * (alpha[:, None] @ F[:, :n_hist])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n_hist])[:, 0]
        X[:, slot] = mixed
        F[:, slot] = f(mixed.reshape(shape)).reshape(bsz, -1)
        k += 1
        stats.iters = k
