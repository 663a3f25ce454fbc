"""monDEQ's solver keys: the splitting step ``alpha`` and its tuning, the backward's bias placement, how W is applied.

On the command line they are ``solver.<key>`` like the shared keys (the ``solver`` group's schema takes every
family's keys); only the monDEQ models read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pcdeq.errors import ConfigError
from pcdeq.solver.config import SolverConfig, check_choices

BWD_BIAS = ("prox", "resolvent")
MONDEQ_WS = ("frequency", "spatial")


@dataclass
class MondeqSolverConfig(SolverConfig):
    """The shared solver settings (:class:`~pcdeq.solver.config.SolverConfig`) and monDEQ's own.

    Attributes:
        alpha: step of the splitting solvers (tuned during training when ``alpha_tuning``).
        alpha_tuning: the authors' rule that retunes alpha at batch 30 and at mid-epoch.
        bwd_bias: where the Peaceman-Rachford backward adds the incoming gradient: "prox" (the authors' code) or
            "resolvent" (ours). Same solution; the iterates, and so the iteration counts, differ.
        mondeq_w: how the convolutional models apply W and W^T: "frequency" (per-frequency channel matrices, the
            spectra computed once per forward pass and shared with the resolvent; equal up to rounding) or
            "spatial" (circular convolutions, the plain path). The fully connected model has no frequency form
            and ignores it.
    """

    alpha: float = field(default=1.0, metadata={"valid": "(0, inf)", "example": "1.0"})
    alpha_tuning: bool = True
    bwd_bias: str = field(default="prox", metadata={"choices": BWD_BIAS, "example": "prox"})
    mondeq_w: str = field(default="frequency", metadata={"choices": MONDEQ_WS, "example": "frequency"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self, {"bwd_bias": BWD_BIAS})
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"solver.alpha must be a positive finite number, got {self.alpha!r} (e.g. 1.0)")
        check_choices(self, {"mondeq_w": MONDEQ_WS})
