"""What a solve did (:class:`SolverStats`) and the walk that gathers the last solves of a whole network.

Convention shared by all model families: an equilibrium module keeps ``last_stats`` (an instance attribute), a
dict with ``"forward"`` and ``"backward"`` mapping to a :class:`SolverStats`; :func:`collect_stats` summarises
them over every equilibrium module of a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
        history: the stopping residual after each checked iteration (max over samples in sample mode), used
            for the observed contraction ratio. Every iteration is checked unless the check schedule skips some.
        history_iters: the iteration number of each ``history`` entry (empty: 1, 2, ..., len(history)).
        low_precision_iters: how many of ``iters`` ran in bfloat16 (``solver.precision``).
    """

    iters: int = 0
    residual_mean: float = math.nan
    residual_max: float = math.nan
    converged: bool = False
    n_not_converged: int = 0
    nonfinite: bool = False
    history: list[float] = field(default_factory=list)
    history_iters: list[int] = field(default_factory=list)
    low_precision_iters: int = 0

    def iterations(self) -> list[int]:
        """The iteration number of each ``history`` entry."""
        if len(self.history_iters) == len(self.history):
            return list(self.history_iters)
        return list(range(1, len(self.history) + 1))

    def record(self, k: int, residual: float) -> None:
        """Add the stopping residual checked after iteration ``k``."""
        self.history.append(residual)
        self.history_iters.append(k)

    def contraction_ratio(self, last: int = 3) -> float:
        """Geometric mean of r_k / r_{k-1} over the last ``last`` iterations (nan when unavailable).

        With a check schedule that skips iterations the mean is taken per iteration between the checked ones.
        """
        pts = [(k, r) for k, r in zip(self.iterations(), self.history, strict=True) if r > 0 and math.isfinite(r)]
        if len(pts) < 2:
            return math.nan
        tail = pts[-(last + 1):]
        (k0, r0), (k1, r1) = tail[0], tail[-1]
        return (r1 / r0) ** (1.0 / (k1 - k0)) if k1 > k0 else math.nan



def _last_solves(model: torch.nn.Module, direction: str) -> list[SolverStats]:
    """The ``last_stats[direction]`` of every equilibrium module in ``model``, in module order."""
    return _solves_by_direction(model).get(direction, [])


def _solves_by_direction(model: torch.nn.Module) -> dict[str, list[SolverStats]]:
    """``{direction: [SolverStats, ...]}`` over the equilibrium modules of ``model`` in module order, one walk."""
    found: dict[str, list[SolverStats]] = {}
    for mod in model.modules():
        # vars(): a plain attribute; getattr on a module without it raises inside nn.Module.__getattr__ (slow)
        last = vars(mod).get("last_stats")
        if isinstance(last, dict):
            for direction, stats in last.items():
                if isinstance(stats, SolverStats):
                    found.setdefault(direction, []).append(stats)
    return found


def residual_histories(model: torch.nn.Module, direction: str = "forward") -> list[list[float]]:
    """The residual history of each equilibrium module's last solve in ``direction`` (see :func:`collect_stats`)."""
    return [list(s.history) for s in _last_solves(model, direction)]


def collect_stats(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Summarise the last solves of every equilibrium layer in ``model``.

    Convention shared by all model families: an equilibrium module keeps ``last_stats`` (an instance attribute),
    a dict with ``"forward"`` (set by its forward pass) and ``"backward"`` (set by its implicit backward) mapping
    to a :class:`SolverStats`. Iterations are averaged over layers (a multi-block network reports the mean
    solve length and the max over layers); residuals are maxed; non-converged counts are summed.

    Returns:
        ``{"forward": {...}, "backward": {...}}`` with keys iters, iters_max, residual_mean, residual_max,
        n_not_converged, nonfinite, contraction; a direction without any solve is omitted.
    """
    out: dict[str, dict[str, float]] = {}
    solves = _solves_by_direction(model)
    for key in ("forward", "backward"):
        items = solves.get(key)
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
