"""The performance switches of PcdeqSolverConfig (issue 10): every one gives the plain path's fixed point and gradients.

Plain path: jacobian=autograd, weight_grad=autograd, check=every, inplace=False, cache_weight=False,
eval_output=apply, precision=off, skip_zero_product=False, contiguous tensors. Each switch alone, and all
defaults together, must reproduce it (float32 at the paper's tolerance, float64 at near machine precision), and
both must match an independent oracle: the fixed point of the paper's map (rebuilt from g and v in conftest) and
the implicit-function-theorem gradient by a dense solve, dL/dp = sigma'(p*) (I - J^T)^{-1} dL/dy with
J = diag(sigma'(p*)) A, where A is the explicit matrix of z -> W z (the convolution applied to every basis vector
for conv layers).

Other oracles: a hand-written float64 loop of the documented bfloat16 switch-over rule, saved-tensor counting
(torch.autograd.graph.saved_tensors_hooks), uncached layers, no_grad evaluation, contiguous networks, and the
built-in tanh for a tanh registered without its closed-form derivative.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pcdeq.activations import ACTIVATIONS, register_activation
from pcdeq.families.pcdeq.certificate import collatz_wielandt_bound
from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.families.pcdeq.models import build_network
from pcdeq.families.pcdeq.solver_config import PcdeqSolverConfig
from pcdeq.family import build_net
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.fixed_point import fixed_point_iter
from pcdeq.solver.precision import BF16_SWITCH
from pcdeq.solver.stats import SolverStats
from pcdeq.solver.stopping import CheckSchedule, full_history
from pcdeq.training.optim import OPTIMIZERS

Tensor = torch.Tensor
pytestmark = pytest.mark.usefixtures("single_thread", "seeded")

ACTS = ("tanh", "softsign", "relu6", "sigmoid")  # the registered activations, pcDEQ-1 and pcDEQ-2
KINDS = ("dense", "conv")
PLAIN = dict(jacobian="autograd", weight_grad="autograd", check="every", inplace=False, cache_weight=False,
             eval_output="apply", train_output="apply", precision="off", skip_zero_product=False)
TIGHT = 1e-12  # float64 solver tolerance
# (fixed-point max abs difference, gradient relative error) allowed per dtype; the fixed-point bounds are for
# z* of order 1 (tanh, softsign, sigmoid) and scale with max|z*| (relu6 reaches 6): the stopping rule is relative
BOUNDS = {torch.float32: (1e-4, 1e-3), torch.float64: (1e-10, 1e-8)}
ORACLE_FP = {torch.float32: 1e-3, torch.float64: 1e-9}  # z* at the solver's tolerance vs the exact fixed point
SOLVER_TOL = {torch.float32: 1e-4, torch.float64: TIGHT}

# One switch at a time away from the plain path (channels_last: the conv weights and input stored NHWC), and
# every default together. Names are the test ids.
SWITCHES: dict[str, dict] = {
    "jacobian=analytic": {"jacobian": "analytic"},
    "weight_grad=direct": {"weight_grad": "direct"},
    "check=prior": {"check": "prior"},
    "check=periodic": {"check": "periodic", "check_every": 3},
    "inplace": {"inplace": True},
    "cache_weight": {"cache_weight": True},
    "skip_zero_product": {"skip_zero_product": True},
    "eval_output=last": {"eval_output": "last"},
    "train_output=last": {"train_output": "last", "weight_grad": "direct"},  # the direct path's option
    "precision=mixed": {"precision": "mixed"},
    "channels_last": {"channels_last": True},
    "defaults": {"defaults": True, "channels_last": True},
}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _maxabs(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def _loss(y: Tensor, c: Tensor) -> Tensor:
    # a nonlinear term, so the incoming gradient c + y depends on the fixed point
    return (y * c).sum() + 0.5 * (y * y).sum()


def _shape(kind: str, batch: int = 3) -> tuple[int, ...]:
    return (batch, 6) if kind == "dense" else (2, 2, 4, 4)


def _solver(dtype: torch.dtype, **kw) -> PcdeqSolverConfig:
    """Plain-path settings changed by ``kw``; ``defaults=True`` starts from PcdeqSolverConfig's own defaults instead.

    float32 keeps the paper's solver (tol 1e-4, 200 iterations, whole-batch residual); float64 is tight.
    """
    base = {} if kw.pop("defaults", False) else dict(PLAIN)
    if dtype == torch.float64:
        base.update(fwd_tol=TIGHT, bwd_tol=TIGHT, fwd_max_iter=3000, bwd_max_iter=3000)
    base.update(kw)
    return PcdeqSolverConfig(**base)


def _layer(kind: str, act: str, dtype: torch.dtype, solver: SolverConfig, oracle: SimpleNamespace,
           channels_last: bool = False) -> PcDEQLayer:
    """A layer whose fixed point is far from the initialisation's trivial one, the same draw for every config.

    Row norms 0.5..1.5 put tanh/softsign/sigmoid in their curved part; relu6 gets row sums 0.5 (Perron root 1/2),
    so that with its larger inputs (:func:`_data`) z* has units below 6 (the gradient through relu6 does not
    vanish) and units saturated at 6.
    """
    torch.manual_seed(0)
    layer = PcDEQLayer(_shape(kind)[1], kind, act, solver=solver)
    if act == "relu6":
        oracle.set_row_sums_(layer, 0.5)
    else:
        oracle.set_row_norms_(layer, 0.5, 1.5)
    layer = layer.to(dtype)
    return layer.to(memory_format=torch.channels_last) if channels_last else layer


def _data(kind: str, dtype: torch.dtype, channels_last: bool = False, act: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """Input, loss weights and a different warm-up input (so check=prior has a previous solve of each kind).

    relu6 gets inputs three times larger, so that some units of z* saturate at 6 and others do not.
    """
    g = torch.Generator().manual_seed(1)
    shape = _shape(kind)
    x, c, x_warm = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    if act == "relu6":
        x, x_warm = 3 * x, 3 * x_warm
    if channels_last and len(shape) == 4:
        x, x_warm = x.to(memory_format=torch.channels_last), x_warm.to(memory_format=torch.channels_last)
    return x, c, 2 * x_warm


@dataclass
class Run:
    z_star: Tensor          # the forward solver's fixed point (training forward)
    y: Tensor               # the training output g(z*)
    grads: tuple[Tensor, ...]  # dL/dx, dL/dg, dL/dv
    y_eval: Tensor          # the evaluation output (no_grad, second call: a cached W if enabled)
    fwd: SolverStats
    bwd: SolverStats | None  # None for backward=unrolled (no backward solve)


def _run(layer: PcDEQLayer, x: Tensor, c: Tensor, x_warm: Tensor) -> Run:
    """Warm up on x_warm (training step and evaluation), then train and evaluate on x."""
    layer.train()
    _loss(layer(x_warm), c).backward()
    layer.eval()
    with torch.no_grad():
        layer(x_warm)
    layer.zero_grad(set_to_none=True)
    layer.train()
    xr = x.detach().clone().requires_grad_()
    y = layer(xr)
    z_star = layer.last_fixed_point[0]
    fwd = layer.last_stats["forward"]
    grads = torch.autograd.grad(_loss(y, c), (xr, layer.W.g, layer.W.v))
    bwd = layer.last_stats.get("backward")
    layer.eval()
    with torch.no_grad():
        layer(x)
        y_eval = layer(x)
    return Run(z_star, y.detach(), grads, y_eval, fwd, bwd)


def _ift_oracle(layer: PcDEQLayer, x: Tensor, c: Tensor, act: str, oracle: SimpleNamespace
                ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """z* and (dL/dx, dL/dg, dL/dv) in float64 from the paper's formulas and a dense linear solve.

    Nothing here calls pcdeq's layer or solvers: W is rebuilt from (g, v) by conftest's oracle, the fixed point
    comes from a plain loop run to float64 round-off, and u = (I - J^T)^{-1} dL/dy from torch.linalg.solve.
    """
    ref = copy.deepcopy(layer).double().to(memory_format=torch.contiguous_format)
    oa = oracle.acts[act]
    xr = x.detach().double().contiguous().requires_grad_()
    w = oracle.weight(ref)
    x_inj = oa.inject(xr)
    with torch.no_grad():
        z = torch.zeros_like(x_inj)
        for _ in range(20_000):
            z_new = oa.fn(oracle.apply(ref, w, z) + x_inj)
            done = float((z_new - z).abs().max()) <= 1e-15
            z = z_new
            if done:
                break
        else:
            raise AssertionError("the oracle's fixed-point loop did not converge")
        batch, n = z.shape[0], z[0].numel()
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *z.shape[1:])
        a = oracle.apply(ref, w, basis).reshape(n, n).T  # A[i, j] = (W e_j)_i
        p = oracle.apply(ref, w, z) + x_inj
        d = oa.deriv(p).reshape(batch, n)
        jac = d[:, :, None] * a[None]  # J_b = diag(sigma'(p_b)) A
        dl_dy = (c.double() + z).reshape(batch, n, 1)
        u = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - jac.transpose(1, 2), dl_dy)[..., 0]
        dl_dp = (d * u).reshape(z.shape)
    # <dL/dp, W z* + x~> with z* held fixed has exactly the implicit gradients w.r.t. x, g and v
    surrogate = (dl_dp * (oracle.apply(ref, w, z) + x_inj)).sum()
    return z, torch.autograd.grad(surrogate, (xr, ref.W.g, ref.W.v))


_PLAIN_RUNS: dict[tuple, tuple[Run, Tensor, tuple[Tensor, ...]]] = {}


def _plain_and_oracle(kind: str, act: str, dtype: torch.dtype, oracle: SimpleNamespace):
    """The plain path's run and the oracle for (kind, act, dtype), computed once per session."""
    key = (kind, act, dtype)
    if key not in _PLAIN_RUNS:
        layer = _layer(kind, act, dtype, _solver(dtype), oracle)
        x, c, x_warm = _data(kind, dtype, act=act)
        run = _run(layer, x, c, x_warm)
        _PLAIN_RUNS[key] = (run, *_ift_oracle(layer, x, c, act, oracle))
    return _PLAIN_RUNS[key]


