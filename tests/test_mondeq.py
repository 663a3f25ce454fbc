"""Tests of the monDEQ family (pcdeq.families.mondeq) against independent oracles.

Oracles: dense matrices built by applying operators to unit vectors (inverse, adjoint, monotonicity), the
fixed-point equation itself, central finite differences in float64 (implicit gradients) and hand-made
iteration-count tables (alpha tuning). Everything runs on tiny digits-sized models (grid 10, tiers 10/6/4).
"""

from __future__ import annotations

import math

import pytest
import torch

from pcdeq.families.mondeq import build_mondeq, tune_alpha
from pcdeq.families.mondeq.circular import cconv, cconv_t, down, down_t, freq_apply, kernel_spectrum
from pcdeq.families.mondeq.splitting import SplittingProblem, forward_backward, peaceman_rachford
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.stats import collect_stats
from tests.helpers import splitting, tiny_model


def dense(apply, shapes) -> torch.Tensor:
    """The matrix of a linear map on tiered states, from its action on unit vectors (one batch)."""
    sizes = [math.prod(s[1:]) for s in shapes]
    n = sum(sizes)
    eye = torch.eye(n, dtype=torch.float64)
    tiers, i = [], 0
    for s, k in zip(shapes, sizes, strict=True):
        tiers.append(eye[:, i:i + k].reshape(n, *s[1:]))
        i += k
    out = apply(tiers)
    return torch.cat([o.reshape(n, -1) for o in out], dim=1).T  # column j = image of unit vector j


# ---------------------------------------------------------------- sizes and construction


@pytest.mark.parametrize(
    "arch,dataset,count",
    [
        ("fc", "mnist", 84_313),
        ("conv", "mnist", 79_500),
        ("multitier", "mnist", 81_394),
        ("conv", "svhn", 172_218),
        ("multitier", "svhn", 170_194),
        ("conv", "cifar10", 172_218),
        ("multitier", "cifar10", 170_194),
        ("conv", "cifar10_aug", 853_612),
        ("multitier", "cifar10_aug", 1_014_546),
    ],
)
@pytest.mark.parametrize("positive_scalars", [True, False])
def test_parameter_counts(arch, dataset, count, positive_scalars):
    model = build_mondeq(arch, dataset, positive_scalars=positive_scalars)
    assert sum(p.numel() for p in model.parameters()) == count


def test_tier_grids():
    assert build_mondeq("multitier", "mnist").operator.grids == [(30, 30), (16, 16), (9, 9)]
    assert build_mondeq("multitier", "cifar10").operator.grids == [(34, 34), (18, 18), (10, 10)]
    assert build_mondeq("multitier", "digits").operator.grids == [(10, 10), (6, 6), (4, 4)]


@pytest.mark.parametrize(
    "build,words",
    [
        (lambda: build_mondeq("resnet", "mnist"), ["fc", "conv", "multitier"]),
        (lambda: build_mondeq("fc", "imagenet"), ["mnist", "cifar10"]),
        (lambda: build_mondeq("fc", "mnist", solver=SolverConfig(fwd_solver="anderson")),
         ["peaceman_rachford", "forward_backward"]),
        (lambda: build_mondeq("fc", "mnist", solver=splitting(stop_mode="tier")), ["sample", "batch"]),
        (lambda: build_mondeq("conv", "mnist", m=0.0), ["m"]),
        (lambda: build_mondeq("conv", "mnist", channels=(4, 4)), ["one width"]),
        (lambda: build_mondeq("multitier", "mnist", channels=4), ["two"]),
    ],
)
def test_invalid_arguments(build, words):
    with pytest.raises(ValueError) as err:
        build()
    for w in words:
        assert w in str(err.value)


def test_scalar_reparametrisation():
    pos = build_mondeq("multitier", "digits", positive_scalars=True).operator
    raw = build_mondeq("multitier", "digits").operator  # the default follows the authors: raw scalars
    for op in (pos, raw):  # both start at g = gn = h = 1
        for p in (op.g_param, op.h_param, op.gn_param):
            assert torch.allclose(op._scalar(p), torch.ones_like(p))
    with torch.no_grad():
        pos.g_param.fill_(-30.0)
        raw.g_param.fill_(-1.0)
    assert all(torch.isfinite(a).all() for a in pos.kernels()[0])  # stays positive
    assert not torch.isfinite(raw.kernels()[0][0]).all()  # the authors' sqrt of a negative g


