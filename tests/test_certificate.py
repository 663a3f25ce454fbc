"""Collatz-Wielandt convergence certificate.

Oracle: the Jacobian J_b = diag(sigma'(W z*_b + x~_b)) W built explicitly per sample (closed-form sigma' for
dense layers, torch.autograd.functional.jacobian for conv), its spectral radius by power iteration
(cross-checked with an eigenvalue solver), and the Collatz-Wielandt ratio max_i (J z*)_i / z*_i computed from
that matrix. The certificate must dominate the dense spectral radius, never exceed the plain z* ratio, and be
within 20% of the spectral radius where the plain ratio is loose (pcDEQ-1 with injections near 0).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pcdeq.families.pcdeq.certificate import collatz_wielandt_bound, convergence_certificate
from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.families.pcdeq.models import build_model, build_network

Tensor = torch.Tensor
pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


def _power_rho(jac: Tensor, iters: int = 2000) -> Tensor:
    """Spectral radius of each nonnegative J_b by power iteration from the all-ones vector.

    A positive start has a component along the Perron vector of a nonnegative matrix. The estimate uses two
    steps, sqrt(||J^2 u|| / ||u||), so a period-2 oscillation (possible for reducible J) cannot bias it. No
    shift by I: with rho ~ 1e-9 (saturated units) the shift would leave no usable spectral gap.
    """
    u = torch.ones(jac.shape[0], jac.shape[-1], 1, dtype=jac.dtype)
    for _ in range(iters):
        u = jac @ u
        # J can be exactly 0 (relu6 saturated, sigmoid' underflowed): keep u = 0 rather than 0/0
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
    norm = u.norm(dim=(1, 2))
    return torch.where(norm > 0, (jac @ (jac @ u)).norm(dim=(1, 2)) / norm.clamp_min(1e-300), 0.0).sqrt()


def _eig_rho(jac: Tensor) -> np.ndarray:
    return np.array([np.abs(np.linalg.eigvals(j.numpy())).max() for j in jac])


def _dense_jacobians(layer: PcDEQLayer, oracle: SimpleNamespace, act: str, x: Tensor, z: Tensor) -> Tensor:
    oa = oracle.acts[act]
    w = oracle.weight(layer).detach()
    return oa.deriv(z @ w.T + oa.inject(x))[:, :, None] * w[None]


def _conv_jacobians(layer: PcDEQLayer, oracle: SimpleNamespace, act: str, x: Tensor, z: Tensor) -> Tensor:
    jacs = []
    for b in range(len(z)):
        f = oracle.map(layer, x[b : b + 1], act)
        j = torch.autograd.functional.jacobian(lambda zb, f=f: f(zb[None])[0], z[b].detach())
        jacs.append(j.reshape(z[b].numel(), z[b].numel()))
    return torch.stack(jacs)


def _solve(layer: PcDEQLayer, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        layer(x)
    assert layer.last_stats["forward"].converged
    return layer.last_fixed_point


def _scale_spectral_norm_(layer: PcDEQLayer, oracle: SimpleNamespace, target: float) -> None:
    """Rescale g so the dense W has ||W||_2 = target (row norms all scale by the same factor)."""
    with torch.no_grad():
        layer.W.g.mul_(target / torch.linalg.matrix_norm(oracle.weight(layer), ord=2))


def _check_certificate(layer, oracle, act: str, x: Tensor, jacobians) -> tuple[Tensor, np.ndarray]:
    z, x_inj = _solve(layer, x)
    bound = collatz_wielandt_bound(layer, z, x_inj)
    jac = jacobians(layer, oracle, act, x, z)
    assert bool((jac >= 0).all())  # W >= 0 and sigma' >= 0: the theory's nonnegative matrix
    rho = _power_rho(jac)
    np.testing.assert_allclose(rho.numpy(), _eig_rho(jac), rtol=1e-6, atol=1e-12)  # power iteration converged

    zf = z.flatten(1)
    jz = (jac @ zf[:, :, None])[..., 0]
    plain = (jz / zf).amax(dim=1)  # the Collatz-Wielandt ratio with u = z*, from the dense matrix
    torch.testing.assert_close(collatz_wielandt_bound(layer, z, x_inj, power_steps=0), plain, rtol=1e-9, atol=1e-12)
    # concavity at z*: J z* <= z* - g(0), with g(0) = sigma(x~) > 0
    g0 = oracle.acts[act].fn(oracle.acts[act].inject(x)).flatten(1)
    assert bool((jz <= zf - g0 + 1e-12).all())
    assert bool((rho <= bound + 1e-9).all())  # Collatz-Wielandt: the bound dominates the spectral radius
    assert bool((bound <= plain + 1e-12).all())  # the power-iteration vector never does worse than z*
    assert bool((bound < 1).all())
    return bound, rho.numpy()


@pytest.mark.parametrize("act", ["tanh", "softsign", "relu6", "sigmoid"])
def test_bound_dominates_rho_for_huge_W(make_layer, oracle, act: str) -> None:
    # ||W||_2 = 20: any contraction argument fails by a factor 20, the certificate must still be < 1
    layer = make_layer(6, "dense", act, solver=oracle.tight_solver(tol=1e-13))
    oracle.set_row_norms_(layer, 2.0, 5.0)
    _scale_spectral_norm_(layer, oracle, 20.0)
    x = torch.randn(5, 6, dtype=torch.float64) * 2
    x[0] = -3.0  # a sample with x~ ~ 0 (pcDEQ-1: 6e-8; pcDEQ-2: exactly 0), the hardest for positivity
    _check_certificate(layer, oracle, act, x, _dense_jacobians)


@pytest.mark.parametrize("act", ["tanh", "softsign", "relu6"])
def test_bound_is_tight_in_the_slow_regime(make_layer, oracle, act: str) -> None:
    # Row sums 0.9 and small x~: z* is nearly linear in x~, J ~ W and rho(J) is close to 0.9. The bound must
    # still lie in [rho, 1), and both must be far from 0 (otherwise rho <= bound proves nothing).
    layer = make_layer(6, "dense", act, solver=oracle.tight_solver(tol=1e-13))
    oracle.set_row_sums_(layer, 0.9)
    x = torch.empty(4, 6, dtype=torch.float64).uniform_(-0.6, -0.2)
    _, rho = _check_certificate(layer, oracle, act, x, _dense_jacobians)
    assert rho.min() > 0.5


@pytest.mark.parametrize("act,regime", [("tanh", "slow"), ("sigmoid", "large"), ("relu6", "slow")])
def test_bound_dominates_rho_conv(make_layer, oracle, act: str, regime: str) -> None:
    layer = make_layer(2, "conv", act, solver=oracle.tight_solver(tol=1e-13))
    if regime == "slow":
        oracle.set_row_sums_(layer, 0.9)
        x = torch.empty(2, 2, 4, 4, dtype=torch.float64).uniform_(-0.6, -0.2)
    else:
        oracle.set_row_norms_(layer, 2.0, 5.0)
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    _check_certificate(layer, oracle, act, x, _conv_jacobians)


@pytest.mark.parametrize("spectral_norm", [None, 20.0, 1000.0])
def test_pcdeq2_bound_below_one_half(make_layer, oracle, spectral_norm: float | None) -> None:
    # Theory: g_x(0) = sigmoid(relu(x)) >= 1/2 and z* < 1, so (J z*)_i / z*_i <= 1 - g(0)_i / z*_i < 1/2:
    # the certificate itself (hence rho(J)) is below 1/2 for EVERY W >= 0.
    layer = make_layer(6, "dense", "sigmoid", solver=oracle.tight_solver(tol=1e-13))
    if spectral_norm is None:
        oracle.set_row_sums_(layer, 2.0)  # the regime where sigmoid's rho(J) is largest (~0.27)
    else:
        oracle.set_row_norms_(layer, 2.0, 5.0)
        _scale_spectral_norm_(layer, oracle, spectral_norm)
    x = torch.randn(5, 6, dtype=torch.float64)
    x[0] = -1.0  # x~ = 0 exactly: g(0) = 1/2, the edge of the theory
    bound, rho = _check_certificate(layer, oracle, "sigmoid", x, _dense_jacobians)
    assert bool((bound < 0.5).all())
    assert rho.max() < 0.5


def test_one_half_is_specific_to_pcdeq2(make_layer, oracle) -> None:
    # control: a pcDEQ-1 layer can certify well above 1/2, so the test above checks a real property
    layer = make_layer(6, "dense", "tanh", solver=oracle.tight_solver(tol=1e-13))
    oracle.set_row_sums_(layer, 0.9)
    x = torch.empty(4, 6, dtype=torch.float64).uniform_(-0.6, -0.2)
    z, x_inj = _solve(layer, x)
    assert float(collatz_wielandt_bound(layer, z, x_inj).min()) > 0.5


def test_observed_contraction_within_certificate(make_layer, oracle) -> None:
    # the asymptotic residual ratio of plain iteration is rho(J) <= bound
    layer = make_layer(8, "dense", "softsign", solver=oracle.tight_solver(tol=1e-12))
    oracle.set_row_sums_(layer, 0.9)
    x = torch.empty(3, 8, dtype=torch.float64).uniform_(-0.6, -0.2)
    _solve(layer, x)
    cert = convergence_certificate(layer)
    assert 0.3 < cert["contraction"] <= cert["cw_bound_max"] + 1e-3


def test_convergence_certificate_of_model() -> None:
    net = build_model("multiconv", "digits")  # three pcDEQ layers in sequence, float32, default solver
    assert convergence_certificate(net) == {}  # no forward yet
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        net(x)
    cert = convergence_certificate(net)
    assert set(cert) == {"cw_bound_max", "cw_bound_mean", "cw_uncertified", "contraction"}
    assert cert["cw_uncertified"] == 0.0
    assert all(math.isfinite(v) for v in cert.values())
    assert 0 < cert["cw_bound_mean"] <= cert["cw_bound_max"]
    # aggregation: the worst layer per sample, then max / mean over samples
    per_layer = [collatz_wielandt_bound(m, *m.last_fixed_point).tolist() for m in net.deq_layers()]
    assert len(per_layer) == 3
    worst = [max(col) for col in zip(*per_layer, strict=True)]
    assert cert["cw_bound_max"] == pytest.approx(max(worst), rel=1e-6)
    assert cert["cw_bound_mean"] == pytest.approx(sum(worst) / len(worst), rel=1e-6)
    ratios = [m.last_stats["forward"].contraction_ratio() for m in net.deq_layers()]
    assert cert["contraction"] == pytest.approx(max(ratios))


def test_certificate_after_inference_mode_forward(oracle) -> None:
    # last_fixed_point then holds inference tensors; the certificate must still be computable outside
    net = build_network("linear", (1, 4, 4), 3, 8, "tanh", solver=oracle.tight_solver()).double()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        net(x)
    expected = convergence_certificate(net)
    with torch.inference_mode():
        net(x)
    got = convergence_certificate(net)
    assert got["cw_bound_max"] == pytest.approx(expected["cw_bound_max"], rel=1e-12)
    assert got["cw_bound_max"] < 1


def _loose_regime(layer: PcDEQLayer, oracle: SimpleNamespace, n_inputs: int, kind: str = "dense") -> Tensor:
    """Inputs where the plain z* ratio is loose: most units get an injection of about 0 (softplus of -4)."""
    oracle.set_row_sums_(layer, 0.6)
    shape = (n_inputs, layer.W.v.shape[0]) + ((3, 3) if kind == "conv" else ())
    x = torch.full(shape, -4.0, dtype=torch.float64)
    x[:, :2] = torch.rand(n_inputs, 2, *shape[2:], dtype=torch.float64) + 0.5  # two units carry the input
    return x


@pytest.mark.parametrize("act", ["tanh", "softsign", "relu6"])
def test_bound_is_tight_where_the_plain_ratio_is_loose(make_layer, oracle, act: str) -> None:
    # The pcDEQ-1 failure of the plain certificate: with x~ ~ 0 on most units, (J z*)_i ~ z*_i there and
    # max_i (J z*)_i / z*_i reads ~0.99 while rho(J) is far smaller. Power steps from z* must close the gap.
    layer = make_layer(12, "dense", act, solver=oracle.tight_solver(tol=1e-13))
    x = _loose_regime(layer, oracle, 6)
    z, x_inj = _solve(layer, x)
    plain = collatz_wielandt_bound(layer, z, x_inj, power_steps=0)
    bound, rho = _check_certificate(layer, oracle, act, x, _dense_jacobians)
    assert float(plain.min()) > 0.9 and rho.max() < 0.7  # the regime the fix is for
    np.testing.assert_array_less(bound.numpy(), 1.2 * rho)  # within 20% of the dense spectral radius


@pytest.mark.parametrize(("act", "kind"), [("tanh", "dense"), ("sigmoid", "dense"), ("softsign", "conv"),
                                           ("sigmoid", "conv")])
def test_bound_within_20_percent_of_dense_rho(make_layer, oracle, act: str, kind: str) -> None:
    channels = 10 if kind == "dense" else 3
    layer = make_layer(channels, kind, act, solver=oracle.tight_solver(tol=1e-13))
    oracle.set_row_sums_(layer, 0.8 if kind == "dense" else 0.1)
    x = torch.randn(4, channels, *((3, 3) if kind == "conv" else ()), dtype=torch.float64)
    bound, rho = _check_certificate(layer, oracle, act, x, _dense_jacobians if kind == "dense" else _conv_jacobians)
    np.testing.assert_array_less(bound.numpy(), 1.2 * rho)


def test_power_steps_only_tighten(make_layer, oracle) -> None:
    # every step gives a valid bound and the certificate keeps the smallest: more steps never loosen it
    layer = make_layer(12, "dense", "tanh", solver=oracle.tight_solver(tol=1e-13))
    z, x_inj = _solve(layer, _loose_regime(layer, oracle, 4))
    bounds = [collatz_wielandt_bound(layer, z, x_inj, power_steps=k) for k in (0, 1, 3, 10)]
    for looser, tighter in zip(bounds, bounds[1:], strict=False):
        assert bool((tighter <= looser + 1e-15).all())


def test_float32_training_precision_stays_below_one(oracle) -> None:
    # At the training precision (float32, tol 1e-4, batch criterion) the plain ratio reads 0.995 in this regime
    # (and can read >= 1, as z* is only approximate); the certificate must certify with a margin.
    layer = PcDEQLayer(12, "dense", "tanh")
    x = _loose_regime(layer.double(), oracle, 32).float()
    layer = layer.float()
    with torch.no_grad():
        layer(x)
    cert = convergence_certificate(layer)
    z, x_inj = layer.last_fixed_point
    assert float(collatz_wielandt_bound(layer, z, x_inj, power_steps=0).max()) > 0.98
    assert cert["cw_bound_max"] < 0.7 and cert["cw_uncertified"] == 0.0


def test_uncertified_batch_is_counted(make_layer, oracle) -> None:
    # A point far from the fixed point (here z ~ 0 with ||W|| ~ 20): J ~ W there, rho(J) >> 1, and the batch
    # must be reported as not certified rather than silently certified.
    layer = make_layer(6, "dense", "tanh")
    oracle.set_row_norms_(layer, 2.0, 5.0)
    _scale_spectral_norm_(layer, oracle, 20.0)
    x = torch.full((3, 6), -4.0, dtype=torch.float64)
    layer.last_fixed_point = (torch.full((3, 6), 1e-6, dtype=torch.float64), oracle.acts["tanh"].inject(x))
    cert = convergence_certificate(layer)
    assert cert["cw_bound_max"] > 1 and cert["cw_uncertified"] == 1.0


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_zero_jacobian_bound_is_zero(make_layer, kind: str) -> None:
    # W = 0 gives J = 0 (rho = 0): every power step has max(J u) = 0, which must give a bound of exactly 0, not 0/0
    layer = make_layer(4, kind, "tanh")
    with torch.no_grad():
        layer.W.g.zero_()
    x = torch.rand(3, 4) if kind == "dense" else torch.rand(3, 4, 5, 5)
    z, x_inj = _solve(layer, x.to(layer.W.g.dtype))
    bound = collatz_wielandt_bound(layer, z, x_inj)
    assert bound.tolist() == [0.0, 0.0, 0.0]


def test_conv_bound_same_in_channels_last(make_layer) -> None:
    # the per-sample maxima reduce over the non-batch dims in place: the memory layout must not change the bound
    layer = make_layer(4, "conv", "tanh")
    z, x_inj = _solve(layer, torch.rand(3, 4, 6, 6, dtype=layer.W.g.dtype))
    last = [t.contiguous(memory_format=torch.channels_last) for t in (z, x_inj)]
    assert not last[0].is_contiguous()
    torch.testing.assert_close(collatz_wielandt_bound(layer, *last), collatz_wielandt_bound(layer, z, x_inj),
                               rtol=1e-12, atol=0)