# --------------------------------------------------------------------------- each switch vs the plain path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("switch,kind", [(s, k) for s in SWITCHES for k in KINDS
                                         if not (s == "channels_last" and k == "dense")])  # conv only
def test_switch_matches_plain_path_and_oracle(oracle, switch: str, kind: str, act: str, dtype) -> None:
    kw = dict(SWITCHES[switch])
    channels_last = kw.pop("channels_last", False) and kind == "conv"
    plain, z_ref, grads_ref = _plain_and_oracle(kind, act, dtype, oracle)
    layer = _layer(kind, act, dtype, _solver(dtype, **kw), oracle, channels_last)
    x, c, x_warm = _data(kind, dtype, channels_last, act)
    got = _run(layer, x, c, x_warm)
    scale = max(1.0, float(z_ref.abs().max()))
    fp_bound, grad_bound = BOUNDS[dtype][0] * scale, BOUNDS[dtype][1]

    assert got.fwd.converged and got.bwd.converged
    assert _maxabs(got.z_star, plain.z_star) <= fp_bound
    # an output of z* itself ("last", also the default) is one step from g(z*), which the stopping rule bounds
    # by tol * ||z||; every other config returns g(z*) as the plain path does
    last_train, last_eval = (switch in (name, "defaults") for name in ("train_output=last", "eval_output=last"))
    assert _maxabs(got.y, plain.y) <= fp_bound + (SOLVER_TOL[dtype] * float(plain.y.norm()) if last_train else 0)
    eval_bound = fp_bound + (SOLVER_TOL[dtype] * float(plain.y_eval.norm()) if last_eval else 0)
    assert _maxabs(got.y_eval, plain.y_eval) <= eval_bound
    for name, a, b, ref in zip(("x", "g", "v"), got.grads, plain.grads, grads_ref, strict=True):
        assert float(ref.norm()) > 1e-6, name  # a vanishing reference would make the comparison empty
        assert _rel(a, b) <= grad_bound, name
        assert _rel(a.double(), ref) <= grad_bound, name
    # the independent oracle: the exact fixed point of the paper's map
    assert _maxabs(got.z_star.double(), z_ref) <= ORACLE_FP[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
def test_plain_path_matches_oracle(oracle, kind: str, dtype) -> None:
    # the reference of the test above is itself right: every activation against the dense IFT solve
    grad_bound = BOUNDS[dtype][1]
    for act in ACTS:
        plain, z_ref, grads_ref = _plain_and_oracle(kind, act, dtype, oracle)
        assert _maxabs(plain.z_star.double(), z_ref) <= ORACLE_FP[dtype] * max(1.0, float(z_ref.abs().max())), act
        for a, ref in zip(plain.grads, grads_ref, strict=True):
            assert _rel(a.double(), ref) <= grad_bound, act
        if act == "relu6":  # both of relu6's pieces are exercised: units below 6 and units saturated at 6
            assert bool((z_ref < 6 - 1e-3).any()) and bool((z_ref == 6).any())


@pytest.mark.parametrize("phase", ["eval", "train"])
@pytest.mark.parametrize("kind", KINDS)
def test_output_last_is_z_star_and_apply_is_one_more_step(oracle, kind: str, phase: str) -> None:
    # eval_output (no gradient) and train_output (the direct implicit path); a loose tolerance, so that the one
    # step between the two outputs is visible
    x = _data(kind, torch.float32)[0]
    outs = {}
    for mode in ("last", "apply"):
        cfg = _solver(torch.float32, defaults=True, check="every", fwd_tol=1e-2, **{f"{phase}_output": mode})
        layer = _layer(kind, "softsign", torch.float32, cfg, oracle).train(phase == "train")
        with torch.set_grad_enabled(phase == "train"):
            outs[mode] = layer(x).detach()
        z_star, x_inj = layer.last_fixed_point
        if mode == "last":
            assert torch.equal(outs[mode], z_star)  # the solver's last iterate itself
        else:
            oa = oracle.acts["softsign"]
            with torch.no_grad():
                step = oa.fn(oracle.apply(layer, oracle.weight(layer), z_star) + oa.inject(x))
            torch.testing.assert_close(outs[mode], step, rtol=1e-6, atol=1e-6)
    diff = float((outs["apply"] - outs["last"]).norm())
    assert 0 < diff <= 1e-2 * float(outs["last"].norm())  # one step, bounded by the stopping rule



@pytest.mark.parametrize("extra", [{"inplace": True}, {"inplace": False}, {"fwd_solver": "anderson"},
                                   {"precision": "mixed"}], ids=["inplace", "out_of_place", "anderson", "mixed"])
@pytest.mark.parametrize("kind", KINDS)
def test_skip_zero_product_same_iterates_one_product_fewer(oracle, kind: str, extra: dict) -> None:
    # the first iteration from z = 0 is sigma(x~): bit for bit the iterate the product gives (W 0 = 0 exactly),
    # so outputs, fixed point, iterations and gradients are identical; each forward solve computes one product
    # less (mixed precision: the bfloat16 phase starts from a converted copy of z0 and keeps its product)
    x, c, x_warm = _data(kind, torch.float32)
    runs, products = {}, {}
    for skip in (True, False):
        cfg = _solver(torch.float32, defaults=True, skip_zero_product=skip, **extra)
        layer = _layer(kind, "tanh", torch.float32, cfg, oracle)
        calls: list[int] = []
        matvec = layer.W.matvec
        layer.W.matvec = lambda z, w=None, _m=matvec, _c=calls: _c.append(1) or _m(z, w)  # type: ignore
        runs[skip] = _run(layer, x, c, x_warm)
        products[skip] = len(calls)
    on, off = runs[True], runs[False]
    assert torch.equal(on.z_star, off.z_star) and torch.equal(on.y, off.y) and torch.equal(on.y_eval, off.y_eval)
    assert on.fwd.iters == off.fwd.iters and on.fwd.history == off.fwd.history
    for a, b in zip(on.grads, off.grads, strict=True):
        assert torch.equal(a, b)
    forward_solves = 5  # _run: a training and an evaluation warm-up, a training forward, two evaluations
    assert products[False] - products[True] == (0 if extra.get("precision") == "mixed" else forward_solves)

# --------------------------------------------------------------------------- mixed precision


def _switch_rule_holds(stats: SolverStats, tol: float, max_iter: int) -> None:
    """The bfloat16 phase (the first low_precision_iters checks) stopped exactly where the documented rule says:
    at the first relative step <= max(tol, BF16_SWITCH), at the first step that does not decrease, or at the cap."""
    low = stats.low_precision_iters
    h = stats.history[:low]
    switch = max(tol, BF16_SWITCH)
    assert len(h) == low  # check=every in the bfloat16 phase: one history entry per iteration
    for i in range(low - 1):  # before the switch: above the threshold and still decreasing
        assert h[i] > switch
        assert i == 0 or h[i] < h[i - 1]
    assert h[-1] <= switch or (low >= 2 and h[-1] >= h[-2]) or low == max_iter


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_precision_same_fixed_point_and_gradients(oracle, kind: str, act: str) -> None:
    # the defaults (analytic backward, so the backward linear solve has a bfloat16 phase too), check=every
    dtype = torch.float32
    runs = {}
    for precision in ("off", "mixed", "bf16"):
        cfg = _solver(dtype, defaults=True, check="every", precision=precision)
        layer = _layer(kind, act, dtype, cfg, oracle)
        runs[precision] = _run(layer, *_data(kind, dtype, act=act))
    off, mixed, bf16 = runs["off"], runs["mixed"], runs["bf16"]
    cfg = _solver(dtype, defaults=True)
    for stats, max_iter in ((mixed.fwd, cfg.fwd_max_iter), (mixed.bwd, cfg.bwd_max_iter)):
        assert stats.converged and 0 < stats.low_precision_iters < stats.iters
        assert stats.iterations() == list(range(1, stats.iters + 1))  # both phases counted, in order
        _switch_rule_holds(stats, cfg.fwd_tol, max_iter)
        assert stats.history[-1] <= cfg.fwd_tol  # the last phase ends at the configured tolerance
    # the same fixed point (forward) and the same linear fixed point (backward) as without bfloat16
    assert _maxabs(mixed.z_star, off.z_star) <= 1e-4
    assert _maxabs(mixed.y_eval, off.y_eval) <= 1e-4
    for a, b in zip(mixed.grads, off.grads, strict=True):
        assert _rel(a, b) <= 1e-3
    # bf16 alone: an approximate fixed point, about bfloat16's relative accuracy, returned in the layer's dtype
    assert bf16.fwd.low_precision_iters == bf16.fwd.iters and bf16.bwd.low_precision_iters == bf16.bwd.iters
    assert bf16.z_star.dtype == dtype and bf16.grads[0].dtype == dtype
    assert _rel(bf16.z_star, off.z_star) <= 2e-2
    assert _rel(bf16.y_eval, off.y_eval) <= 2e-2
    for a, b in zip(bf16.grads, off.grads, strict=True):
        assert _rel(a, b) <= 3e-2


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_precision_float64_reaches_the_tight_fixed_point(oracle, kind: str) -> None:
    # switching from bfloat16 to float64 loses nothing: same z* and gradients as off to 1e-10 / 1e-8
    runs = {p: _run(_layer(kind, "softsign", torch.float64, _solver(torch.float64, defaults=True, precision=p),
                           oracle), *_data(kind, torch.float64)) for p in ("off", "mixed")}
    mixed, off = runs["mixed"], runs["off"]
    assert mixed.fwd.low_precision_iters > 0 and mixed.bwd.low_precision_iters > 0
    assert _maxabs(mixed.z_star, off.z_star) <= 1e-10
    for a, b in zip(mixed.grads, off.grads, strict=True):
        assert _rel(a, b) <= 1e-8


def _documented_switch(a: float, b: float, n: int, tol: float) -> int:
    """Iterations of the bfloat16 phase for z <- a z + b from 0 (n equal entries), by the documented rule,
    computed in float64 (exact for the values used below, which bfloat16 represents exactly)."""
    z, last, switch = 0.0, math.inf, max(tol, BF16_SWITCH)
    for k in range(1, 1000):
        z_new = a * z + b
        step = abs(z_new - z) * math.sqrt(n) / (abs(z_new) * math.sqrt(n) + 1e-5)
        z = z_new
        if step <= switch or step >= last:
            return k
        last = step
    raise AssertionError("no switch")


@pytest.mark.parametrize("tol", [1e-6, 0.05])
def test_switch_over_at_bf16_threshold_or_tolerance(tol: float) -> None:
    # z <- z / 2 + 1 from 0: z_k = 2 - 2^(1-k), exact in bfloat16 for k <= 8; the relative step halves each time
    cfg = SolverConfig(fwd_tol=tol, check="every")
    calls = {"low": 0, "high": 0}

    def f(z: Tensor) -> Tensor:
        calls["high"] += 1
        assert z.dtype == torch.float64
        return 0.5 * z + 1

    def f_low(z: Tensor) -> Tensor:
        calls["low"] += 1
        assert z.dtype == torch.bfloat16
        return 0.5 * z + 1

    z, stats = cfg.solve("fwd", f, torch.zeros(1, 4, dtype=torch.float64), f_low=f_low, precision="mixed")
    expected = _documented_switch(0.5, 1.0, 4, tol)
    assert stats.low_precision_iters == calls["low"] == expected
    assert stats.iters == calls["low"] + calls["high"]
    assert z.dtype == torch.float64 and stats.converged
    assert float((z - 2).abs().max()) <= 4 * tol  # the geometric tail: error <= step / (1 - 1/2) per entry


def test_switch_over_when_the_bf16_step_stalls() -> None:
    # a bfloat16 map whose steps shrink, then stay at 0.2 (a rounding floor far above BF16_SWITCH): the phase
    # stops at the first step that does not decrease, and the caller's precision finishes the solve
    offsets = [1.0, 0.5, 0.25, 0.1, -0.1, 0.1, -0.1, 0.1, -0.1]
    k = {"low": 0}

    def f_low(z: Tensor) -> Tensor:
        k["low"] += 1
        return torch.full_like(z, 1.0 + offsets[min(k["low"], len(offsets)) - 1])

    cfg = SolverConfig(fwd_tol=1e-6, check="every")
    z, stats = cfg.solve("fwd", lambda z: 0.5 * z + 0.5, torch.zeros(2, 3), f_low=f_low, precision="mixed")
    # iterates 2, 1.5, 1.25, 1.1, 0.9 (bfloat16: 1.1016, 0.8984); relative steps 1, 1/3, 1/5, 0.135, then
    # 0.226: the first step that does not decrease, so the switch comes after 5 iterations
    assert stats.low_precision_iters == 5 == k["low"]
    h = stats.history
    assert h[0] > h[1] > h[2] > h[3] and h[4] >= h[3] > BF16_SWITCH
    assert stats.converged and stats.iters > 5
    assert float((z - 1).abs().max()) <= 1e-5  # the float32 phase reaches the fixed point z = 1


# --------------------------------------------------------------------------- residual-check schedules


def test_prior_and_periodic_never_stop_earlier_than_every(oracle) -> None:
    # a sequence of solves of different lengths: prior starts checking one iteration before the last solve of
    # its kind stopped, so after a long solve a short one runs longer; never shorter than check=every
    torch.manual_seed(3)
    inputs = [torch.randn(3, 6) * s for s in (3.0, 0.3, 1.0, 0.1, 2.0)]
    cfgs = {"every": {"check": "every"}, "prior": {"check": "prior"},
            "periodic": {"check": "periodic", "check_every": 4}}
    layers = {name: _layer("dense", "tanh", torch.float32, _solver(torch.float32, defaults=True, **kw),
                           oracle).eval() for name, kw in cfgs.items()}
    max_iter = layers["every"].solver.fwd_max_iter
    longer, previous = 0, None
    for x in inputs:
        out, stats = {}, {}
        for name, layer in layers.items():
            with torch.no_grad():
                out[name] = layer(x)
            stats[name] = layer.last_stats["forward"]
        every, prior, periodic = stats["every"], stats["prior"], stats["periodic"]
        assert every.iterations() == list(range(1, every.iters + 1))
        for name in ("prior", "periodic"):
            st = stats[name]
            assert st.converged and st.iters >= every.iters, name
            assert _maxabs(out[name], out["every"]) <= 1e-4, name
            # the checked iterations, each with the residual check=every saw there (the same iterates)
            for k, r in zip(st.iterations(), st.history, strict=True):
                if k <= every.iters:
                    assert r == pytest.approx(every.history[k - 1], rel=1e-6, abs=1e-12), name
        first = 1 if previous is None else max(1, previous - 1)
        assert prior.iterations() == list(range(first, prior.iters + 1))
        if first <= every.iters:  # checked from before every's stopping point on: stops exactly there
            assert prior.iters == every.iters
        else:  # the first check comes later: at least there
            assert prior.iters >= first
        assert periodic.iterations() == [k for k in range(1, periodic.iters + 1) if k % 4 == 0 or k == max_iter]
        assert periodic.iters < every.iters + 4
        longer += prior.iters > every.iters
        previous = prior.iters
        assert layers["prior"]._previous["fwd_eval"] == prior.iters  # what the next solve starts from
    assert longer >= 1  # the schedule did make some solve run past check=every's stopping point


def test_prior_schedule_history_starts_one_before_the_previous_solve(oracle) -> None:
    layer = _layer("conv", "sigmoid", torch.float32, _solver(torch.float32, defaults=True), oracle)
    layer.eval()
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        layer(3 * x)
    first_len = layer.last_stats["forward"].iters
    assert layer.last_stats["forward"].iterations() == list(range(1, first_len + 1))  # no previous: every
    with torch.no_grad():
        layer(x)
    st = layer.last_stats["forward"]
    assert st.iterations() == list(range(max(1, first_len - 1), st.iters + 1))
    with full_history(), torch.no_grad():  # complete histories on demand
        layer(x)
    st = layer.last_stats["forward"]
    assert st.iterations() == list(range(1, st.iters + 1))


@pytest.mark.parametrize("schedule", [CheckSchedule(), CheckSchedule(3, 3), CheckSchedule(9, 1)])
@pytest.mark.parametrize("inplace", [False, True])
def test_zero_tol_runs_exactly_max_iter_on_every_schedule(schedule: CheckSchedule, inplace: bool) -> None:
    z0 = torch.zeros(2, 5)
    z, st = fixed_point_iter(lambda z: 0.5 * z + 1, z0, tol=0, max_iter=10, schedule=schedule, inplace=inplace)
    assert st.iters == 10 and not st.converged
    assert st.iterations()[-1] == 10  # the last iteration is always checked
    assert st.iterations() == [k for k in range(1, 11) if schedule.due(k) or k == 10]
    torch.testing.assert_close(z, torch.full_like(z0, 2 - 2 ** -9))  # exactly ten steps
    assert float(z0.abs().max()) == 0  # the start is never written in place


def test_zero_tol_layer_runs_max_iter_with_prior_and_periodic(oracle) -> None:
    for check in ("prior", "periodic"):
        cfg = _solver(torch.float32, defaults=True, check=check, fwd_tol=0, fwd_max_iter=7)
        layer = _layer("dense", "tanh", torch.float32, cfg, oracle)
        for _ in range(2):  # the second solve has a previous one (prior)
            with torch.no_grad():
                layer(torch.randn(2, 6))
            assert layer.last_stats["forward"].iters == 7


# --------------------------------------------------------------------------- unrolled backward


@pytest.mark.filterwarnings("error::UserWarning")  # the unrolled solve converts no tracked tensor to a number
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_unrolled_gradients_match_implicit(oracle, kind: str, act: str) -> None:
    dtype = torch.float64
    plain, _, grads_ref = _plain_and_oracle(kind, act, dtype, oracle)
    layer = _layer(kind, act, dtype, _solver(dtype, defaults=True, backward="unrolled"), oracle)
    x, c, x_warm = _data(kind, dtype, act=act)
    got = _run(layer, x, c, x_warm)
    assert got.bwd is None  # autograd through the iterations: no backward solve
    assert got.fwd.converged and got.fwd.iters >= 10
    assert _maxabs(got.z_star, plain.z_star) <= 1e-10 * max(1.0, float(plain.z_star.abs().max()))
    for name, a, b, ref in zip(("x", "g", "v"), got.grads, plain.grads, grads_ref, strict=True):
        assert _rel(a, b) <= 1e-8, name
        assert _rel(a, ref) <= 1e-8, name


def _saved_tensors(layer: PcDEQLayer, x: Tensor) -> tuple[int, int]:
    """(tensors saved for the backward during one training forward, forward iterations)."""
    packs: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()  # the graph is usable
    return len(packs), layer.last_stats["forward"].iters


@pytest.mark.parametrize("kind", KINDS)
def test_saved_tensors_grow_with_iterations_only_when_unrolled(oracle, kind: str) -> None:
    x = _data(kind, torch.float64)[0]
    counts = {}
    for name, kw in (("unrolled", {"backward": "unrolled"}), ("implicit", {}), ("plain", dict(PLAIN))):
        for tol in (1e-3, 1e-12):
            kw_all = {"defaults": True, **kw} if name != "plain" else kw
            cfg = _solver(torch.float64, **kw_all, fwd_tol=tol)
            counts[name, tol] = _saved_tensors(_layer(kind, "tanh", torch.float64, cfg, oracle), x)
    (n_short, it_short), (n_long, it_long) = counts["unrolled", 1e-3], counts["unrolled", 1e-12]
    assert it_long >= 2 * it_short
    assert n_long - n_short >= it_long - it_short  # at least one saved tensor per extra iteration
    for name in ("implicit", "plain"):
        (n_a, it_a), (n_b, it_b) = counts[name, 1e-3], counts[name, 1e-12]
        assert it_b >= 2 * it_a and n_a == n_b, name  # constant memory in the iteration count
        assert n_b < n_long


# --------------------------------------------------------------------------- weight cache


def _uncached(layer: PcDEQLayer) -> PcDEQLayer:
    """A copy of ``layer`` (parameters and check=prior state) that computes W afresh at every evaluation."""
    ref = copy.deepcopy(layer)
    ref.solver = dataclasses.replace(ref.solver, cache_weight=False)
    return ref


def _assert_cache_fresh(layer: PcDEQLayer, x: Tensor) -> Tensor:
    """Evaluate ``layer`` and an uncached copy taken just before: the outputs must be bitwise equal."""
    ref = _uncached(layer)
    with torch.no_grad():
        y, y_ref = layer(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    return y


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind", KINDS)
def test_weight_cache_invalidated_by_optimizer_step_and_projection(oracle, kind: str, opt_name: str) -> None:
    layer = _layer(kind, "tanh", torch.float32, _solver(torch.float32, defaults=True), oracle).eval()
    x = _data(kind, torch.float32)[0]
    opt = OPTIMIZERS[opt_name](layer.parameters(), lr=0.2)  # the training stack's optimisers
    with torch.no_grad():
        y0 = layer(x)
    assert layer._weight_cache is not None  # a cached W is in use from here on
    for p in layer.parameters():  # an update without any training forward in between
        p.grad = torch.randn_like(p)
    opt.step()
    y1 = _assert_cache_fresh(layer, x)
    assert _maxabs(y1, y0) > 1e-3  # the step changed W, so a stale cache would show
    assert float(layer.W.v.detach().min()) < 0 or float(layer.W.g.detach().min()) < 0
    layer.project_()  # in-place clamp of g and v
    y2 = _assert_cache_fresh(layer, x)
    assert _maxabs(y2, y1) > 0
    with torch.no_grad():  # any other in-place change
        layer.W.g.mul_(0.5)
    y3 = _assert_cache_fresh(layer, x)
    layer.load_state_dict(copy.deepcopy(layer.state_dict()) | {"W.g": layer.W.g.detach() * 3})
    y4 = _assert_cache_fresh(layer, x)
    assert _maxabs(y4, y3) > 1e-3


def test_weight_cache_follows_functional_call_and_dtype(oracle) -> None:
    layer = _layer("dense", "softsign", torch.float32, _solver(torch.float32, defaults=True), oracle).eval()
    x = torch.randn(3, 6)
    y = _assert_cache_fresh(layer, x)
    # repeated: each call's new tensors may take the memory the previous call's freed, with the same version
    # counters (a cache keyed on pointers and versions alone then returns the previous call's W)
    for scale in (0.5, 2.0, 0.5, 3.0, 0.25, 2.0):
        ref = _uncached(layer)
        with torch.no_grad():
            ref.W.g.mul_(scale)
            got = torch.func.functional_call(layer, {"W.g": layer.W.g * scale, "W.v": layer.W.v.clone()}, (x,))
            torch.testing.assert_close(got, ref(x), rtol=0, atol=0)
            assert _maxabs(got, y) > 1e-4
    layer.solver = dataclasses.replace(layer.solver, check="every")  # same iterations as the first evaluation
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)  # back to the layer's own parameters
    layer.double()
    y64 = _assert_cache_fresh(layer, x.double())
    assert y64.dtype == torch.float64 and layer._weight_cache[-1].dtype == torch.float64


@pytest.mark.parametrize("act", ACTS)
def test_layer_with_cache_deepcopies_and_pickles(act: str) -> None:
    # the cache may hold an inference tensor (built under inference_mode): copies must not carry it
    net = build_network("conv", (1, 6, 6), 3, 4, act)
    net.eval()
    x = torch.randn(2, 1, 6, 6)
    with torch.inference_mode():
        y = net(x)
    layer = net.deq_layers()[0]
    assert layer._weight_cache is not None and layer._weight_cache[-1].is_inference()
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert clone.deq_layers()[0]._weight_cache is None
        with torch.no_grad():
            torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
        clone.train()
        clone(x).square().sum().backward()  # trains normally afterwards
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in clone.parameters())
    with torch.no_grad():  # the original keeps working with its (inference-tensor) cache outside inference_mode
        torch.testing.assert_close(net(x), y, rtol=0, atol=0)


