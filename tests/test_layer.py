"""PcDEQLayer and NonnegWeight: forward fixed points, exact implicit gradients, memory, projection.

Oracles: the paper's map rebuilt from (g, v) by hand (conftest), autograd through a long unrolled iteration,
finite differences (gradcheck), an explicit backward iteration u = J^T u + v, and saved-tensor counting.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pcdeq.activations import ACTIVATIONS, register_activation
from pcdeq.families.pcdeq.layer import NonnegWeight, PcDEQLayer
from pcdeq.families.pcdeq.models import build_model
from pcdeq.solver.stats import SolverStats, collect_stats

Tensor = torch.Tensor
pytestmark = pytest.mark.usefixtures("single_thread", "seeded")
PCDEQ1 = ("tanh", "softsign", "relu6")
REF_EPS = 1e-5  # the reference's denominator guard in the relative step


def _shape(kind: str, batch: int = 3, ch: int | None = None) -> tuple[int, ...]:
    return (batch, ch or 8) if kind == "dense" else (batch, ch or 3, 5, 5)


def _setup(layer: PcDEQLayer, oracle: SimpleNamespace, act: str, regime: str) -> None:
    """Place W in one of two hard regimes.

    large: rows of W with norm 2..5, far above the 1 a contraction argument would need.
    slow:  rows summing to 0.9 (Perron root 0.9): with a small injection z* stays in sigma's nearly linear
           part, the local rate is close to 0.9 and plain iteration needs many steps. pcDEQ-2 cannot be slow
           (rho(J) < 1/2), so sigmoid gets row sums 2 there.
    """
    if regime == "large":
        oracle.set_row_norms_(layer, 2.0, 5.0)
    else:
        oracle.set_row_sums_(layer, 2.0 if act == "sigmoid" else 0.9)


def _input(shape: tuple[int, ...], regime: str) -> Tensor:
    if regime == "large":
        return torch.randn(shape, dtype=torch.float64)
    return torch.empty(shape, dtype=torch.float64).uniform_(-0.6, -0.2)  # small x~ = softplus5(x)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("regime", ["large", "slow"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("act", [*PCDEQ1, "sigmoid"])
def test_forward_reaches_fixed_point(make_layer, oracle, act: str, kind: str, regime: str) -> None:
    shape = _shape(kind)
    layer = make_layer(shape[1], kind, act)
    _setup(layer, oracle, act, regime)
    x = _input(shape, regime)
    if regime == "large" and kind == "dense":
        assert float(torch.linalg.matrix_norm(oracle.weight(layer).detach(), ord=2)) > 4  # no contraction
    y = layer(x)
    stats = layer.last_stats["forward"]
    assert stats.converged and not stats.nonfinite and stats.n_not_converged == 0
    if regime == "slow" and act in PCDEQ1:
        assert stats.iters >= 40  # the hard regime really needs many iterations
    f = oracle.map(layer, x, act)
    with torch.no_grad():
        assert _rel(f(y), y) <= 1e-10  # y = sigma(W y + x~) for the paper's W and the variant's injection
        z_star, x_inj = layer.last_fixed_point
        torch.testing.assert_close(y, z_star, rtol=0, atol=1e-10)
        torch.testing.assert_close(x_inj, oracle.acts[act].inject(x), rtol=1e-12, atol=1e-14)
    assert bool((y > 0).all())  # positivity: g_x(0) = sigma(x~) > 0 and the map is monotone


@pytest.mark.parametrize("act", [*PCDEQ1, "sigmoid"])
def test_forward_float32_default_solver(oracle, act: str) -> None:
    # the training configuration: float32, the reference's tol 1e-4 and 200 iterations, a large W
    layer = PcDEQLayer(16, "conv", act)
    oracle.set_row_norms_(layer, 2.0, 5.0)
    x = torch.randn(4, 16, 6, 6)
    with torch.no_grad():
        y = layer(x)
    stats = layer.last_stats["forward"]
    assert stats.converged and stats.iters < 200 and stats.residual_max <= 1e-4
    f = oracle.map(layer, x, act)
    with torch.no_grad():
        assert _rel(f(y), y) <= 1e-3


# --------------------------------------------------------------------------- backward


def _unrolled(layer: PcDEQLayer, oracle: SimpleNamespace, act: str, x: Tensor, g: Tensor, v: Tensor, n: int):
    """z_n of the plain iteration from 0 with autograd tracking every step (the brute-force gradient)."""
    oa = oracle.acts[act]
    norms = v.reshape(v.shape[0], -1).norm(dim=1)
    w = v * (g / norms).reshape(-1, *([1] * (v.dim() - 1)))
    x_inj = oa.inject(x)
    z = torch.zeros_like(x_inj)
    for _ in range(n):
        z = oa.fn(oracle.apply(layer, w, z) + x_inj)
    return z


def _grads(out: Tensor, c: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # a loss with a nonlinear term, so the incoming gradient depends on z*
    loss = (out * c).sum() + 0.5 * (out**2).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize(
    "kind,act,regime",
    [("dense", a, "slow") for a in (*PCDEQ1, "sigmoid")]
    + [("dense", "tanh", "large"), ("dense", "sigmoid", "large")]
    + [("conv", "tanh", "slow"), ("conv", "sigmoid", "slow"), ("conv", "softsign", "large")],
)
def test_implicit_gradient_matches_unrolled_autograd(
    make_layer, oracle, kind: str, act: str, regime: str
) -> None:
    shape = _shape(kind, batch=2)
    layer = make_layer(shape[1], kind, act)
    _setup(layer, oracle, act, regime)
    # x spans both signs so relu's (pcDEQ-2) and softplus's gradients are both exercised
    x = torch.empty(shape, dtype=torch.float64).uniform_(-0.6, 0.4).requires_grad_()
    c = torch.randn(shape, dtype=torch.float64)
    params = (layer.W.g, layer.W.v, x)

    g_impl = _grads(layer(x), c, params)
    n_fwd = layer.last_stats["forward"].iters
    # 300 extra steps: the unrolled gradient's error decays like rho(J)^n <= 0.9^300 ~ 2e-14
    g_unr = _grads(_unrolled(layer, oracle, act, x, layer.W.g, layer.W.v, n_fwd + 300), c, params)
    for name, a, b in zip(("g", "v", "x"), g_impl, g_unr, strict=True):
        assert float(b.norm()) > 1e-8, name  # a vanishing reference would make the comparison empty
        assert _rel(a, b) <= 1e-6, name


def test_one_step_gradient_is_detectably_wrong(make_layer, oracle) -> None:
    # Negative control for the test above: truncating the backward solve to one step (u = J^T v + v) must
    # change the gradient far beyond the 1e-6 tolerance, so that test can tell exact from approximate.
    layer = make_layer(8, "dense", "tanh", solver=oracle.tight_solver())
    layer.solver.bwd_max_iter = 1
    _setup(layer, oracle, "tanh", "slow")
    x = torch.empty(2, 8, dtype=torch.float64).uniform_(-0.6, 0.4).requires_grad_()
    c = torch.randn(2, 8, dtype=torch.float64)
    g_cut = _grads(layer(x), c, (layer.W.g, x))
    assert layer.last_stats["backward"].converged is False  # honestly reported as not converged
    g_unr = _grads(_unrolled(layer, oracle, "tanh", x, layer.W.g, layer.W.v, 500), c, (layer.W.g, x))
    assert min(_rel(a, b) for a, b in zip(g_cut, g_unr, strict=True)) > 1e-2


@pytest.mark.parametrize("kind,act", [("dense", "tanh"), ("dense", "sigmoid"), ("conv", "softsign")])
def test_gradcheck(make_layer, oracle, kind: str, act: str) -> None:
    shape = (2, 3) if kind == "dense" else (1, 2, 3, 3)
    # check="every": gradcheck re-runs the backward and demands bitwise-equal results, while the default "prior"
    # schedule lets a solve run past the tolerance after a longer previous solve (equal within the tolerance)
    layer = make_layer(shape[1], kind, act, solver=oracle.tight_solver(tol=1e-13, check="every"))
    _setup(layer, oracle, act, "slow")
    x = torch.empty(shape, dtype=torch.float64).uniform_(-0.6, 0.4).requires_grad_()
    g = layer.W.g.detach().clone().requires_grad_()
    v = layer.W.v.detach().clone().requires_grad_()  # entries >= 0.05: finite differences stay >= 0

    def fn(x: Tensor, g: Tensor, v: Tensor) -> Tensor:
        return torch.func.functional_call(layer, {"W.g": g, "W.v": v}, (x,))

    assert torch.autograd.gradcheck(fn, (x, g, v), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_backward_stats_recorded_and_match_explicit_iteration(make_layer, oracle) -> None:
    tol = 1e-10
    layer = make_layer(8, "dense", "tanh", solver=oracle.tight_solver(tol=tol))
    _setup(layer, oracle, "tanh", "slow")
    x = _input((3, 8), "slow")
    c = torch.randn(3, 8, dtype=torch.float64)
    y = layer(x)
    assert "backward" not in layer.last_stats  # nothing before the backward pass
    (y * c).sum().backward()
    bwd = layer.last_stats["backward"]
    assert isinstance(bwd, SolverStats) and isinstance(layer.last_stats["forward"], SolverStats)
    assert bwd.converged and bwd.residual_max <= tol and bwd.iters >= 20
    assert collect_stats(layer)["backward"]["iters"] == bwd.iters

    # oracle: u <- J^T u + c from u = c with the explicit J = diag(sigma'(W z* + x~)) W, per-sample rule
    z_star, _ = layer.last_fixed_point
    w = oracle.weight(layer).detach()
    jac = (1 - torch.tanh(z_star @ w.T + oracle.acts["tanh"].inject(x)) ** 2)[:, :, None] * w
    u, k = c.clone(), 0
    while True:
        u_new = torch.einsum("bij,bi->bj", jac, u) + c
        step = (u_new - u).norm(dim=1) / (u_new.norm(dim=1) + REF_EPS)
        u, k = u_new, k + 1
        if float(step.max()) <= tol or k >= 10_000:
            break
    assert abs(k - bwd.iters) <= 1  # same rule on the same linear system; allow one step of rounding
    # the converged u solves (I - J^T) u = c exactly
    eye = torch.eye(8, dtype=torch.float64)
    u_exact = torch.linalg.solve(eye - jac.transpose(1, 2), c[:, :, None])[..., 0]
    torch.testing.assert_close(u, u_exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_evaluation_without_grad_matches_grad_mode(make_layer, oracle, kind: str, mode: str) -> None:
    shape = _shape(kind)
    layer = make_layer(shape[1], kind, "tanh")
    _setup(layer, oracle, "tanh", "large")
    x = torch.randn(shape, dtype=torch.float64)
    y_grad = layer(x)
    assert y_grad.requires_grad
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    packs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(1) or t, lambda t: t), ctx:
        y_eval = layer(x)
    assert packs == []  # nothing saved for a backward that cannot happen
    assert y_eval.grad_fn is None and not y_eval.requires_grad
    if mode == "inference_mode":
        assert y_eval.is_inference()
    assert layer.last_stats["forward"].converged
    torch.testing.assert_close(y_eval, y_grad.detach(), rtol=0, atol=1e-14)


def _count_graph(out: Tensor) -> int:
    """Number of autograd nodes reachable from out.grad_fn."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return len(seen)