# ---------------------------------------------------------------- operators and inverses


def test_spectrum_matches_circular_convolution():
    torch.manual_seed(0)
    K = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    z = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    y = cconv(z, K)
    for onesided in (True, False):
        zh = torch.fft.rfft2(z) if onesided else torch.fft.fft2(z)
        yh = freq_apply(kernel_spectrum(K, (7, 6), onesided), zh)
        y2 = torch.fft.irfft2(yh, s=(7, 6)) if onesided else torch.fft.ifft2(yh).real
        torch.testing.assert_close(y2, y, rtol=0, atol=1e-12)


def test_circular_adjoints():
    torch.manual_seed(0)
    K = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    z = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    y = torch.randn(2, 4, 8, 6, dtype=torch.float64)
    yc = torch.randn(2, 4, 5, 4, dtype=torch.float64)
    assert torch.allclose((y * cconv(z, K)).sum(), (cconv_t(y, K) * z).sum())
    assert down(z, K).shape == yc.shape
    assert torch.allclose((yc * down(z, K)).sum(), (down_t(yc, K) * z).sum())


@pytest.mark.parametrize("arch", ["fc", "conv", "multitier"])
def test_adjoint_and_monotonicity(arch):
    op = tiny_model(arch).operator
    shapes = op.state_shapes(1)
    with torch.no_grad():
        W = dense(op.matvec, shapes)
        WT = dense(lambda z: op.matvec(z, transpose=True), shapes)
    torch.testing.assert_close(WT, W.T, rtol=0, atol=1e-12)
    torch.manual_seed(1)
    y = [torch.randn(3, *s[1:], dtype=torch.float64) for s in shapes]
    z = [torch.randn(3, *s[1:], dtype=torch.float64) for s in shapes]
    lhs = sum((a * b).sum() for a, b in zip(y, op.matvec(z), strict=True))
    rhs = sum((a * b).sum() for a, b in zip(op.matvec(y, transpose=True), z, strict=True))
    assert torch.allclose(lhs, rhs, rtol=1e-12)
    # I - W is m-strongly monotone (m = 1 here): the symmetric part has smallest eigenvalue >= 1
    sym = torch.eye(W.shape[0], dtype=W.dtype) - (W + W.T) / 2
    assert torch.linalg.eigvalsh(sym).min() >= 1 - 1e-10


@pytest.mark.parametrize("arch", ["fc", "conv", "multitier"])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_resolvent_against_dense_solve(arch, alpha):
    op = tiny_model(arch, m=0.5).operator
    shapes = op.state_shapes(1)
    with torch.no_grad():
        W = dense(op.matvec, shapes)
        R = op.resolvent(alpha)
        V = dense(R.apply, shapes)
        VT = dense(lambda r: R.apply(r, transpose=True), shapes)
    n = W.shape[0]
    M = (1 + alpha) * torch.eye(n, dtype=W.dtype) - alpha * W  # I + alpha (I - W)
    torch.testing.assert_close(V, torch.linalg.inv(M), rtol=0, atol=1e-11)
    torch.testing.assert_close(VT, torch.linalg.inv(M).T, rtol=0, atol=1e-11)
    torch.testing.assert_close(V @ M, torch.eye(n, dtype=W.dtype), rtol=0, atol=1e-11)


