"""W and W^T of the convolutional monDEQs in the frequency domain (solver.mondeq_w) against the spatial path.

The spatial circular convolutions (``ConvTiersMonotone.matvec``) are the oracle; they are themselves checked
against dense matrices in tests/test_mondeq.py. Everything is float64 on tiny models, so agreement is to
rounding.
"""

from __future__ import annotations

import pytest
import torch

from pcdeq.errors import ConfigError
from pcdeq.families.mondeq import ConvTiersMonotone, build_mondeq
from pcdeq.families.mondeq.solver_config import MondeqSolverConfig
from pcdeq.families.mondeq.splitting import SplittingProblem, peaceman_rachford
from tests.helpers import splitting, tiny_model

# (channels, tier-0 grid): odd and even sizes, square and not; multi-tier grids (10, 14) -> (6, 8) -> (4, 5)
OPERATORS = [((3,), (10, 10)), ((3,), (7, 9)), ((2,), (9, 8)), ((4,), (8, 7)),
             ((2, 3, 4), (10, 10)), ((2, 3, 4), (10, 14)), ((3, 2), (12, 8))]


def random_operator(channels: tuple[int, ...], grid: tuple[int, int], seed: int = 0) -> ConvTiersMonotone:
    """A float64 operator with randomised positive scalars g, gn, h."""
    torch.manual_seed(seed)
    op = ConvTiersMonotone(2, channels, grid, m=0.7, positive_scalars=True).double()
    with torch.no_grad():
        for p in (op.g_param, op.h_param, op.gn_param):
            if p is not None:
                p.uniform_(-0.5, 0.5)
    return op


def random_state(op: ConvTiersMonotone, batch: int = 3) -> list[torch.Tensor]:
    return [torch.randn(*s, dtype=torch.float64) for s in op.state_shapes(batch)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("channels,grid", OPERATORS)
@pytest.mark.parametrize("transpose", [False, True])
def test_frequency_w_equals_spatial(channels, grid, transpose):
    op = random_operator(channels, grid)
    z = random_state(op)
    with torch.no_grad():
        spatial = op.matvec(z, transpose)
        freq = op.frequency_weight().apply(z, transpose)
    assert [f.shape for f in freq] == [s.shape for s in spatial]
    assert max_diff(freq, spatial) < 1e-12


@pytest.mark.parametrize("channels,grid", OPERATORS[:1] + OPERATORS[4:6])
@pytest.mark.parametrize("transpose", [False, True])
def test_frequency_w_parameter_gradients(channels, grid, transpose):
    """A tracked application gives the same parameter gradients as the spatial one (through the spectra)."""
    op = random_operator(channels, grid, seed=1)
    z, r = random_state(op), random_state(op)

    def grads(apply) -> dict[str, torch.Tensor]:
        op.zero_grad(set_to_none=True)
        sum((o * ri).sum() for o, ri in zip(apply(z, transpose), r, strict=True)).backward()
        return {n: p.grad.clone() for n, p in op.named_parameters() if p.grad is not None}

    spatial = grads(op.matvec)
    freq = grads(lambda zz, tr: op.frequency_weight().apply(zz, tr))
    assert spatial.keys() == freq.keys() and {"A0.0", "B0.0", "g_param", "h_param"} <= spatial.keys()
    for name, g in spatial.items():
        torch.testing.assert_close(freq[name], g, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("channels,grid", [OPERATORS[1], OPERATORS[5]])
def test_resolvent_from_shared_spectra(channels, grid):
    op = random_operator(channels, grid, seed=2)
    r = random_state(op)
    own, shared = op.resolvent(0.3), op.frequency_weight().resolvent(0.3)
    for transpose in (False, True):
        assert max_diff(shared.apply(r, transpose), own.apply(r, transpose)) < 1e-12


@pytest.mark.parametrize("arch", ["conv", "multitier"])
@pytest.mark.parametrize("solver,alpha", [("peaceman_rachford", 1.0), ("forward_backward", 0.1)])
def test_model_fixed_point_and_gradients_match(arch, solver, alpha):
    """Same weights and batch: the same equilibrium, iteration counts and parameter gradients either way."""
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    runs = {}
    for mode in ("frequency", "spatial"):
        model = tiny_model(arch, solver=solver, alpha=alpha, tol=1e-4, mondeq_w=mode)
        assert model.solver.mondeq_w == mode
        z = model.equilibrium(x)
        z[-1].square().sum().backward()
        stats = model.last_stats
        runs[mode] = ([zi.detach() for zi in z], {n: p.grad for n, p in model.named_parameters()},
                      (stats["forward"].iters, stats["backward"].iters))
    (z_f, g_f, it_f), (z_s, g_s, it_s) = runs["frequency"], runs["spatial"]
    assert it_f == it_s and min(it_f) > 2
    assert max_diff(z_f, z_s) < 1e-10
    assert g_f.keys() == g_s.keys()
    for name, g in g_s.items():
        torch.testing.assert_close(g_f[name], g, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("arch,dataset,count", [("conv", "cifar10", 172_218), ("multitier", "mnist", 81_394),
                                                ("fc", "mnist", 84_313)])
def test_parameter_counts_do_not_depend_on_the_setting(arch, dataset, count):
    for mode in ("frequency", "spatial"):
        model = build_mondeq(arch, dataset, solver=splitting(mondeq_w=mode))
        assert sum(p.numel() for p in model.parameters()) == count


def test_fc_model_ignores_the_setting():
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    out = [tiny_model("fc", mondeq_w=mode)(x) for mode in ("frequency", "spatial")]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_bad_setting_is_refused():
    assert MondeqSolverConfig().mondeq_w == "frequency"
    with pytest.raises(ConfigError, match="unknown solver.mondeq_w 'fft'; valid choices: frequency, spatial"):
        MondeqSolverConfig(mondeq_w="fft")


@pytest.mark.parametrize("bias_in_prox", [False, True])
def test_peaceman_rachford_reflection_in_place_is_bit_for_bit(bias_in_prox):
    """The solver writes 2 z_half - u_half over u_half: the iterates of the plain expressions, bit for bit."""
    model = tiny_model("multitier", dtype=torch.float32)
    op = model.operator
    x = torch.nn.functional.pad(torch.randn(3, 1, 8, 8), (1, 1, 1, 1))
    with torch.no_grad():
        b = op.inject(x)
        masks = op.state_masks(b[0])
        prox = model._relu(masks)
        R = op.frequency_weight().resolvent(0.7)
        problem = SplittingProblem(linear=op.matvec, resolvent=R.apply, prox=prox, bias=b, bias_in_prox=bias_in_prox)
        z_solver, _ = peaceman_rachford(problem, 0.7, tol=0.0, max_iter=8)
        z = [torch.zeros_like(t) for t in b]
        u, ab = z, [0.7 * t for t in b]
        for _ in range(8):
            u_half = [2 * zi - ui for zi, ui in zip(z, u, strict=True)]
            z_half = R.apply(u_half if bias_in_prox else [t + a for t, a in zip(u_half, ab, strict=True)])
            u = [2 * zh - uh for zh, uh in zip(z_half, u_half, strict=True)]
            pre = [t + a for t, a in zip(u, ab, strict=True)] if bias_in_prox else u
            z = [torch.relu(t) * mk for t, mk in zip(pre, masks, strict=True)]
    assert all(torch.equal(a, c) for a, c in zip(z_solver, z, strict=True))