def test_memory_does_not_grow_with_forward_iterations(make_layer, oracle) -> None:
    def record(fn) -> tuple[int, int, Tensor]:
        packs: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t.numel()) or t, lambda t: t):
            out = fn()
        return len(packs), sum(packs), out

    x = torch.empty(4, 8, dtype=torch.float64).uniform_(-0.6, -0.2)
    easy = make_layer(8, "dense", "tanh")  # the reference initialisation: W tiny, a handful of iterations
    hard = make_layer(8, "dense", "tanh")
    _setup(hard, oracle, "tanh", "slow")
    n_easy, size_easy, out_easy = record(lambda: easy(x))
    n_hard, size_hard, out_hard = record(lambda: hard(x))
    it_easy, it_hard = easy.last_stats["forward"].iters, hard.last_stats["forward"].iters
    assert it_hard >= 10 * it_easy  # the two solves differ by an order of magnitude in length...
    assert (n_hard, size_hard) == (n_easy, size_easy)  # ...but save exactly the same tensors
    assert _count_graph(out_hard) == _count_graph(out_easy)

    # control: the counter does see an unrolled (non-implicit) iteration grow
    w = hard.W.weight()
    n5, _, _ = record(lambda: _unroll_n(hard, x, w, 5))
    n50, _, _ = record(lambda: _unroll_n(hard, x, w, 50))
    assert n50 > 5 * n5