# --------------------------------------------------------------------------- every model under inference_mode

PCDEQ_SIZES = {"linear": 8, "conv": 4, "multiconv": (4, 4, 4)}
MONDEQ_SIZES = {"fc": 16, "conv": 4, "multitier": (4, 4, 4)}


def _same_eval(net: nn.Module, x: Tensor) -> None:
    net.eval()
    with torch.no_grad():
        y_ng = net(x)
    with torch.inference_mode():
        y_inf = net(x)
    assert y_inf.is_inference() and not y_inf.requires_grad
    assert y_inf.shape == (x.shape[0], 10)
    assert bool(torch.isfinite(y_inf).all())
    torch.testing.assert_close(y_inf, y_ng, rtol=0, atol=0)  # the same solves, so bitwise the same outputs


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
@pytest.mark.parametrize("arch", list(PCDEQ_SIZES))
def test_inference_mode_pcdeq_models(arch: str, dataset: str, act: str) -> None:
    net = build_net("pcdeq", arch, dataset, channels=PCDEQ_SIZES[arch], activation=act)
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    _same_eval(net, torch.randn(2, *shape))
    assert all(m.last_stats["forward"].converged for m in net.deq_layers())


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
@pytest.mark.parametrize("arch", list(MONDEQ_SIZES))
def test_inference_mode_mondeq_models(arch: str, dataset: str) -> None:
    net = build_net("mondeq", arch, dataset, channels=MONDEQ_SIZES[arch])
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    _same_eval(net, torch.randn(2, *shape))


