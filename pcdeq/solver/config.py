"""Solver settings every family shares (:class:`SolverConfig`): which registered solver runs forward and backward,
its tolerance, cap, stopping rule and residual-check schedule.

A family's own solver keys (pcDEQ's speed switches, monDEQ's ``alpha``, NODE's ``ode_*``) live in a subclass in the
family's package (e.g. :class:`pcdeq.families.mondeq.solver_config.MondeqSolverConfig`); the family's default
solver is an instance of it and the family reads only the keys its class declares. On the command line every key
is ``solver.<key>``: the ``solver`` config group's schema is this class's keys and every registered family's, flat
(:func:`pcdeq.training.schema.solver_schema`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pcdeq.errors import ConfigError
from pcdeq.solver import SolverFn, get_solver, solver_kind
from pcdeq.solver.precision import solve_in_precision
from pcdeq.solver.stats import SolverStats
from pcdeq.solver.stopping import EVERY_ITERATION, STOP_MODES, CheckSchedule, FixedPointMap, Tensor, check_solver_args

CHECKS = ("prior", "every", "periodic")
Settings = TypeVar("Settings", bound="SolverConfig")


@functools.cache
def _accepts(fn: SolverFn, name: str) -> bool:
    """Whether a registered solver takes the keyword argument ``name`` (cached: inspecting a signature costs
    about 0.25 ms, a tenth of a linear MNIST training step when done per solve)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclass
class SolverConfig:
    """Solver settings of every model family, forward and backward set independently.

    The ``solver`` config group, the families' models and layers all take it (or their family's subclass of it).
    Names are checked against the registry here; whether the kind of solver suits the model is checked by the
    model family.

    Attributes:
        fwd_solver / bwd_solver: registry names ("fixed_point", "anderson" for pcDEQ; "peaceman_rachford",
            "forward_backward" for monDEQ).
        fwd_tol / bwd_tol: tolerance on the relative step (0: run exactly max_iter iterations).
        fwd_max_iter / bwd_max_iter: iteration caps.
        stop_mode: "batch" (one whole-batch residual, the reference's and monDEQ's; the default) or "sample"
            (every sample's own residual below the tolerance).
        check: residual-check schedule of the map solvers, "prior" (first check one iteration before the last
            solve of the same kind stopped), "every" or "periodic" (every ``check_every`` iterations). See
            :class:`~pcdeq.solver.stopping.CheckSchedule`.
        check_every: the period of ``check=periodic``.
        skip_zero_product: the first iteration from the zero start skips the product with 0 (exactly 0): the same
            iterates, one product fewer per solve (the fixed-point families: pcDEQ's forward, monDEQ's
            Peaceman-Rachford backward with ``bwd_bias="prox"``).
    """

    # ``metadata["valid"]``: the range the training stack checks at startup (see pcdeq.training.validate)
    fwd_solver: str = "fixed_point"
    fwd_tol: float = field(default=1e-4, metadata={"valid": "[0, 1)", "example": "1e-4"})
    fwd_max_iter: int = field(default=200, metadata={"valid": "[1, inf)", "example": "200"})
    bwd_solver: str = "fixed_point"
    bwd_tol: float = field(default=1e-4, metadata={"valid": "[0, 1)", "example": "1e-4"})
    bwd_max_iter: int = field(default=200, metadata={"valid": "[1, inf)", "example": "200"})
    stop_mode: str = field(default="batch", metadata={"choices": STOP_MODES, "example": "batch"})
    check: str = field(default="prior", metadata={"choices": CHECKS, "example": "prior"})
    check_every: int = field(default=2, metadata={"valid": "[1, inf)", "example": "2"})
    skip_zero_product: bool = True

    def __post_init__(self) -> None:
        for which in ("fwd", "bwd"):
            solver_kind(getattr(self, f"{which}_solver"))
            tol, max_iter = getattr(self, f"{which}_tol"), getattr(self, f"{which}_max_iter")
            if isinstance(max_iter, float) and max_iter.is_integer():
                max_iter = int(max_iter)
                setattr(self, f"{which}_max_iter", max_iter)
            check_solver_args(tol, max_iter, self.stop_mode, key=f"solver.{which}_")
        check_choices(self, {"check": CHECKS})
        every: Any = self.check_every  # a float from a config file, e.g. 2.0
        if isinstance(every, float) and every.is_integer():
            self.check_every = int(every)
        if not (isinstance(self.check_every, int) and self.check_every >= 1):
            raise ConfigError(f"solver.check_every must be an integer >= 1, got {self.check_every!r} (e.g. 2)")

    @classmethod
    def of(cls: type[Settings], solver: SolverConfig) -> Settings:
        """``solver`` as this class: itself when it is one, else its shared keys with this class's defaults."""
        if isinstance(solver, cls):
            return solver
        return cls(**{f.name: getattr(solver, f.name) for f in dataclasses.fields(SolverConfig)})

    def schedule(self, previous: int | None = None) -> CheckSchedule:
        """The residual-check schedule of one solve; ``previous``: the length of the last solve of its kind."""
        if self.check == "periodic":
            return CheckSchedule(self.check_every, self.check_every)
        if self.check == "prior" and previous is not None:
            return CheckSchedule(max(1, previous - 1), 1)
        return EVERY_ITERATION

    def solve(self, which: str, f: FixedPointMap, z0: Tensor, *, previous: int | None = None,
              f_low: FixedPointMap | None = None, inplace: bool = False,
              precision: str = "off") -> tuple[Tensor, SolverStats]:
        """Run the forward ("fwd") or backward ("bwd") map solver on f from z0.

        Args:
            which: "fwd" or "bwd".
            f: the map, in z0's precision.
            z0: the starting point.
            previous: iterations of the last solve of the same kind in z0's precision (``check=prior``).
            f_low: the same map in bfloat16 (used when ``precision`` is "mixed" or "bf16"; None: not available,
                the whole solve runs in z0's precision).
            inplace: ``f`` returns fresh tensors (see :func:`~pcdeq.solver.fixed_point.fixed_point_iter`), so the
                solver may write in place.
            precision: one of :data:`~pcdeq.solver.precision.PRECISIONS` (see :mod:`pcdeq.solver.precision`).

        Returns:
            The fixed point (in z0's dtype) and the solve's statistics (``low_precision_iters`` counts the
            bfloat16 iterations; ``iters`` all of them).
        """
        name = getattr(self, f"{which}_solver")
        solver = get_solver(name, kind="map")
        tol, max_iter = getattr(self, f"{which}_tol"), getattr(self, f"{which}_max_iter")
        if precision == "off" or f_low is None:
            return self._run(solver, f, z0, tol, max_iter, self.schedule(previous), inplace)
        return solve_in_precision(lambda g, z, t, s, stall: self._run(solver, g, z, t, max_iter, s, inplace, stall),
                                  f, f_low, z0, tol, precision, self.schedule(previous))

    def _run(self, solver: SolverFn, f: FixedPointMap, z0: Tensor, tol: float, max_iter: int,
             schedule: CheckSchedule, inplace: bool, stall: bool = False) -> tuple[Tensor, SolverStats]:
        """Call a map solver with the options it accepts (the schedule and in-place options are fixed_point's)."""
        extra: dict[str, Any] = {}
        for key, value, default in (("schedule", schedule, EVERY_ITERATION), ("inplace", inplace, False),
                                    ("stall", stall, False)):
            if value != default and _accepts(solver, key):
                extra[key] = value
        return solver(f, z0, tol=tol, max_iter=max_iter, stop_mode=self.stop_mode, **extra)


def check_choices(settings: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """Raise ConfigError for a ``solver.<key>`` whose value is not one of its choices."""
    for key, valid in choices.items():
        if getattr(settings, key) not in valid:
            raise ConfigError(f"unknown solver.{key} {getattr(settings, key)!r}; valid choices: {', '.join(valid)}")