def _unroll_n(layer: PcDEQLayer, x: Tensor, w: Tensor, n: int) -> Tensor:
    x_inj = layer.act.injection(x)
    z = torch.zeros_like(x_inj)
    for _ in range(n):
        z = layer.map(z, x_inj, w)
    return z


# --------------------------------------------------------------------------- weight parametrisation


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_reference_initialisation(kind: str) -> None:
    ch = 20
    w = NonnegWeight(ch, kind)
    # v ~ U[0,1) * sqrt(1e-4) / sqrt(out + in), the kernel size not counted; g = ||v|| per row
    bound = math.sqrt(1e-4) / math.sqrt(2 * ch)
    assert float(w.v.detach().min()) >= 0 and float(w.v.detach().max()) < bound
    assert float(w.v.mean()) == pytest.approx(bound / 2, rel=0.1)
    torch.testing.assert_close(w.g, w.v.detach().reshape(ch, -1).norm(dim=1))
    torch.testing.assert_close(w.weight(), w.v.detach())  # g = ||v|| makes W = v at initialisation


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_project_clamps_exactly_the_negative_entries(kind: str) -> None:
    w = NonnegWeight(5, kind)
    with torch.no_grad():
        w.v.copy_(torch.randn_like(w.v))
        w.g.copy_(torch.randn_like(w.g))
    v_before, g_before = w.v.detach().clone(), w.g.detach().clone()
    assert float(v_before.min()) < 0 and float(g_before.min()) < 0
    w.project_()
    torch.testing.assert_close(w.v.detach(), v_before.clamp_min(0), rtol=0, atol=0)
    torch.testing.assert_close(w.g.detach(), g_before.clamp_min(0), rtol=0, atol=0)
    assert w.v.requires_grad and w.g.requires_grad  # still trainable parameters, projected in place


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_zero_row_of_v_gives_zero_row_and_finite_gradients(make_layer, oracle, kind: str) -> None:
    shape = _shape(kind)
    layer = make_layer(shape[1], kind, "tanh")
    _setup(layer, oracle, "tanh", "large")
    with torch.no_grad():
        layer.W.v[0] = 0  # what projection does to a row that went entirely negative
    w = layer.W.weight()
    assert bool(torch.isfinite(w).all())
    assert float(w[0].abs().max()) == 0.0
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    # row/channel 0 of W is zero, so z*_0 = sigma(x~_0) exactly (no coupling), a closed form to check
    torch.testing.assert_close(y[:, 0], torch.tanh(F.softplus(x[:, 0], beta=5)), rtol=1e-12, atol=1e-14)
    (y.sin().sum()).backward()
    for name, grad in (("g", layer.W.g.grad), ("v", layer.W.v.grad), ("x", x.grad)):
        assert grad is not None and bool(torch.isfinite(grad).all()), name
    assert float(x.grad.abs().sum()) > 0


