"""Fixed-point solvers for z = f(z), one registry, one stats record.

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
``max_iter`` is reported through ``converged=False`` and ``n_not_converged``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pcdeq.errors import ConfigError

Tensor = torch.Tensor
FixedPointMap = Callable[[Tensor], Tensor]

STOP_MODES = ("sample", "batch")
BWD_BIAS = ("prox", "resolvent")
REL_EPS = 1e-5  # the reference's denominator guard ||z|| + 1e-5


@dataclass
class SolverStats:
    """What one solve did.

    Attributes:
        iters: number of applications of f performed.
        residual_mean: per-sample relative residual of the last step, mean over samples.
        residual_max: per-sample relative residual of the last step, max over samples.
        converged: the stopping rule was met with finite values (every sample in sample mode, the whole-batch
            residual in batch mode).
        n_not_converged: samples above the tolerance at the end (all of them when non-finite; in batch
            mode, the whole batch when the batch criterion failed, 0 when it was met).
        nonfinite: a NaN or Inf appeared; the solve stopped there.
        history: the stopping residual after each iteration (max over samples in sample mode), used for the
            observed contraction ratio.
    """

    iters: int = 0
    residual_mean: float = math.nan
    residual_max: float = math.nan
    converged: bool = False
    n_not_converged: int = 0
    nonfinite: bool = False
    history: list[float] = field(default_factory=list)

    def contraction_ratio(self, last: int = 3) -> float:
        """Geometric mean of r_k / r_{k-1} over the last ``last`` iterations (nan when unavailable)."""
        h = [r for r in self.history if r > 0 and math.isfinite(r)]
        if len(h) < 2:
            return math.nan
        tail = h[-(last + 1):]
        return (tail[-1] / tail[0]) ** (1.0 / (len(tail) - 1))


def relative_residual(z_new: Tensor, z_old: Tensor, stop_mode: str = "sample") -> Tensor:
    """Relative step per sample (shape [B]) or for the whole batch (shape [1])."""
    if stop_mode == "batch":
        num = (z_new - z_old).norm().reshape(1)
        den = z_new.norm().reshape(1)
    else:
        diff = (z_new - z_old).flatten(1)
        num = diff.norm(dim=1)
        den = z_new.flatten(1).norm(dim=1)
    return num / (den + REL_EPS)


def check_solver_args(tol: float, max_iter: int, stop_mode: str, key: str = "") -> None:
    """Validate solver settings; ``key`` prefixes the names in the message (e.g. "solver.fwd_")."""
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ConfigError(f"{key}tol must be a positive finite number, got {tol!r} (e.g. {key}tol=1e-4)")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ConfigError(f"{key}max_iter must be an integer >= 1, got {max_iter!r} (e.g. {key}max_iter=200)")
    if stop_mode not in STOP_MODES:
        raise ConfigError(f"unknown stop_mode {stop_mode!r}; valid choices: {', '.join(STOP_MODES)}")


def finish_stats(stats: SolverStats, res: Tensor, tol: float, nonfinite: bool, batch_size: int,
                 per_sample: Tensor | None = None) -> SolverStats:
    """Fill the final fields of ``stats`` from the last residual ``res``.

    ``res`` holds one residual per sample (per-sample mode) or one for the whole batch (batch mode). In batch
    mode the stopping decision is one for the batch, so a failed solve counts every sample of the batch as not
    converged: a failure is never reported as 0. ``per_sample`` (batch mode) holds the per-sample residuals of
    the last step, which give ``residual_mean`` / ``residual_max``.
    """
    stats.nonfinite = nonfinite
    if nonfinite:
        stats.converged = False
        stats.n_not_converged = batch_size
        stats.residual_mean = stats.residual_max = math.nan
        return stats
    shown = res if per_sample is None else per_sample
    stats.residual_mean = float(shown.mean())
    stats.residual_max = float(shown.max())
    bad = int((res > tol).sum())
    stats.n_not_converged = bad if res.numel() == batch_size else (batch_size if bad else 0)
    stats.converged = bad == 0
    return stats


def _batch_size(z: Tensor, stop_mode: str) -> int:
    return z.shape[0] if stop_mode == "sample" else 1


def fixed_point_iter(
    f: FixedPointMap, z0: Tensor, *, tol: float = 1e-4, max_iter: int = 200, stop_mode: str = "sample"
) -> tuple[Tensor, SolverStats]:
    """Plain (Picard) iteration z_{k+1} = f(z_k), the paper's solver.

    Args:
        f: the map whose fixed point is sought.
        z0: starting point (its shape is the iterate's shape; dim 0 is the batch).
        tol: tolerance on the relative step.
        max_iter: maximum number of applications of f.
        stop_mode: "sample" (every sample below tol) or "batch" (the reference's whole-batch norm).

    Returns:
        The last iterate and a :class:`SolverStats`.
    """
    check_solver_args(tol, max_iter, stop_mode)
    stats = SolverStats()
    z = z0
    res = torch.full((_batch_size(z0, stop_mode),), math.inf, device=z0.device)
    z_prev = z0
    for k in range(1, max_iter + 1):
        z_new = f(z)
        res = relative_residual(z_new, z, stop_mode)
        stats.iters = k
        # One host sync per iteration: the stopping decision needs it. A NaN or Inf anywhere in z_new makes its
        # sample's residual NaN (inf / inf), and max propagates NaN, so this one check also catches non-finite z.
        rmax = float(res.max())
        if not math.isfinite(rmax):
            return z_new, finish_stats(stats, res, tol, nonfinite=True, batch_size=z0.shape[0])
        stats.history.append(rmax)
        z_prev, z = z, z_new
        if rmax <= tol:
            break
    per_sample = relative_residual(z, z_prev, "sample") if stop_mode == "batch" else None
    return z, finish_stats(stats, res, tol, nonfinite=False, batch_size=z0.shape[0], per_sample=per_sample)


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
    stats.history.append(rmax)
    if rmax <= tol or max_iter == 1:
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
        stats.history.append(rmax)
        if rmax <= tol or k >= max_iter:
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


SolverFn = Callable[..., tuple[Any, SolverStats]]
SOLVERS: dict[str, SolverFn] = {}
SOLVER_KINDS: dict[str, str] = {}  # name -> the problem the solver takes: "map" (z = f(z)) or "splitting"


def register_solver(name: str, fn: SolverFn, kind: str = "map") -> None:
    """Make ``fn`` available by name.

    Args:
        name: registry key (``solver.fwd_solver`` / ``solver.bwd_solver`` in the configs).
        fn: the solver. Kind "map": ``fn(f, z0, *, tol, max_iter, stop_mode)`` as :func:`fixed_point_iter`;
            kind "splitting": ``fn(problem, alpha, *, tol, max_iter, stop_mode)`` as monDEQ's
            :func:`pcdeq.mondeq.splitting.peaceman_rachford`.
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


@dataclass
class SolverConfig:
    """Solver settings of every model family, forward and backward set independently.

    This is the one shape of solver settings: the ``solver`` config group, the pcDEQ layer and the monDEQ
    model all take it. Names are checked against the registry here; whether the kind of solver suits the
    model is checked by the model family.

    Attributes:
        fwd_solver / bwd_solver: registry names ("fixed_point", "anderson" for pcDEQ; "peaceman_rachford",
            "forward_backward" for monDEQ).
        fwd_tol / bwd_tol: tolerance on the relative step.
        fwd_max_iter / bwd_max_iter: iteration caps.
        stop_mode: "batch" (one whole-batch residual, the reference's and monDEQ's; the default) or "sample"
            (every sample's own residual below the tolerance).
        alpha: step of the splitting solvers (monDEQ; tuned during training when ``alpha_tuning``).
        alpha_tuning: monDEQ's rule that retunes alpha at batch 30 and at mid-epoch.
        bwd_bias: where monDEQ's Peaceman-Rachford backward adds the incoming gradient: "prox" (the authors'
            code) or "resolvent" (ours). Same solution; the iterates, and so the iteration counts, differ.
    """

    # ``metadata["valid"]``: the range the training stack checks at startup (see pcdeq.training.validate)
    fwd_solver: str = "fixed_point"
    fwd_tol: float = field(default=1e-4, metadata={"valid": "(0, 1)", "example": "1e-4"})
    fwd_max_iter: int = field(default=200, metadata={"valid": "[1, inf)", "example": "200"})
    bwd_solver: str = "fixed_point"
    bwd_tol: float = field(default=1e-4, metadata={"valid": "(0, 1)", "example": "1e-4"})
    bwd_max_iter: int = field(default=200, metadata={"valid": "[1, inf)", "example": "200"})
    stop_mode: str = field(default="batch", metadata={"choices": STOP_MODES, "example": "batch"})
    alpha: float = field(default=1.0, metadata={"valid": "(0, inf)", "example": "1.0"})
    alpha_tuning: bool = True
    bwd_bias: str = field(default="prox", metadata={"choices": BWD_BIAS, "example": "prox"})

    def __post_init__(self) -> None:
        for which in ("fwd", "bwd"):
            solver_kind(getattr(self, f"{which}_solver"))
            tol, max_iter = getattr(self, f"{which}_tol"), getattr(self, f"{which}_max_iter")
            if isinstance(max_iter, float) and max_iter.is_integer():
                max_iter = int(max_iter)
                setattr(self, f"{which}_max_iter", max_iter)
            check_solver_args(tol, max_iter, self.stop_mode, key=f"solver.{which}_")
        if self.bwd_bias not in BWD_BIAS:
            raise ConfigError(f"unknown solver.bwd_bias {self.bwd_bias!r}; valid choices: {', '.join(BWD_BIAS)}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"solver.alpha must be a positive finite number, got {self.alpha!r} (e.g. 1.0)")

    def solve(self, which: str, f: FixedPointMap, z0: Tensor) -> tuple[Tensor, SolverStats]:
        """Run the forward ("fwd") or backward ("bwd") map solver on f from z0."""
        solver = get_solver(getattr(self, f"{which}_solver"), kind="map")
        return solver(
            f, z0, tol=getattr(self, f"{which}_tol"), max_iter=getattr(self, f"{which}_max_iter"),
            stop_mode=self.stop_mode,
        )


def _last_solves(model: torch.nn.Module, direction: str) -> list[SolverStats]:
    """The ``last_stats[direction]`` of every equilibrium module in ``model``, in module order."""
    found = []
    for mod in model.modules():
        last = getattr(mod, "last_stats", None)
        if isinstance(last, dict) and isinstance(last.get(direction), SolverStats):
            found.append(last[direction])
    return found


def residual_histories(model: torch.nn.Module, direction: str = "forward") -> list[list[float]]:
    """The residual history of each equilibrium module's last solve in ``direction`` (see :func:`collect_stats`)."""
    return [list(s.history) for s in _last_solves(model, direction)]


def collect_stats(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Summarise the last solves of every equilibrium layer in ``model``.

    Convention shared by all model families: an equilibrium module keeps ``last_stats``, a dict with
    ``"forward"`` (set by its forward pass) and ``"backward"`` (set by its implicit backward) mapping to a
    :class:`SolverStats`. Iterations are averaged over layers (a multi-block network reports the mean
    solve length and the max over layers); residuals are maxed; non-converged counts are summed.

    Returns:
        ``{"forward": {...}, "backward": {...}}`` with keys iters, iters_max, residual_mean, residual_max,
        n_not_converged, nonfinite, contraction; a direction without any solve is omitted.
    """
    out: dict[str, dict[str, float]] = {}
    for key in ("forward", "backward"):
        items = _last_solves(model, key)
        if not items:
            continue
        out[key] = {
            "iters": sum(s.iters for s in items) / len(items),
            "iters_max": float(max(s.iters for s in items)),
            "residual_mean": max(s.residual_mean for s in items),
            "residual_max": max(s.residual_max for s in items),
            "n_not_converged": float(sum(s.n_not_converged for s in items)),
            "nonfinite": float(any(s.nonfinite for s in items)),
            "contraction": max(s.contraction_ratio() for s in items),
        }
    return out
