"""The Neural ODE family's solver keys: torchdiffeq's method, tolerances, adjoint switch and step cap (``ode_*``).

On the command line they are ``solver.<key>`` like the shared keys (the ``solver`` group's schema takes every
family's keys); only the NODE models read them (the fixed-point families ignore them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pcdeq.errors import ConfigError
from pcdeq.solver.config import SolverConfig, check_choices

# torchdiffeq's adaptive methods (fixed-step methods would need a step size setting)
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


@dataclass
class NodeSolverConfig(SolverConfig):
    """The shared solver settings (:class:`~pcdeq.solver.config.SolverConfig`) and the ODE solve's.

    Attributes:
        ode_method: torchdiffeq's adaptive method, one of :data:`ODE_METHODS` (the ANODE paper: dopri5).
        ode_rtol / ode_atol: its relative and absolute error tolerances (> 0), forward and adjoint solve.
        ode_adjoint: gradients by the adjoint ODE (memory independent of the steps; the ANODE paper) or, off,
            by backpropagation through the solver's steps.
        ode_max_num_steps: the cap on adaptive steps of each solve; a solve that reaches it is reported as not
            converged.
    """

    ode_method: str = field(default="dopri5", metadata={"choices": ODE_METHODS, "example": "dopri5"})
    ode_rtol: float = field(default=1e-3, metadata={"valid": "(0, 1)", "example": "1e-3"})
    ode_atol: float = field(default=1e-3, metadata={"valid": "(0, inf)", "example": "1e-3"})
    ode_adjoint: bool = True
    ode_max_num_steps: int = field(default=1000, metadata={"valid": "[1, inf)", "example": "1000"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self, {"ode_method": ODE_METHODS})
        # the same ranges as the declarations, for library use outside the training stack
        for key, upper in (("ode_rtol", 1.0), ("ode_atol", math.inf)):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < upper):
                bound = "in (0, 1)" if upper == 1.0 else "> 0"
                raise ConfigError(f"solver.{key}={value!r}: out of range; valid: a number {bound}, "
                                  f"e.g. solver.{key}=1e-3")
        steps: Any = self.ode_max_num_steps
        if isinstance(steps, float) and steps.is_integer():
            self.ode_max_num_steps = steps = int(steps)
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ConfigError(f"solver.ode_max_num_steps={steps!r}: out of range; valid: an integer >= 1, "
                              "e.g. solver.ode_max_num_steps=1000")