# --------------------------------------------------------------------------- channels-last networks


def _net_outputs_and_grads(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Training output, evaluation output, and every gradient (input first) as one flat vector."""
    model.train()
    xr = x.clone().requires_grad_()
    y = model(xr)
    loss = nn.functional.cross_entropy(y, torch.arange(x.shape[0]) % 10) + y.square().mean()
    grads = torch.autograd.grad(loss, [xr, *model.parameters()])
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    return [y.detach(), y_eval], torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("arch", ["conv", "multiconv"])
def test_channels_last_network_matches_contiguous(arch: str, act: str, dtype) -> None:
    # the default solver (tol 1e-4); the two layouts run the same iterations, so they differ by the rounding of
    # the convolutions' summation order only: 1e-5 in float32 (the whole gradient; a tensor whose gradient is
    # nearly 0, such as a bias before batch norm, can differ more relative to itself), 1e-10 in float64
    size = PCDEQ_SIZES[arch]
    ref = build_network(arch, (3, 12, 12), 10, size, act, channels_last=False).to(dtype)
    net = build_network(arch, (3, 12, 12), 10, size, act, channels_last=True).to(dtype)
    net.load_state_dict(ref.state_dict())
    assert any(p.dim() == 4 and not p.is_contiguous() for p in net.parameters())  # really stored NHWC
    seen = []
    for layer in net.deq_layers():
        layer.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(4, 3, 12, 12, dtype=dtype)
    outs_ref, grads_ref = _net_outputs_and_grads(ref, x)
    outs, grads = _net_outputs_and_grads(net, x)
    assert seen and all(seen)  # the pcDEQ layers did see channels-last activations
    assert [m.last_stats["forward"].iters for m in net.deq_layers()] == [
        m.last_stats["forward"].iters for m in ref.deq_layers()]
    bound = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(outs, outs_ref, strict=True):
        assert _maxabs(a, b) <= bound
    assert _rel(grads, grads_ref) <= bound


# --------------------------------------------------------------------------- activation without closed forms


@pytest.fixture
def tanh_without_closed_forms():
    """tanh registered again with neither deriv nor fn_ (the autograd fallbacks); removed afterwards."""
    name = "test_switches_tanh_autograd"
    act = register_activation(name, torch.tanh, "pcdeq1")
    yield act
    ACTIVATIONS.pop(name, None)


@pytest.mark.parametrize("kind", KINDS)
def test_activation_without_deriv_falls_back_to_autograd(oracle, tanh_without_closed_forms, kind: str) -> None:
    assert tanh_without_closed_forms.deriv is None and tanh_without_closed_forms.fn_ is None
    dtype = torch.float64
    plain, _, grads_ref = _plain_and_oracle(kind, "tanh", dtype, oracle)
    x, c, x_warm = _data(kind, dtype)
    for kw in ({"defaults": True}, {"defaults": True, "weight_grad": "autograd"}, {}):
        layer = _layer(kind, "tanh", dtype, _solver(dtype, **kw), oracle)
        layer.act = tanh_without_closed_forms  # same parameters (same seed), the bare activation
        assert not layer._analytic()
        got = _run(layer, x, c, x_warm)
        assert _maxabs(got.z_star, plain.z_star) <= 1e-10
        assert _maxabs(got.y_eval, plain.y_eval) <= 1e-10
        for a, ref in zip(got.grads, grads_ref, strict=True):
            assert _rel(a, ref) <= 1e-8
    # the certificate's Jacobian-vector product: forward-mode autograd gives the closed form's bound
    builtin = _layer(kind, "tanh", dtype, _solver(dtype, defaults=True), oracle)
    z_star, x_inj = layer.last_fixed_point
    torch.testing.assert_close(collatz_wielandt_bound(layer, z_star, x_inj),
                               collatz_wielandt_bound(builtin, z_star, x_inj), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow  # compiling the forward and backward steps takes about a minute on a CPU
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_steps_match_plain_path(oracle, kind: str) -> None:
    dtype = torch.float32
    plain, _, _ = _plain_and_oracle(kind, "tanh", dtype, oracle)
    layer = _layer(kind, "tanh", dtype, _solver(dtype, defaults=True, compile=True), oracle)
    got = _run(layer, *_data(kind, dtype))
    assert _maxabs(got.z_star, plain.z_star) <= 1e-4
    assert _maxabs(got.y_eval, plain.y_eval) <= 1e-4 + 1e-4 * float(plain.y_eval.norm())
    for a, b in zip(got.grads, plain.grads, strict=True):
        assert _rel(a, b) <= 1e-3


def test_plain_overrides_compose_into_a_plain_run() -> None:
    from pcdeq.families.pcdeq.models import PcDEQNet
    from pcdeq.perf import PLAIN, plain_overrides
    from pcdeq.training.config import net_from_config
    from tests.helpers import compose_train, resolved

    cfg = compose_train("model=pcdeq_conv", "dataset=mnist", *plain_overrides())
    net = net_from_config(resolved(cfg, "model", "dataset", "solver"))
    assert isinstance(net, PcDEQNet)
    layers = [m for m in net.modules() if isinstance(m, PcDEQLayer)]
    plain = {k.split(".", 1)[1]: v for k, v in PLAIN.items() if k.startswith("solver.")}
    assert all(cfg.solver[k] == v for k, v in plain.items())  # every switch reaches the composed config
    own = PcdeqSolverConfig.__dataclass_fields__  # the layer reads the shared keys and pcDEQ's (not mondeq_w)
    assert layers and all(getattr(m.solver, k) == v for m in layers for k, v in plain.items() if k in own)
    assert layers[0].W.v.is_contiguous()  # channels_last off (the default stores it channels-last)
    assert cfg.optim.fused is False and cfg.model.channels_last is False
