"""The stopping rule and the residual-check schedule every fixed-point loop shares.

Stopping rule: the relative step ``||z_{k+1} - z_k|| / (||z_{k+1}|| + eps)``, over the whole batch
(``stop_mode="batch"``) or per sample (``"sample"``); a tolerance of 0 is never met. :class:`CheckSchedule` says
after which iterations a loop checks it; :func:`finish_stats` fills a solve's final statistics.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pcdeq.errors import ConfigError
from pcdeq.solver.stats import SolverStats

Tensor = torch.Tensor
FixedPointMap = Callable[[Tensor], Tensor]

STOP_MODES = ("sample", "batch")
REL_EPS = 1e-5  # the reference's denominator guard ||z|| + 1e-5


def relative_residual(z_new: Tensor, z_old: Tensor, stop_mode: str = "sample") -> Tensor:
    """Relative step per sample (shape [B]) or for the whole batch (shape [1])."""
    return _relative(z_new - z_old, z_new, stop_mode)


def _relative(diff: Tensor, z_new: Tensor, stop_mode: str) -> Tensor:
    """The relative step from the difference of two iterates (see :func:`relative_residual`)."""
    if stop_mode == "batch":
        num = torch.linalg.vector_norm(diff).reshape(1)
        den = torch.linalg.vector_norm(z_new).reshape(1)
    else:
        # reduce over the non-batch dims in place: flatten(1) would copy a channels-last tensor first (about 6x
        # the cost of the norm itself for a conv iterate)
        dims = tuple(range(1, diff.dim()))
        num = torch.linalg.vector_norm(diff, dim=dims)
        den = torch.linalg.vector_norm(z_new, dim=dims)
    return num / (den + REL_EPS)


def check_solver_args(tol: float, max_iter: int, stop_mode: str, key: str = "") -> None:
    """Validate solver settings; ``key`` prefixes the names in the message (e.g. "solver.fwd_")."""
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ConfigError(f"{key}tol must be a finite number >= 0 (0: run exactly max_iter iterations), got "
                          f"{tol!r} (e.g. {key}tol=1e-4)")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ConfigError(f"{key}max_iter must be an integer >= 1, got {max_iter!r} (e.g. {key}max_iter=200)")
    if stop_mode not in STOP_MODES:
        raise ConfigError(f"unknown stop_mode {stop_mode!r}; valid choices: {', '.join(STOP_MODES)}")


def tolerance_met(residual: float, tol: float) -> bool:
    """The stopping rule: residual <= tol; a tolerance of 0 is never met (the solve runs max_iter iterations)."""
    return tol > 0 and residual <= tol


_FULL_HISTORY: contextvars.ContextVar[bool] = contextvars.ContextVar("pcdeq_full_history", default=False)


@contextmanager
def full_history() -> Iterator[None]:
    """Check the residual after every iteration inside this block, whatever the schedule (complete histories)."""
    token = _FULL_HISTORY.set(True)
    try:
        yield
    finally:
        _FULL_HISTORY.reset(token)


@dataclass(frozen=True)
class CheckSchedule:
    """After which iterations a solver checks its residual: ``first``, then every ``every`` iterations.

    The last allowed iteration is always checked (by the solvers), and inside :func:`full_history` every one is.
    """

    first: int = 1
    every: int = 1

    def due(self, k: int) -> bool:
        """Whether the residual is checked after iteration ``k`` (1-based)."""
        if _FULL_HISTORY.get():
            return True
        return k >= self.first and (k - self.first) % self.every == 0


EVERY_ITERATION = CheckSchedule()


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