@pytest.mark.parametrize("arch", ["conv", "multitier"])
def test_resolvent_float32(arch):
    model = tiny_model(arch, dtype=torch.float32)
    op = model.operator
    with torch.no_grad():
        R = op.resolvent(0.5)
        z = [torch.randn(2, *s[1:]) for s in op.state_shapes(2)]
        out = R.apply(z)
        # (I + a (I - W)) V z == z, in the model's own precision
        back = [(1.5) * v - 0.5 * w for v, w in zip(out, op.matvec(out), strict=True)]
    assert R.blocks[0].Dinv.dtype == torch.complex64
    assert all(o.dtype == torch.float32 for o in out)
    for a, b in zip(back, z, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- solvers


def _problem(model, x, transpose=False):
    op = model.operator
    xin = torch.nn.functional.pad(x, (1, 1, 1, 1)) if model.pad_input else x.flatten(1)
    bias = [b.detach() for b in op.inject(xin)]
    masks = op.state_masks(bias[0])
    prox = model._relu(masks)
    return op, bias, masks, prox


def _fb_alpha(op, shapes) -> float:
    """A forward-backward step 0.95 * 2m / ||I - W||^2, inside the convergence bound 2m / ||I - W||^2."""
    with torch.no_grad():
        W = dense(op.matvec, shapes)
    norm = torch.linalg.matrix_norm(torch.eye(W.shape[0], dtype=W.dtype) - W, ord=2)
    return float(1.9 * op.m / norm**2)


@pytest.mark.parametrize("arch", ["fc", "conv", "multitier"])
def test_fixed_point_and_solver_agreement(arch):
    model = tiny_model(arch)
    op = model.operator
    torch.manual_seed(2)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    op, bias, masks, prox = _problem(model, x)
    with torch.no_grad():
        R = op.resolvent(0.7)
        pr = SplittingProblem(op.matvec, R.apply, prox, bias)
        z_pr, st_pr = peaceman_rachford(pr, 0.7, tol=1e-12, max_iter=2000)
        a_fb = _fb_alpha(op, op.state_shapes(1))
        z_fb, st_fb = forward_backward(pr, a_fb, tol=1e-13, max_iter=20000)
        fz = prox([w + b for w, b in zip(op.matvec(z_pr), bias, strict=True)])
    assert st_pr.converged and st_fb.converged and not st_pr.nonfinite
    for a, b, c in zip(z_pr, fz, z_fb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)  # z = relu(W z + U x + b)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-8)  # same equilibrium
    assert max(float(z.abs().max()) for z in z_pr) > 0  # non-trivial
    for z, mk in zip(z_pr, masks, strict=True):
        if mk is not None:  # hidden-state border stays 0
            assert torch.all(z[..., 0, :] == 0) and torch.all(z[..., -1, :] == 0)
            assert torch.all(z[..., :, 0] == 0) and torch.all(z[..., :, -1] == 0)


def test_model_stats_and_stop_modes():
    model = tiny_model("multitier", tol=1e-3)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    batch = model.last_stats["forward"]
    assert batch.converged and batch.iters == len(batch.history) and batch.history[-1] <= 1e-3
    assert batch.residual_mean <= batch.residual_max  # per sample, from the last step
    model.solver = splitting(tol=1e-3, stop_mode="sample")
    with torch.no_grad():
        model(x)
    sample = model.last_stats["forward"]
    assert sample.converged and sample.n_not_converged == 0 and sample.residual_max <= 1e-3
    model.solver = splitting(tol=1e-12, max_iter=2)
    with torch.no_grad():
        model(x)
    capped = model.last_stats["forward"]
    assert capped.iters == 2 and not capped.converged and not capped.nonfinite


@pytest.mark.parametrize("solver", ["peaceman_rachford", "forward_backward"])
def test_no_grad_inference_mode_and_nonfinite(solver):
    model = tiny_model("multitier", dtype=torch.float32, solver=solver, alpha=0.1)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y1 = model(x)
    with torch.inference_mode():
        y2 = model(x)
    y3 = model.eval()(x)
    assert y1.shape == (3, 10) and torch.isfinite(y1).all()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(y1, y3.detach())
    assert model.last_stats["forward"].converged
    x[1, 0, 3, 3] = float("nan")
    with torch.inference_mode():
        model(x)
    st = model.last_stats["forward"]
    assert st.nonfinite and not st.converged
    assert collect_stats(model)["forward"]["nonfinite"] == 1.0


def test_wrong_input_shape():
    with pytest.raises(ValueError, match="expected input of shape"):
        tiny_model("conv")(torch.zeros(2, 1, 28, 28, dtype=torch.float64))


# ---------------------------------------------------------------- implicit gradients


@pytest.mark.parametrize(("solver", "bwd_bias"), [("peaceman_rachford", "prox"), ("peaceman_rachford", "resolvent"),
                                                  ("forward_backward", "prox")])
@pytest.mark.parametrize("arch", ["fc", "conv", "multitier"])
def test_gradients_match_finite_differences(arch, solver, bwd_bias):
    model = tiny_model(arch, solver=solver, alpha=0.5, tol=1e-12, max_iter=20000, seed=3, bwd_bias=bwd_bias)
    if solver == "forward_backward":
        model.alpha = _fb_alpha(model.operator, model.operator.state_shapes(1))
    torch.manual_seed(4)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 10, dtype=torch.float64)
    params = [x] + list(model.parameters())
    dirs = [torch.randn_like(p) for p in params]

    loss = (model(x) * c).sum()
    grads = torch.autograd.grad(loss, params)
    assert model.last_stats["backward"].converged
    assert collect_stats(model)["backward"]["iters"] == model.last_stats["backward"].iters

    def loss_at(t: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, dirs, strict=True):
                p.add_(t * d)
            val = float((model(x) * c).sum())
            for p, d in zip(params, dirs, strict=True):
                p.sub_(t * d)
        return val

    eps = 1e-6
    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    ad = float(sum((g * d).sum() for g, d in zip(grads, dirs, strict=True)))
    assert abs(fd - ad) <= 1e-7 * max(1.0, abs(ad)), (fd, ad)
    # a direction in the input only: the gradient w.r.t. the image goes through the equilibrium too
    assert abs(float(grads[0].abs().sum())) > 0


