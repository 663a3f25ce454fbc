"""One ODE solve y(0) -> y(1) with torchdiffeq, its function-evaluation counts, and failures reported, not raised.

The Neural ODE family's counterpart of the fixed-point solvers: the forward solve records a
:class:`pcdeq.solver.stats.SolverStats` whose ``iters`` is the number of function evaluations (NFE); under gradient
tracking the backward records the adjoint solve's (BNFE, adjoint on) when it runs, as the implicit backward of the
equilibrium families does. A solve that torchdiffeq stops (step cap reached, step size underflow, non-finite
state) is not an exception: the forward returns NaN and records every sample as not converged (the training loop
then ends the run as diverged); a failed adjoint solve gives the ODE function's parameters no gradient for that
batch and records every sample as not converged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchdiffeq import odeint, odeint_adjoint

from pcdeq.solver import register_solver
from pcdeq.solver.stats import SolverStats

from .odefunc import ConvODEFunc
from .solver_config import NodeSolverConfig

Tensor = torch.Tensor
Recorder = Callable[[str, SolverStats], None]
log = logging.getLogger("pcdeq")

# torchdiffeq (0.2.x) stops an adaptive solve with an AssertionError carrying one of these messages
_STEP_CAP = "max_num_steps exceeded"
_NONFINITE = ("underflow in dt", "non-finite values in state")


def solve_failure(error: AssertionError) -> str | None:
    """The reason when ``error`` is torchdiffeq stopping a solve ("step cap" / "non-finite"); None otherwise."""
    text = str(error)
    if text.startswith(_STEP_CAP):
        return "step cap"
    if text.startswith(_NONFINITE):
        return "non-finite"
    return None


def solve_stats(nfe: int, batch_size: int, failure: str | None) -> SolverStats:
    """The statistics of one ODE solve: ``iters`` = NFE; no residual (an ODE solve has no fixed point)."""
    ok = failure is None
    return SolverStats(iters=nfe, converged=ok, n_not_converged=0 if ok else batch_size,
                       nonfinite=failure == "non-finite")


def _warn(direction: str, failure: str, solver: NodeSolverConfig, error: AssertionError) -> None:
    fix = (f"raise solver.ode_max_num_steps (now {solver.ode_max_num_steps}) or relax solver.ode_rtol/ode_atol"
           if failure == "step cap" else "lower optim.lr or check the inputs for NaN")
    log.warning("%s ODE solve stopped (%s): %s; %s", direction, failure, str(error).split(":")[0], fix)


@dataclass
class OdeRun:
    """A configured solve of ``func`` that reports its statistics through ``record(direction, stats)``."""

    func: ConvODEFunc
    solver: NodeSolverConfig
    record: Recorder

    def integrate(self, y0: Tensor, adjoint: bool) -> Tensor:
        """y(1) by torchdiffeq (``odeint_adjoint`` when ``adjoint``); AssertionError when torchdiffeq stops."""
        cfg = self.solver
        t = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)
        kwargs = {"rtol": cfg.ode_rtol, "atol": cfg.ode_atol, "method": cfg.ode_method,
                  "options": {"max_num_steps": cfg.ode_max_num_steps}}
        if adjoint:
            params = tuple(p for p in self.func.parameters() if p.requires_grad)
            return odeint_adjoint(self.func, y0, t, adjoint_params=params, **kwargs)[1]
        return odeint(self.func, y0, t, **kwargs)[1]

    def forward(self, y0: Tensor, adjoint: bool) -> Tensor:
        """y(1), or NaN of y0's shape when the solve failed; records the forward statistics."""
        start = self.func.evaluations
        failure = None
        try:
            y1 = self.integrate(y0, adjoint)
        except AssertionError as e:
            failure = solve_failure(e)
            if failure is None:
                raise
            _warn("forward", failure, self.solver, e)
            y1 = torch.full_like(y0, math.nan)
        if failure is None and not bool(torch.isfinite(y1).all()):
            failure = "non-finite"
        self.record("forward", solve_stats(self.func.evaluations - start, y0.shape[0], failure))
        return y1


class _TrackedSolve(torch.autograd.Function):
    """y(1) with its gradient (adjoint or through the solver), the backward's failures and NFE recorded.

    The solve's own graph is built inside ``forward`` and differentiated in ``backward``, so a failing adjoint
    solve can be caught there and the backward's evaluations counted exactly.
    """

    @staticmethod
    def forward(ctx, run: OdeRun, y0: Tensor, *params: Tensor) -> Tensor:
        with torch.enable_grad():
            start = y0.detach().requires_grad_(y0.requires_grad)
            y1 = run.forward(start, adjoint=run.solver.ode_adjoint)
        ctx.run, ctx.start, ctx.y1, ctx.params = run, start, y1, params
        return y1.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        run, start, y1 = ctx.run, ctx.start, ctx.y1
        wants_y0 = start.requires_grad
        inputs = ([start] if wants_y0 else []) + list(ctx.params)
        grads: list[Tensor | None] = [None] * len(inputs)
        if y1.requires_grad:  # not after a failed forward solve (its NaN output has no graph)
            evaluations = run.func.evaluations
            failure = None
            try:
                grads = list(torch.autograd.grad(y1, inputs, grad, allow_unused=True))
            except AssertionError as e:
                failure = solve_failure(e)
                if failure is None:
                    raise
                _warn("adjoint", failure, run.solver, e)
            if run.solver.ode_adjoint:  # backpropagation through the solver evaluates no f
                run.record("backward", solve_stats(run.func.evaluations - evaluations, grad.shape[0], failure))
        grad_y0 = grads.pop(0) if wants_y0 else None
        return (None, grad_y0, *grads)


def solve_ode(func: ConvODEFunc, y0: Tensor, solver: NodeSolverConfig, record: Recorder) -> Tensor:
    """The state at t = 1 of dy/dt = func(t, y), y(0) = ``y0`` (the registered "torchdiffeq" solver).

    Args:
        func: the ODE function (its ``evaluations`` counter gives the NFE).
        y0: the initial state [B, ...].
        solver: the ``ode_*`` settings (method, rtol, atol, adjoint, step cap).
        record: called with ("forward", stats) after the solve and, under gradient tracking, with
            ("backward", stats) when the adjoint solve has run.

    Returns:
        y(1), tracked when grad mode is on and y0 or func's parameters require grad; NaN when the solve failed.
    """
    params = tuple(p for p in func.parameters() if p.requires_grad)
    run = OdeRun(func, solver, record)
    if not (torch.is_grad_enabled() and (y0.requires_grad or params)):
        with torch.no_grad():
            return run.forward(y0, adjoint=False)
    return _TrackedSolve.apply(run, y0, *params)


def ode_solver(func: ConvODEFunc, y0: Tensor, *, solver: NodeSolverConfig,
               record: Recorder | None = None) -> tuple[Tensor, SolverStats]:
    """:func:`solve_ode` in the registry's ``(solution, stats)`` form: y(1) and the forward solve's statistics
    (``record``, if given, receives every record, the backward's included)."""
    seen: dict[str, SolverStats] = {}

    def keep(direction: str, stats: SolverStats) -> None:
        seen[direction] = stats
        if record is not None:
            record(direction, stats)

    y1 = solve_ode(func, y0, solver, keep)
    return y1, seen["forward"]


register_solver("torchdiffeq", ode_solver, kind="ode")
