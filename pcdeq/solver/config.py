"""Solver settings (:class:`SolverConfig`): which registered solver runs forward and backward, and how."""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from pcdeq.errors import ConfigError
from pcdeq.solver import SolverFn, get_solver, solver_kind
from pcdeq.solver.precision import solve_in_precision
from pcdeq.solver.stats import SolverStats
from pcdeq.solver.stopping import EVERY_ITERATION, STOP_MODES, CheckSchedule, FixedPointMap, Tensor, check_solver_args

BWD_BIAS = ("prox", "resolvent")
BACKWARDS = ("implicit", "unrolled")
JACOBIANS = ("analytic", "autograd")
WEIGHT_GRADS = ("direct", "autograd")
CHECKS = ("prior", "every", "periodic")
PRECISIONS = ("off", "mixed", "bf16")
EVAL_OUTPUTS = ("last", "apply")
MONDEQ_WS = ("frequency", "spatial")
# torchdiffeq's adaptive methods (the Neural ODE family; fixed-step methods would need a step size setting)
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


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

    This is the one shape of solver settings: the ``solver`` config group, the pcDEQ layer and the monDEQ
    model all take it. Names are checked against the registry here; whether the kind of solver suits the
    model is checked by the model family.

    Attributes:
        fwd_solver / bwd_solver: registry names ("fixed_point", "anderson" for pcDEQ; "peaceman_rachford",
            "forward_backward" for monDEQ).
        fwd_tol / bwd_tol: tolerance on the relative step (0: run exactly max_iter iterations).
        fwd_max_iter / bwd_max_iter: iteration caps.
        stop_mode: "batch" (one whole-batch residual, the reference's and monDEQ's; the default) or "sample"
            (every sample's own residual below the tolerance).
        alpha: step of the splitting solvers (monDEQ; tuned during training when ``alpha_tuning``).
        alpha_tuning: monDEQ's rule that retunes alpha at batch 30 and at mid-epoch.
        bwd_bias: where monDEQ's Peaceman-Rachford backward adds the incoming gradient: "prox" (the authors'
            code) or "resolvent" (ours). Same solution; the iterates, and so the iteration counts, differ.

    Performance switches (each measurable on its own, ``make bench``; the defaults are the fastest exact path):
        backward: "implicit" (the implicit-function gradient, memory independent of the iterations) or
            "unrolled" (backpropagation through every forward iteration: for memory comparisons and gradient
            tests; pcDEQ).
        jacobian: J^T u in the implicit backward by the closed form W^T (sigma' * u) ("analytic") or by
            autograd through a tracked application ("autograd", the plain path); pcDEQ.
        weight_grad: the gradient of W by one weight-gradient call per solve ("direct") or through the graph of
            a tracked application ("autograd", the plain path); pcDEQ.
        check: residual-check schedule, "prior" (first check one iteration before the last solve of the same
            kind stopped), "every" or "periodic" (every ``check_every`` iterations). See :class:`CheckSchedule`.
        check_every: the period of ``check=periodic``.
        precision: "off" (the model's dtype throughout), "mixed" (bfloat16 iterations, then the model's dtype to
            the same tolerance: the same fixed point) or "bf16" (bfloat16 only, approximate). pcDEQ. Off by
            default: CPUs without bfloat16 units (no AVX512-BF16/AMX) run a bfloat16 convolution slower than a
            float32 one; on GPUs with bfloat16 units, try mixed.
        inplace: untracked iterations write their sums, activations and residual differences in place (pcDEQ).
        compile: torch.compile the untracked iteration step (pcDEQ; seconds of compilation per shape).
        eval_output: the layer's output in evaluation (no gradient): the solver's "last" iterate, or "apply" one
            more application to it as training does (pcDEQ; they differ by at most one step's change, within
            the tolerance).
        train_output: the layer's output in training with ``weight_grad="direct"``: the solver's "last" iterate
            z*, or "apply" one more application g(z*) (the reference's output, the plain path). Both have the same
            implicit gradient formula (dg(z*)/dtheta = dz*/dtheta at a fixed point); "last" saves one application
            per training step and differs by at most one step's change, within the tolerance (pcDEQ; with
            ``precision="bf16"`` the output is always applied in full precision). Opt-in: on the multi conv MNIST
            network at the paper's tolerance its gradients differed from the reference's by 6.6e-3 relative in
            the last block's v (``results/bench/cpu_train_output_last.txt``), over the 1e-3 we hold the default to.
        cache_weight: in evaluation, reuse W = g v / ||v|| while g and v are unchanged (pcDEQ).
        skip_zero_product: the first forward iteration from the zero start is sigma(x~) without computing W 0
            (exactly 0): the same iterates, one product fewer per forward solve, and no zero tensor filled
            (pcDEQ); for monDEQ, the first step of the Peaceman-Rachford backward with ``bwd_bias="prox"`` skips
            its resolvent of 0.
        mondeq_w: how the convolutional monDEQ models apply W and W^T: "frequency" (per-frequency channel
            matrices, the spectra computed once per forward pass and shared with the resolvent; equal up to
            rounding) or "spatial" (circular convolutions, the plain path). The fully connected model has
            no frequency form and ignores it.

    ODE solve (the Neural ODE family, :mod:`pcdeq.families.node`; the fixed-point families ignore these):
        ode_method: torchdiffeq's adaptive method, one of :data:`ODE_METHODS` (the ANODE paper: dopri5).
        ode_rtol / ode_atol: its relative and absolute error tolerances (> 0), forward and adjoint solve.
        ode_adjoint: gradients by the adjoint ODE (memory independent of the steps; the ANODE paper) or, off,
            by backpropagation through the solver's steps.
        ode_max_num_steps: the cap on adaptive steps of each solve; a solve that reaches it is reported as not
            converged.
    """

    # ``metadata["valid"]``: the range the training stack checks at startup (see pcdeq.training.validate)
    fwd_solver: str = "fixed_point"
    fwd_tol: float = field(default=1e-4, metadata={"valid": "[0, 1)", "example": "1e-4"})
    fwd_max_iter: int = field(default=200, metadata={"valid": "[1, inf)", "example": "200"})
    bwd_solver: str = "fixed_point"
    bwd_tol: float = field(default=1e-4, metadata={"valid": "[0, 1)", "example": "1e-4"})
    bwd_max_iter: int = field(default=200, metadata={"valid": "[1, inf)", "example": "200"})
    stop_mode: str = field(default="batch", metadata={"choices": STOP_MODES, "example": "batch"})
    alpha: float = field(default=1.0, metadata={"valid": "(0, inf)", "example": "1.0"})
    alpha_tuning: bool = True
    bwd_bias: str = field(default="prox", metadata={"choices": BWD_BIAS, "example": "prox"})
    backward: str = field(default="implicit", metadata={"choices": BACKWARDS, "example": "implicit"})
    jacobian: str = field(default="analytic", metadata={"choices": JACOBIANS, "example": "analytic"})
    weight_grad: str = field(default="direct", metadata={"choices": WEIGHT_GRADS, "example": "direct"})
    check: str = field(default="prior", metadata={"choices": CHECKS, "example": "prior"})
    check_every: int = field(default=2, metadata={"valid": "[1, inf)", "example": "2"})
    precision: str = field(default="off", metadata={"choices": PRECISIONS, "example": "off"})
    inplace: bool = True
    compile: bool = False
    eval_output: str = field(default="last", metadata={"choices": EVAL_OUTPUTS, "example": "last"})
    train_output: str = field(default="apply", metadata={"choices": EVAL_OUTPUTS, "example": "apply"})
    cache_weight: bool = True
    skip_zero_product: bool = True
    mondeq_w: str = field(default="frequency", metadata={"choices": MONDEQ_WS, "example": "frequency"})
    ode_method: str = field(default="dopri5", metadata={"choices": ODE_METHODS, "example": "dopri5"})
    ode_rtol: float = field(default=1e-3, metadata={"valid": "(0, 1)", "example": "1e-3"})
    ode_atol: float = field(default=1e-3, metadata={"valid": "(0, inf)", "example": "1e-3"})
    ode_adjoint: bool = True
    ode_max_num_steps: int = field(default=1000, metadata={"valid": "[1, inf)", "example": "1000"})

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
        for key, choices in (("backward", BACKWARDS), ("jacobian", JACOBIANS), ("weight_grad", WEIGHT_GRADS),
                             ("check", CHECKS), ("precision", PRECISIONS), ("eval_output", EVAL_OUTPUTS),
                             ("train_output", EVAL_OUTPUTS), ("mondeq_w", MONDEQ_WS), ("ode_method", ODE_METHODS)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"unknown solver.{key} {getattr(self, key)!r}; valid choices: {', '.join(choices)}")
        every: Any = self.check_every  # a float from a config file, e.g. 2.0
        if isinstance(every, float) and every.is_integer():
            self.check_every = int(every)
        if not (isinstance(self.check_every, int) and self.check_every >= 1):
            raise ConfigError(f"solver.check_every must be an integer >= 1, got {self.check_every!r} (e.g. 2)")
        self._check_ode()

    def _check_ode(self) -> None:
        """The ODE keys (the same ranges as their declarations, for library use outside the training stack)."""
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

    def schedule(self, previous: int | None = None) -> CheckSchedule:
        """The residual-check schedule of one solve; ``previous``: the length of the last solve of its kind."""
        if self.check == "periodic":
            return CheckSchedule(self.check_every, self.check_every)
        if self.check == "prior" and previous is not None:
            return CheckSchedule(max(1, previous - 1), 1)
        return EVERY_ITERATION

    def solve(self, which: str, f: FixedPointMap, z0: Tensor, *, previous: int | None = None,
              f_low: FixedPointMap | None = None, inplace: bool = False) -> tuple[Tensor, SolverStats]:
        """Run the forward ("fwd") or backward ("bwd") map solver on f from z0.

        Args:
            which: "fwd" or "bwd".
            f: the map, in z0's precision.
            z0: the starting point.
            previous: iterations of the last solve of the same kind in z0's precision (``check=prior``).
            f_low: the same map in bfloat16 (used when ``precision`` is "mixed" or "bf16"; None: not available,
                the whole solve runs in z0's precision).
            inplace: ``f`` returns fresh tensors (see :func:`fixed_point_iter`), so the solver may write in place.

        Returns:
            The fixed point (in z0's dtype) and the solve's statistics (``low_precision_iters`` counts the
            bfloat16 iterations; ``iters`` all of them).
        """
        name = getattr(self, f"{which}_solver")
        solver = get_solver(name, kind="map")
        tol, max_iter = getattr(self, f"{which}_tol"), getattr(self, f"{which}_max_iter")
        if self.precision == "off" or f_low is None:
            return self._run(solver, f, z0, tol, max_iter, self.schedule(previous), inplace)
        return solve_in_precision(lambda g, z, t, s, stall: self._run(solver, g, z, t, max_iter, s, inplace, stall),
                                  f, f_low, z0, tol, self.precision, self.schedule(previous))

    def _run(self, solver: SolverFn, f: FixedPointMap, z0: Tensor, tol: float, max_iter: int,
             schedule: CheckSchedule, inplace: bool, stall: bool = False) -> tuple[Tensor, SolverStats]:
        """Call a map solver with the options it accepts (the schedule and in-place options are fixed_point's)."""
        extra: dict[str, Any] = {}
        for key, value, default in (("schedule", schedule, EVERY_ITERATION), ("inplace", inplace, False),
                                    ("stall", stall, False)):
            if value != default and _accepts(solver, key):
                extra[key] = value
        return solver(f, z0, tol=tol, max_iter=max_iter, stop_mode=self.stop_mode, **extra)