# ---------------------------------------------------------------- alpha tuning


def _table(counts: dict[float, int]):
    asked: list[float] = []

    def iters_at(a: float) -> int:
        asked.append(a)
        return counts[a]

    return iters_at, asked


@pytest.mark.parametrize(
    "counts,current,expected,asked",
    [
        # halve while not increasing; 0.125 increases the count, so 0.25 is kept
        ({1: 10, 0.5: 8, 0.25: 8, 0.125: 9}, 0.3, 0.25, [1, 0.5, 0.25, 0.125]),
        # the first halving already increases it: keep the start
        ({1: 5, 0.5: 6}, 0.3, 1.0, [1, 0.5]),
        # the start hit max_iter and so did every candidate: keep the previous alpha
        ({2.0 ** -k: 300 for k in range(14)}, 0.3, 0.3, [2.0 ** -k for k in range(14)]),
        # the authors check the kept alpha's count: a start at max_iter followed by a converging 0.5 keeps 0.5
        ({1: 300, 0.5: 12, 0.25: 15}, 0.3, 0.5, [1, 0.5, 0.25]),
    ],
)
def test_alpha_tuning_rule(counts, current, expected, asked):
    iters_at, seen = _table(counts)
    assert tune_alpha(iters_at, current, max_iter=300) == expected
    assert seen == asked


def test_alpha_tuning_floor():
    iters_at, seen = _table({2.0 ** -k: 20 - k for k in range(20)})  # keeps improving
    assert tune_alpha(iters_at, 0.3, max_iter=300) == 2.0 ** -13  # the last candidate above the 1e-4 floor
    assert min(seen) == 2.0 ** -13


def test_alpha_tuning_hook():
    model = tiny_model("conv", dtype=torch.float32, alpha=0.3)
    x = torch.randn(8, 1, 8, 8)
    for batch_idx in (0, 29, 31, 99):  # not a tuning batch (mid-epoch of 200 batches is 100)
        model.on_train_batch_start(x, batch_idx, 200)
        assert model.alpha == 0.3
    expected = tune_alpha(lambda a: model.forward_iterations(x, a), 0.3, model.solver.fwd_max_iter)
    assert model.alpha == 0.3  # probing does not change alpha
    model.on_train_batch_start(x, 30, 200)
    assert model.alpha == expected
    model.alpha = 0.3
    model.on_train_batch_start(x, 100, 200)
    assert model.alpha == expected
    model.alpha, model.solver = 0.3, splitting(alpha=0.3, alpha_tuning=False)
    model.on_train_batch_start(x, 30, 200)
    assert model.alpha == 0.3


def test_alpha_is_checkpointed():
    model = tiny_model("fc", alpha=0.25)
    other = tiny_model("fc", alpha=1.0)
    other.load_state_dict(model.state_dict())
    assert other.alpha == 0.25


