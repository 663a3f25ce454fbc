"""Shared fixtures for the core pcDEQ tests.

The oracles here are deliberately written from the paper's formulas, not from ``pcdeq``'s code: W is rebuilt
from (g, v) by hand, and each activation comes with its own closed-form derivative and the injection its
variant prescribes. A test that compares the package against these can therefore catch a wiring mistake
(wrong injection, wrong normalisation axis) that a test reusing ``layer.map`` never would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.families.pcdeq.solver_config import PcdeqSolverConfig
from pcdeq.solver.config import SolverConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class OracleAct:
    """An activation as the paper defines it: sigma, sigma' and the injection x -> x~ of its variant."""

    fn: Callable[[Tensor], Tensor]
    deriv: Callable[[Tensor], Tensor]
    inject: Callable[[Tensor], Tensor]


def _softplus5(x: Tensor) -> Tensor:
    # softplus with beta = 5, written out so it does not share code with the package (exact for the
    # |x| < 10 used here; exp(5x) would overflow only beyond x ~ 140)
    return torch.log1p(torch.exp(5.0 * x)) / 5.0


def _relu6_deriv(t: Tensor) -> Tensor:
    return ((t > 0) & (t < 6)).to(t.dtype)


ORACLE_ACTS: dict[str, OracleAct] = {
    "tanh": OracleAct(torch.tanh, lambda t: 1 - torch.tanh(t) ** 2, _softplus5),
    "softsign": OracleAct(lambda t: t / (1 + t.abs()), lambda t: 1 / (1 + t.abs()) ** 2, _softplus5),
    "relu6": OracleAct(lambda t: t.clamp(0, 6), _relu6_deriv, _softplus5),
    "sigmoid": OracleAct(
        lambda t: 1 / (1 + torch.exp(-t)),
        lambda t: torch.sigmoid(t) * (1 - torch.sigmoid(t)),
        lambda x: x.clamp_min(0),  # pcDEQ-2 injects relu(x)
    ),
}


def oracle_weight(layer: PcDEQLayer) -> Tensor:
    """W = g * v / ||v|| per output row (dense) or per output filter (conv), rebuilt by hand."""
    v, g = layer.W.v, layer.W.g
    norms = v.reshape(v.shape[0], -1).norm(dim=1)
    return v * (g / norms).reshape(-1, *([1] * (v.dim() - 1)))


def oracle_apply(layer: PcDEQLayer, w: Tensor, z: Tensor) -> Tensor:
    """W z for the layer's kind (3x3 convolution with padding 1 for conv)."""
    return z @ w.T if layer.W.kind == "dense" else F.conv2d(z, w, padding=1)


def oracle_map(layer: PcDEQLayer, x: Tensor, act: str) -> Callable[[Tensor], Tensor]:
    """z -> sigma(W z + x~) from the paper, for the layer's current parameters and a raw input x."""
    oa = ORACLE_ACTS[act]
    w = oracle_weight(layer)
    x_inj = oa.inject(x)
    return lambda z: oa.fn(oracle_apply(layer, w, z) + x_inj)


def tight_solver(tol: float = 1e-12, max_iter: int = 5000, stop_mode: str = "sample", **kw) -> PcdeqSolverConfig:
    """Float64-grade solver settings: converged to near machine precision, generous cap."""
    return PcdeqSolverConfig(
        fwd_tol=tol, bwd_tol=tol, fwd_max_iter=max_iter, bwd_max_iter=max_iter, stop_mode=stop_mode, **kw
    )


def set_row_norms_(layer: PcDEQLayer, lo: float, hi: float) -> None:
    """Random nonnegative v and row norms of W drawn from U[lo, hi] (||W row|| = g by construction)."""
    with torch.no_grad():
        layer.W.v.copy_(torch.rand_like(layer.W.v))
        layer.W.g.copy_(torch.empty_like(layer.W.g).uniform_(lo, hi))


def set_row_sums_(layer: PcDEQLayer, r: float) -> None:
    """Random nonnegative v, then g chosen so every row (filter) of W sums to r.

    For a dense W >= 0 with equal row sums, the Perron root is exactly r, which lets a test place the layer
    where iteration is slow (r near 1 / sigma'(0)) instead of hoping a random draw lands there.
    """
    with torch.no_grad():
        v = torch.rand_like(layer.W.v) + 0.05  # bounded away from 0: keeps W irreducible (and primitive)
        layer.W.v.copy_(v)
        flat = v.reshape(v.shape[0], -1)
        layer.W.g.copy_(r * flat.norm(dim=1) / flat.sum(dim=1))


@pytest.fixture
def seeded() -> None:
    """Start from a fixed RNG state, so tolerances are checked on reproducible draws.

    Opt-in (``usefixtures``) rather than autouse: other test modules keep control of their own seeding.
    """
    torch.manual_seed(0)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread, then restore the previous setting.

    The core tests iterate maps on tensors of a few dozen entries thousands of times. On a 2-core machine that
    is also busy with other processes, OpenMP's two spinning threads made such a loop ~300x slower (35 ms
    instead of 0.1 ms per iteration); one thread costs nothing measurable at this size. Opt-in
    (``usefixtures``) so tests that want the default threading keep it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def oracle() -> SimpleNamespace:
    """The hand-written oracles and layer set-up helpers above, as one namespace.

    Served as a fixture rather than imported, so the test modules do not depend on how pytest puts
    ``tests/`` on ``sys.path``.
    """
    return SimpleNamespace(
        acts=ORACLE_ACTS,
        weight=oracle_weight,
        apply=oracle_apply,
        map=oracle_map,
        tight_solver=tight_solver,
        set_row_norms_=set_row_norms_,
        set_row_sums_=set_row_sums_,
    )


@pytest.fixture
def make_layer() -> Callable[..., PcDEQLayer]:
    """Factory for float64 pcDEQ layers with tight solver settings (override via keyword arguments)."""

    def _make(
        channels: int,
        kind: str = "dense",
        activation: str = "tanh",
        *,
        solver: SolverConfig | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> PcDEQLayer:
        return PcDEQLayer(channels, kind, activation, solver=solver or tight_solver()).to(dtype)

    return _make
