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
``max_iter`` is reported through ``converged=False`` and ``n_not_converged``. ``tol=0`` never stops early: the
solve runs exactly ``max_iter`` iterations (benchmarks force iteration counts this way).

Residual-check schedule (:class:`CheckSchedule`, ``solver.check``): a check costs a subtraction, two norms and,
on a GPU, a host synchronisation. ``every`` checks after each iteration; ``periodic`` every ``check_every``
iterations; ``prior`` (the default) checks first one iteration before the previous solve of the same kind
stopped, then after each iteration, so a solve as long as the last one does no wasted application and skips
its early checks. A late first check can only add iterations (a more accurate fixed point), never remove one.
The residual history then holds the checked iterations only; ``SolverStats.history_iters`` says which ones.

Mixed precision (``solver.precision``, :func:`solve_in_precision`): ``mixed`` iterates in bfloat16 until the
relative step reaches what bfloat16 resolves (:data:`BF16_SWITCH`, its machine epsilon 2^-7) or stops
decreasing, then continues in the caller's precision from that iterate to the configured tolerance with the
same stopping rule, so it reaches the same fixed point as a solve in the caller's precision; ``bf16`` stops
after the bfloat16 phase (an approximate fixed point, relative accuracy about 1e-2).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from pcdeq.errors import ConfigError

Tensor = torch.Tensor
FixedPointMap = Callable[[Tensor], Tensor]

STOP_MODES = ("sample", "batch")
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
REL_EPS = 1e-5  # the reference's denominator guard ||z|| + 1e-5
BF16_SWITCH = torch.finfo(torch.bfloat16).eps  # 2^-7: the relative step below which bfloat16 rounding dominates


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


def fixed_point_iter(
    f: FixedPointMap,
    z0: Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    stop_mode: str = "sample",
    schedule: CheckSchedule = EVERY_ITERATION,
    inplace: bool = False,
    stall: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Plain (Picard) iteration z_{k+1} = f(z_k), the paper's solver.

    Args:
        f: the map whose fixed point is sought.
        z0: starting point (its shape is the iterate's shape; dim 0 is the batch).
        tol: tolerance on the relative step (0: run exactly ``max_iter`` iterations).
        max_iter: maximum number of applications of f.
        stop_mode: "sample" (every sample below tol) or "batch" (the reference's whole-batch norm).
        schedule: after which iterations the residual is checked (default: every one); the last is always.
        inplace: ``f`` returns a fresh tensor at every call (never its argument or a tensor kept elsewhere), so
            a check may overwrite the previous iterate with the difference instead of allocating one. ``z0`` is
            never written.
        stall: also stop when the residual does not decrease from one check to the next (the bfloat16 phase
            of mixed precision stops at its rounding floor this way).

    Returns:
        The last iterate and a :class:`SolverStats`.
    """
    check_solver_args(tol, max_iter, stop_mode)
    stats = SolverStats()
    z, owned = z0, False  # owned: z came from f, so it may be overwritten
    diff: Tensor | None = None
    res = torch.full((_batch_size(z0, stop_mode),), math.inf, device=z0.device)
    last = math.inf
    for k in range(1, max_iter + 1):
        z_new = f(z)
        stats.iters = k
        if k < max_iter and not schedule.due(k):
            z, owned = z_new, True
            continue
        with torch.no_grad():  # the check is never differentiated (backward="unrolled" tracks f itself)
            diff = z.sub_(z_new) if (inplace and owned and z.data_ptr() != z_new.data_ptr()) else z_new - z
            res = _relative(diff, z_new, stop_mode)
        # One host sync per check: the stopping decision needs it. A NaN or Inf anywhere in z_new makes its
        # sample's residual NaN (inf / inf), and max propagates NaN, so this one check also catches non-finite z.
        rmax = float(res.max())
        if not math.isfinite(rmax):
            return z_new, finish_stats(stats, res, tol, nonfinite=True, batch_size=z0.shape[0])
        stats.record(k, rmax)
        z, owned = z_new, True
        if tolerance_met(rmax, tol) or (stall and rmax >= last):
            break
        last = rmax
    with torch.no_grad():
        per_sample = _relative(diff, z, "sample") if stop_mode == "batch" and diff is not None else None
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
            kind "ode": ``fn(func, y0, *, solver)`` as the Neural ODE family's :func:`pcdeq.node.solve.ode_solver`.
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

    ODE solve (the Neural ODE family, :mod:`pcdeq.node`; the fixed-point families ignore these):
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


PhaseRunner = Callable[[FixedPointMap, Tensor, float, CheckSchedule, bool], tuple[Tensor, SolverStats]]


def solve_in_precision(run: PhaseRunner, f: FixedPointMap, f_low: FixedPointMap, z0: Tensor, tol: float, precision: str,
                       schedule: CheckSchedule) -> tuple[Tensor, SolverStats]:
    """Mixed-precision solve: bfloat16 iterations first, then (``mixed``) ``f`` in z0's precision to ``tol``.

    Switch-over rule: the bfloat16 phase stops once its relative step is <= max(tol, :data:`BF16_SWITCH`) (below
    that, bfloat16 rounding of the iterate dominates the step) or the step stops decreasing (its rounding floor),
    or at the iteration cap. ``mixed`` then iterates ``f`` from that point with the configured tolerance,
    stopping rule and check schedule (``schedule``), so it ends where a solve in z0's precision ends: within the
    tolerance of the same fixed point. ``bf16`` returns the bfloat16 iterate (in z0's dtype) with its stats.

    Args:
        run: ``run(map, start, tol, schedule, stall) -> (z, stats)``, the configured solver.
        f, f_low: the map in z0's precision and in bfloat16.
        z0: the start (in z0's precision).
        tol: the configured tolerance.
        precision: "mixed" or "bf16".
        schedule: the check schedule of the final phase.

    Returns:
        The fixed point in z0's dtype and the combined statistics (``iters`` counts both phases, the history runs
        on across them, ``low_precision_iters`` the bfloat16 part).
    """
    switch = max(tol, BF16_SWITCH)
    z_low, low = run(f_low, z0.to(torch.bfloat16), switch, EVERY_ITERATION, True)
    low.low_precision_iters = low.iters
    z = z_low.to(z0.dtype)
    if precision == "bf16" or low.nonfinite:
        return z, low
    z, high = run(f, z, tol, schedule, False)
    high.low_precision_iters = low.iters
    high.history_iters = [low.iters + k for k in high.iterations()] if high.history else []
    high.history = low.history + high.history
    high.history_iters = low.iterations() + high.history_iters
    high.iters += low.iters
    return z, high


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