# --------------------------------------------------------------------------- registry extension


@pytest.fixture
def one_minus_exp():
    """Register 1 - exp(-t) (concave, increasing, bounded, sigma(0) = 0) for pcDEQ-1; removed afterwards."""
    name = "test_one_minus_exp"
    act = register_activation(name, lambda t: 1 - torch.exp(-t), "pcdeq1")
    yield act
    ACTIVATIONS.pop(name, None)  # the registry is global: do not leak into other tests


def test_registered_activation_converges(make_layer, oracle, one_minus_exp) -> None:
    # sigma(0) = 0 is allowed for pcDEQ-1: softplus5(x) > 0 keeps g_x(0) = sigma(x~) > 0
    layer = make_layer(8, "dense", one_minus_exp.name)
    assert layer.act.variant == "pcdeq1"
    oracle.set_row_norms_(layer, 2.0, 5.0)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        w = oracle.weight(layer)
        residual = y - (1 - torch.exp(-(y @ w.T + F.softplus(x, beta=5))))
    assert layer.last_stats["forward"].converged
    assert float(residual.abs().max()) <= 1e-10
    net = build_model("linear", "digits", one_minus_exp.name)  # usable by name in the model builder too
    with torch.no_grad():
        assert bool(torch.isfinite(net(torch.rand(4, 1, 8, 8))).all())


def test_activation_with_zero_at_zero_rejected_for_pcdeq2() -> None:
    # relu injection can be exactly 0, so pcDEQ-2 needs sigma(0) > 0
    with pytest.raises(ValueError, match=r"sigma\(0\)"):
        register_activation("test_bad_pcdeq2", lambda t: 1 - torch.exp(-t), "pcdeq2")
    assert "test_bad_pcdeq2" not in ACTIVATIONS