def test_backward_arrangements_reach_the_same_gradient_with_their_own_iterates():
    # The authors' Peaceman-Rachford backward adds the gradient at the prox step, ours at the resolvent step:
    # the same linear fixed point, reached through different iterates (so iteration counts may differ).
    grads, iters = {}, {}
    for bwd_bias in ("prox", "resolvent"):
        model = tiny_model("conv", alpha=0.5, tol=1e-12, max_iter=20000, seed=5, bwd_bias=bwd_bias)
        torch.manual_seed(6)
        x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
        model(x).square().sum().backward()
        grads[bwd_bias] = torch.cat([p.grad.flatten() for p in model.parameters()])
        iters[bwd_bias] = model.last_stats["backward"].history[:3]
    torch.testing.assert_close(grads["prox"], grads["resolvent"], rtol=1e-8, atol=1e-10)
    assert iters["prox"] != iters["resolvent"]


def test_authors_backward_iterates_follow_their_update_rule():
    # One hand-written step of the authors' backward from z = u = 0: u_half = 0, z_half = V^T 0 = 0, u = 0,
    # z = J (u + alpha g): the first iterate is alpha * J g, and the second applies V^T once to 2 z - u.
    from pcdeq.families.mondeq.splitting import SplittingProblem, peaceman_rachford

    torch.manual_seed(0)
    g = [torch.randn(2, 5, dtype=torch.float64)]
    j = [(torch.rand(2, 5) > 0.4).double()]
    M = torch.randn(5, 5, dtype=torch.float64) * 0.1
    problem = SplittingProblem(linear=lambda u: [u[0] @ M], resolvent=lambda r: [r[0] @ M.T],
                               prox=lambda w: [w[0] * j[0]], bias=g, bias_in_prox=True)
    z1, _ = peaceman_rachford(problem, 0.5, tol=1e-30, max_iter=1)
    torch.testing.assert_close(z1[0], 0.5 * j[0] * g[0])
    z2, _ = peaceman_rachford(problem, 0.5, tol=1e-30, max_iter=2)
    u_half = 2 * z1[0]  # u after step 1 is 0
    u = 2 * (u_half @ M.T) - u_half
    torch.testing.assert_close(z2[0], j[0] * (u + 0.5 * g[0]))


def test_backward_skips_the_resolvent_of_zero_with_the_same_iterates():
    # The authors' backward starts from z = u = 0, so its first resolvent is applied to 0 and gives 0 (it is linear):
    # skip_zero_resolvent drops that application; iterates, residual history and solution are identical.
    from pcdeq.families.mondeq.splitting import SplittingProblem, peaceman_rachford

    torch.manual_seed(0)
    g = [torch.randn(2, 5, dtype=torch.float64)]
    j = [(torch.rand(2, 5) > 0.4).double()]
    M = torch.randn(5, 5, dtype=torch.float64) * 0.1  # ||M|| < 1: I - M strongly monotone
    alpha = 0.5
    V = torch.linalg.inv(torch.eye(5, dtype=torch.float64) + alpha * (torch.eye(5, dtype=torch.float64) - M))
    runs = {}
    for skip in (False, True):
        calls: list[int] = []
        problem = SplittingProblem(linear=lambda u: [u[0] @ M],
                                   resolvent=lambda r, _c=calls: _c.append(1) or [r[0] @ V],
                                   prox=lambda w: [w[0] * j[0]], bias=g, bias_in_prox=True,
                                   skip_zero_resolvent=skip)
        z, stats = peaceman_rachford(problem, alpha, tol=1e-12, max_iter=500)
        runs[skip] = (z[0], stats, len(calls))
    (z_off, s_off, n_off), (z_on, s_on, n_on) = runs[False], runs[True]
    assert torch.equal(z_on, z_off) and s_on.iters == s_off.iters and s_on.history == s_off.history
    assert s_on.converged and n_off - n_on == 1


@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_model_gradients_unchanged_by_the_zero_resolvent_skip(arch: str):
    grads = {}
    for skip in (False, True):
        model = tiny_model(arch, alpha=0.5, tol=1e-6, seed=5, bwd_bias="prox", skip_zero_product=skip)
        torch.manual_seed(6)
        x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
        model(x).square().sum().backward()
        grads[skip] = [p.grad.clone() for p in model.parameters()]
        assert model.last_stats["backward"].iters > 1
    for a, b in zip(grads[False], grads[True], strict=True):
        assert torch.equal(a, b)
