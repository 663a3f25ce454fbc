"""Fixed-point solvers: convergence on pcDEQ maps, stopping rules, and failure reporting.

Oracles: a hand-written iteration loop with the reference's stopping rule, explicit Jacobians whose spectral
radius predicts the asymptotic contraction, closed-form toy maps, and the paper's map rebuilt from (g, v).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.solver import get_solver
from pcdeq.solver.anderson import anderson
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.fixed_point import fixed_point_iter
from pcdeq.solver.stats import SolverStats, collect_stats

Tensor = torch.Tensor
pytestmark = pytest.mark.usefixtures("single_thread", "seeded")
SOLVER_FNS = {"fixed_point": fixed_point_iter, "anderson": anderson}
REF_EPS = 1e-5  # the reference's denominator guard: ||z_{k+1} - z_k|| / (||z_{k+1}|| + 1e-5)


def _slow_problem(make_layer, oracle: SimpleNamespace, kind: str, act: str, batch: int = 4):
    """A layer and input where plain iteration needs many steps.

    pcDEQ-1: W's rows sum to 0.9 (Perron root 0.9) and x~ = softplus5(x) is small, so z* sits in the nearly
    linear part of sigma and the local rate is close to 0.9. pcDEQ-2 cannot be slow (rho(J) < 1/2), so it gets
    a large W (row sums 2) instead.
    """
    shape = (batch, 8) if kind == "dense" else (batch, 3, 5, 5)
    layer = make_layer(shape[1], kind, act)
    oracle.set_row_sums_(layer, 2.0 if act == "sigmoid" else 0.9)
    x = torch.empty(shape, dtype=torch.float64).uniform_(-0.6, -0.2)
    x_inj = layer.act.injection(x)
    w = layer.W.weight().detach()
    return layer, x, (lambda z: layer.map(z, x_inj, w)), x_inj


def _explicit_jacobians(layer: PcDEQLayer, x: Tensor, z: Tensor, act: str, oracle: SimpleNamespace) -> Tensor:
    """Per-sample J_b = diag(sigma'(W z_b + x~_b)) W as dense [B, n, n] matrices (dense layers only)."""
    oa = oracle.acts[act]
    w = oracle.weight(layer).detach()
    pre = z @ w.T + oa.inject(x)
    return oa.deriv(pre)[:, :, None] * w[None]


# --------------------------------------------------------------------------- convergence on pcDEQ maps


@pytest.mark.parametrize(
    "kind,act",
    [("dense", a) for a in ("tanh", "softsign", "relu6", "sigmoid")]
    + [("conv", "tanh"), ("conv", "sigmoid")],
)
def test_unique_fixed_point_from_random_nonnegative_starts(make_layer, oracle, kind: str, act: str) -> None:
    # Rows of W with norm 2..5 are far outside any contraction argument; uniqueness must come from concavity.
    shape = (3, 8) if kind == "dense" else (2, 3, 5, 5)
    layer = make_layer(shape[1], kind, act)
    oracle.set_row_norms_(layer, 2.0, 5.0)
    x = torch.randn(shape, dtype=torch.float64)
    x_inj = layer.act.injection(x)
    w = layer.W.weight().detach()
    f = oracle.map(layer, x, act)
    with torch.no_grad():
        ends = []
        # starts from below and from far above z* (sigma is bounded by 1 or 6)
        for scale in (0.01, 0.1, 1.0, 10.0, 100.0):
            z0 = torch.rand(shape, dtype=torch.float64) * scale
            z, stats = fixed_point_iter(lambda z: layer.map(z, x_inj, w), z0, tol=1e-13, max_iter=5000)
            assert stats.converged and not stats.nonfinite
            assert float((f(z) - z).abs().max()) <= 1e-11  # a genuine fixed point of the paper's map
            ends.append(z)
    for z in ends[1:]:
        torch.testing.assert_close(z, ends[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("act", ["tanh", "softsign", "relu6"])
def test_residual_history_decays_geometrically_at_rate_rho_J(make_layer, oracle, act: str) -> None:
    layer, x, f, _ = _slow_problem(make_layer, oracle, "dense", act)
    with torch.no_grad():
        z, stats = fixed_point_iter(f, torch.zeros_like(x), tol=1e-12, max_iter=5000)
    assert stats.converged and stats.iters >= 60  # the problem is genuinely slow
    h = np.array(stats.history)
    assert len(h) == stats.iters
    ratios = h[1:] / h[:-1]
    # Geometric from the start (monotone concave map iterated from 0): every ratio after a short transient is
    # bounded away from 1.
    assert ratios[3:].max() < 0.95
    # The asymptotic ratio is the local rate: the largest spectral radius of J_b over the batch (the slowest
    # sample dominates the max-residual history).
    jac = _explicit_jacobians(layer, x, z, act, oracle)
    rho = max(float(np.abs(np.linalg.eigvals(j.numpy())).max()) for j in jac)
    assert 0.5 < rho < 1
    assert stats.contraction_ratio(last=5) == pytest.approx(rho, rel=1e-3)


@pytest.mark.parametrize(
    "kind,act", [("dense", "tanh"), ("dense", "relu6"), ("dense", "sigmoid"), ("conv", "tanh")]
)
def test_anderson_and_plain_iteration_agree(make_layer, oracle, kind: str, act: str) -> None:
    _, x, f, _ = _slow_problem(make_layer, oracle, kind, act)
    with torch.no_grad():
        z_plain, s_plain = fixed_point_iter(f, torch.zeros_like(x), tol=1e-12, max_iter=5000)
        z_and, s_and = anderson(f, torch.zeros_like(x), tol=1e-11, max_iter=5000)
    assert s_plain.converged and s_and.converged
    assert s_and.residual_max <= 1e-11
    torch.testing.assert_close(z_and, z_plain, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- stopping rules


def _oracle_iterate(
    f: Callable[[Tensor], Tensor], z0: Tensor, tol: float, per_sample: bool, max_iter: int = 100_000
) -> tuple[Tensor, int]:
    """The stopping rule written from its definition: relative step per sample, or one norm for the batch."""
    z = z0
    for k in range(1, max_iter + 1):
        z_new = f(z)
        if per_sample:
            steps = [float((z_new[b] - z[b]).norm() / (z_new[b].norm() + REF_EPS)) for b in range(len(z))]
            done = max(steps) <= tol
        else:
            done = float((z_new - z).norm() / (z_new.norm() + REF_EPS)) <= tol
        z = z_new
        if done or k == max_iter:
            return z, k
    raise AssertionError("oracle iteration did not stop")


@pytest.mark.parametrize("stop_mode", ["sample", "batch"])
def test_stop_rule_matches_definition(make_layer, oracle, stop_mode: str) -> None:
    _, x, f, _ = _slow_problem(make_layer, oracle, "dense", "tanh", batch=5)
    with torch.no_grad():
        z, stats = fixed_point_iter(f, torch.zeros_like(x), tol=1e-8, max_iter=5000, stop_mode=stop_mode)
        z_ref, k_ref = _oracle_iterate(f, torch.zeros_like(x), 1e-8, per_sample=stop_mode == "sample")
    assert stats.converged and stats.n_not_converged == 0
    assert stats.iters == k_ref
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    if stop_mode == "sample":
        assert stats.residual_mean <= stats.residual_max <= 1e-8
        assert stats.residual_mean < stats.residual_max  # the samples differ, so the mean is strictly lower
    else:
        # The batch norm decided; the reported residuals are still per sample, from the last step.
        assert stats.history[-1] <= 1e-8
        with torch.no_grad():
            step = (f(z_ref) - z_ref).flatten(1).norm(dim=1) / (f(z_ref).flatten(1).norm(dim=1) + REF_EPS)
            prev = _oracle_iterate(f, torch.zeros_like(x), 1e-8, per_sample=False, max_iter=k_ref - 1)[0]
            last = (z_ref - prev).flatten(1).norm(dim=1) / (z_ref.flatten(1).norm(dim=1) + REF_EPS)
        assert stats.residual_max == pytest.approx(float(last.max()), rel=1e-9)
        assert stats.residual_mean == pytest.approx(float(last.mean()), rel=1e-9)
        assert float(step.max()) < stats.residual_max  # one more step would have reduced it
        assert stats.residual_mean < stats.residual_max  # the samples differ


def test_per_sample_rule_waits_for_the_one_hard_sample(make_layer, oracle) -> None:
    # Sample 0 is easy: x~ ~ 3 saturates tanh at once. Sample 1 is hard: x~ = softplus5(-4) ~ 4e-10, so
    # its iterate starts near 0 and must grow by a factor ~2 per step (row sums of W = 2) before settling.
    # While it is tiny, its step is invisible in the whole-batch norm, which the easy sample dominates.
    def run(stop_mode: str, tol: float) -> tuple[Tensor, SolverStats]:
        layer = make_layer(8, "dense", "tanh", solver=oracle.tight_solver(tol=tol, stop_mode=stop_mode))
        oracle.set_row_sums_(layer, 2.0)
        with torch.no_grad():
            layer(x)
        return layer.last_fixed_point[0], layer.last_stats["forward"]

    x = torch.stack([torch.full((8,), 3.0), torch.full((8,), -4.0)]).double()
    # set_row_sums_ draws v from the RNG: re-seed so the three layers share one W
    torch.manual_seed(1)
    z_ref, _ = run("sample", 1e-13)
    torch.manual_seed(1)
    z_batch, s_batch = run("batch", 1e-6)
    torch.manual_seed(1)
    z_samp, s_samp = run("sample", 1e-6)

    def rel_err(z: Tensor, b: int) -> float:
        return float((z[b] - z_ref[b]).norm() / z_ref[b].norm())

    assert float(z_ref[1].min()) > 0.5  # the hard sample's fixed point is far from its starting region
    assert s_batch.converged and s_samp.converged
    # batch rule: stops once the easy sample settles, leaving the hard one nowhere near its fixed point
    assert rel_err(z_batch, 0) < 1e-5
    assert rel_err(z_batch, 1) > 0.9
    # per-sample rule: keeps iterating until the hard sample has converged as well
    assert s_samp.iters >= s_batch.iters + 15
    assert rel_err(z_samp, 0) < 1e-5 and rel_err(z_samp, 1) < 1e-4
    assert s_samp.residual_max <= 1e-6


# --------------------------------------------------------------------------- failure modes


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_map_is_a_failure_not_convergence(solver: str, kind: str) -> None:
    bad = math.nan if kind == "nan" else math.inf

    def f(z: Tensor) -> Tensor:
        # finite for a few steps, then non-finite: z = 1, 2, 3, 4, bad. Anderson's mixing of z + 1 also climbs
        # past 3, so both solvers must meet the bad value.
        return torch.where(z > 3, torch.full_like(z, bad), z + 1)

    z, stats = SOLVER_FNS[solver](f, torch.zeros(3, 4), tol=1e-6, max_iter=200)
    assert stats.nonfinite is True
    assert stats.converged is False
    assert stats.iters < 200  # it stopped at the failure, it did not run to the cap
    assert stats.n_not_converged == 3
    assert math.isnan(stats.residual_max)
    assert all(math.isfinite(r) for r in stats.history)  # history holds only the finite steps before it
    if solver == "fixed_point":
        assert stats.iters == 5 and len(stats.history) == 4


def test_overflow_to_inf_is_a_failure() -> None:
    # float32 overflow of z -> z^2 + 1: 1, 2, 5, 26, 677, 4.6e5, 2.1e11, 4.4e22, inf at step 9. The
    # residual's norm squares the entries, so it already overflows at step 8; either way the solve must stop
    # as a failure.
    _, stats = fixed_point_iter(lambda z: z * z + 1, torch.zeros(2, 3), tol=1e-6, max_iter=200)
    assert stats.nonfinite and not stats.converged
    assert stats.iters in (8, 9) and stats.n_not_converged == 2


def test_nonfinite_input_reported_by_layer_and_collect_stats(make_layer) -> None:
    layer = make_layer(6)
    x = torch.randn(3, 6, dtype=torch.float64)
    x[1, 2] = math.nan
    with torch.no_grad():
        layer(x)
    fwd = layer.last_stats["forward"]
    assert fwd.nonfinite and not fwd.converged
    summary = collect_stats(layer)["forward"]
    assert summary["nonfinite"] == 1.0
    assert summary["n_not_converged"] >= 1


@pytest.mark.parametrize("batch", [1, 3])
def test_non_contracting_map_hits_max_iter(batch: int) -> None:
    # z -> 2z + 1 from 0: z_k = 2^k - 1, relative step -> 1/2, never below tol; stays finite for 25 steps.
    z, stats = fixed_point_iter(lambda z: 2 * z + 1, torch.zeros(batch, 4), tol=1e-4, max_iter=25)
    assert stats.converged is False
    assert stats.nonfinite is False
    assert stats.iters == 25 and len(stats.history) == 25
    assert stats.n_not_converged == batch  # every sample, including a batch of one, is counted
    assert stats.residual_max == pytest.approx(0.5, rel=1e-3)
    torch.testing.assert_close(z, torch.full((batch, 4), 2.0**25 - 1))


def test_non_contracting_map_batch_mode_is_not_reported_converged() -> None:
    _, stats = fixed_point_iter(
        lambda z: 2 * z + 1, torch.zeros(3, 4), tol=1e-4, max_iter=25, stop_mode="batch"
    )
    assert stats.converged is False and stats.iters == 25
    assert stats.n_not_converged == 3  # one decision for the batch: a failed batch counts all of its samples


def test_anderson_hits_max_iter() -> None:
    # cos is contracting, but 3 steps cannot reach 1e-15
    _, stats = anderson(torch.cos, torch.zeros(2, 5, dtype=torch.float64), tol=1e-15, max_iter=3)
    assert stats.converged is False and stats.nonfinite is False
    assert stats.iters == 3 and stats.n_not_converged == 2


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("tol", [-1e-4, -0.0001, math.nan, math.inf])
def test_invalid_tol_rejected(solver: str, tol: float) -> None:
    with pytest.raises(ValueError, match="tol"):
        SOLVER_FNS[solver](torch.cos, torch.zeros(2, 3), tol=tol, max_iter=10)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("tol", [0, 0.0])
def test_zero_tol_runs_exactly_max_iter(solver: str, tol: float) -> None:
    # tol = 0 forces the iteration count (benchmarks): plain iteration of cos reaches its float32 fixed point to
    # the last bit (a zero step) long before 60 iterations, and still the solve runs all of them
    z, stats = SOLVER_FNS[solver](torch.cos, torch.zeros(2, 3), tol=tol, max_iter=60)
    assert stats.iters == 60 and not stats.nonfinite
    torch.testing.assert_close(z, torch.full((2, 3), 0.7390851), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("max_iter", [0, -3, 2.5])
def test_invalid_max_iter_rejected(solver: str, max_iter) -> None:
    with pytest.raises(ValueError, match="max_iter"):
        SOLVER_FNS[solver](torch.cos, torch.zeros(2, 3), tol=1e-4, max_iter=max_iter)


def test_invalid_stop_mode_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"stop_mode.*sample.*batch"):
        fixed_point_iter(torch.cos, torch.zeros(2, 3), stop_mode="global")


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"fwd_tol": -1e-4}, r"fwd.*tol"),
        ({"bwd_tol": -1.0}, r"bwd.*tol"),
        ({"fwd_tol": math.nan}, r"fwd.*tol"),
        ({"fwd_max_iter": 0}, r"fwd.*max_iter"),
        ({"bwd_max_iter": 0}, r"bwd.*max_iter"),
        ({"stop_mode": "all"}, r"stop_mode"),
    ],
)
def test_solver_config_rejects_bad_settings(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SolverConfig(**kwargs)


def test_solver_config_accepts_integral_float_max_iter() -> None:
    # command-line overrides can arrive as 50.0; an integral float is a valid iteration cap
    cfg = SolverConfig(fwd_max_iter=50.0)
    assert cfg.fwd_max_iter == 50 and isinstance(cfg.fwd_max_iter, int)


@pytest.mark.parametrize("build", [lambda: get_solver("broyden"), lambda: SolverConfig(bwd_solver="broyden")])
def test_unknown_solver_lists_valid_choices(build) -> None:
    with pytest.raises(ValueError, match="broyden") as err:
        build()
    assert "anderson" in str(err.value) and "fixed_point" in str(err.value)


def test_anderson_rejects_degenerate_memory() -> None:
    with pytest.raises(ValueError, match="memory m"):
        anderson(torch.cos, torch.zeros(2, 3), m=0)


def test_anderson_memory_one_and_two() -> None:
    # the smallest histories must either work (and find cos's fixed point) or be refused with a clear error
    z_star = 0.7390851332151607  # the Dottie number, cos(z) = z
    for m in (1, 2):
        try:
            z0 = torch.zeros(2, 3, dtype=torch.float64)
            z, stats = anderson(torch.cos, z0, tol=1e-12, max_iter=500, m=m)
        except ValueError as e:
            assert m == 1 and "memory m" in str(e)
            continue
        assert stats.converged
        torch.testing.assert_close(z, torch.full((2, 3), z_star, dtype=torch.float64), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- statistics


def test_contraction_ratio_is_geometric_mean_of_last_ratios() -> None:
    stats = SolverStats(history=[1.0, 0.9, 0.4, 0.2, 0.1, 0.05])
    assert stats.contraction_ratio(last=3) == pytest.approx(0.5)  # 0.4 -> 0.05 in 3 steps
    assert math.isnan(SolverStats(history=[0.3]).contraction_ratio())


def test_collect_stats_aggregates_over_layers() -> None:
    class Fake(nn.Module):
        def __init__(self, fwd: SolverStats, bwd: SolverStats | None = None) -> None:
            super().__init__()
            self.last_stats = {"forward": fwd} | ({"backward": bwd} if bwd else {})

    a = SolverStats(iters=4, residual_mean=1e-5, residual_max=2e-5, converged=True, history=[1e-1, 1e-3])
    b = SolverStats(iters=10, residual_mean=3e-5, residual_max=9e-4, converged=False, n_not_converged=2,
                    history=[1.0, 0.5])
    c = SolverStats(iters=3, residual_mean=1e-6, residual_max=1e-6, converged=True, history=[1e-2, 1e-3])
    model = nn.Sequential(Fake(a, c), nn.ReLU(), Fake(b))
    out = collect_stats(model)
    assert out["forward"]["iters"] == pytest.approx(7.0) and out["forward"]["iters_max"] == 10.0
    assert out["forward"]["residual_max"] == pytest.approx(9e-4)
    assert out["forward"]["n_not_converged"] == 2.0 and out["forward"]["nonfinite"] == 0.0
    assert out["forward"]["contraction"] == pytest.approx(0.5)
    assert out["backward"]["iters"] == 3.0
    assert collect_stats(nn.Linear(2, 2)) == {}
