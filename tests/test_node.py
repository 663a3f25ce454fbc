"""The Neural ODE family (pcdeq.families.node): sizes, the ODE solve against closed forms, gradients, NFE,
failures, configs.

Oracles: the parameter formulas of the reference (written out here), the matrix exponential for a linear ODE and
its autograd gradient, central finite differences, a forward hook counting the ODE function's calls.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from pcdeq.errors import ConfigError
from pcdeq.families.node import ConvODEFunc, NeuralODE, build_node, solve_ode
from pcdeq.families.node.odefunc import with_time
from pcdeq.families.node.solver_config import NodeSolverConfig
from pcdeq.family import build_net
from pcdeq.solver import get_solver
from pcdeq.solver.stats import SolverStats
from pcdeq.training.config import net_from_config
from pcdeq.training.validate import validate_overrides, validate_train
from tests.helpers import CONF, compose_train, resolved

TIGHT = NodeSolverConfig(fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_rtol=1e-9, ode_atol=1e-10)


def reference_count(c: int, h: int, w: int, filters: int, augment: int, classes: int = 10) -> int:
    """The reference's parameter formula: time-dependent conv1/conv2/conv3 with bias, then one linear head."""
    s, f = c + augment, filters
    return ((s + 1) * f + f) + ((f + 1) * f * 9 + f) + ((f + 1) * s + s) + (s * h * w * classes + 10)


@pytest.mark.parametrize(("experiment", "shape", "filters", "augment", "params"), [
    ("node_conv_mnist", (1, 28, 28), 92, 0, 85_316),
    ("node_aug_conv_mnist", (1, 28, 28), 64, 5, 85_462),
    ("node_conv_cifar10", (3, 32, 32), 125, 0, 173_611),
    ("node_aug_conv_cifar10", (3, 32, 32), 64, 10, 172_452),
    ("node_conv_svhn", (3, 32, 32), 125, 0, 173_611),
    ("node_aug_conv_svhn", (3, 32, 32), 64, 10, 172_452),
])
def test_table_rows_have_the_reference_sizes(experiment, shape, filters, augment, params) -> None:
    cfg = compose_train(f"experiment={experiment}")
    net = net_from_config(resolved(cfg, "model", "dataset", "solver"))
    assert isinstance(net, NeuralODE) and net.augment_dim == augment and net.func.conv2.out_channels == filters
    assert sum(p.numel() for p in net.parameters()) == params == reference_count(*shape, filters, augment)


def test_paper_protocol_and_solver() -> None:
    cfg = compose_train("experiment=node_aug_conv_mnist")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.scheduler.name) == ("adam", 1e-3, 0.0,
                                                                                                "constant")
    assert (cfg.dataset.batch_size, cfg.dataset.normalize, cfg.trainer.max_epochs) == (256, False, 20)
    assert cfg.protocol.published is True and cfg.protocol.name == "node"
    s = cfg.solver
    assert (s.ode_method, s.ode_rtol, s.ode_atol, s.ode_adjoint, s.ode_max_num_steps) == ("dopri5", 1e-3, 1e-3,
                                                                                           True, 1000)
    assert compose_train("experiment=node_conv_cifar10").protocol.published is False  # the MNIST values, assumed


class LinearField(nn.Module):
    """dy/dt = scale * A y (batched over rows of y), counting its evaluations like ConvODEFunc."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.scale = 1.0
        self.evaluations = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        return self.scale * y @ self.a.T


def _linear_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.7
    y0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return a, y0


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3"])
def test_linear_ode_matches_the_matrix_exponential(method: str) -> None:
    a, y0 = _linear_problem()
    field = LinearField(a)
    stats: dict[str, SolverStats] = {}
    cfg = NodeSolverConfig(fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_method=method, ode_rtol=1e-9,
                       ode_atol=1e-10)
    with torch.no_grad():
        y1 = solve_ode(field, y0, cfg, stats.__setitem__)
    exact = y0 @ torch.linalg.matrix_exp(a).T
    # local error control at 1e-9 accumulates to a global error of 1e-7 (dopri8) to 2e-6 (3rd-order bosh3)
    assert (y1 - exact).abs().max() < 1e-5
    assert stats["forward"].converged and stats["forward"].iters == field.evaluations > 0
    # the paper's tolerance is looser, but still close
    with torch.no_grad():
        loose = solve_ode(field, y0, NodeSolverConfig(fwd_solver="torchdiffeq", bwd_solver="torchdiffeq"),
                          stats.__setitem__)
    assert (loose - exact).abs().max() < 1e-2


def test_the_registered_ode_solver_returns_the_solution_and_its_stats() -> None:
    a, y0 = _linear_problem(5)
    field = LinearField(a)
    with torch.no_grad():
        y1, stats = get_solver("torchdiffeq", kind="ode")(field, y0, solver=TIGHT)
    assert torch.allclose(y1, y0 @ torch.linalg.matrix_exp(a).T, atol=1e-6)
    assert stats.converged and stats.iters == field.evaluations


def test_time_enters_every_convolution_as_a_channel() -> None:
    # f = t on every channel (only conv3's time-channel weight is 1): y(1) = y(0) + 1/2 exactly, and y(0) unused
    func = ConvODEFunc(state_channels=2, filters=3).double()
    with torch.no_grad():
        for conv in (func.conv1, func.conv2, func.conv3):
            conv.weight.zero_()
            conv.bias.zero_()
        func.conv3.weight[:, 0] = 1.0  # input channel 0 is the time plane
    y0 = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y1 = solve_ode(func, y0, TIGHT, lambda *_: None)
    assert torch.allclose(y1, y0 + 0.5, atol=1e-9)


@pytest.mark.parametrize("adjoint", [True, False])
def test_gradient_of_a_linear_ode_matches_the_matrix_exponentials(adjoint: bool) -> None:
    a, y0 = _linear_problem(1)
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    field = LinearField(a)
    y0_solve = y0.clone().requires_grad_(True)
    cfg = NodeSolverConfig(fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_rtol=1e-10, ode_atol=1e-11,
                       ode_adjoint=adjoint)
    stats: dict[str, SolverStats] = {}
    (solve_ode(field, y0_solve, cfg, stats.__setitem__) * w).sum().backward()
    # oracle: autograd through torch.linalg.matrix_exp (a different algorithm for the same map)
    a_ref, y0_ref = a.clone().requires_grad_(True), y0.clone().requires_grad_(True)
    ((y0_ref @ torch.linalg.matrix_exp(a_ref).T) * w).sum().backward()
    assert torch.allclose(field.a.grad, a_ref.grad, rtol=1e-6, atol=1e-8)
    assert torch.allclose(y0_solve.grad, y0_ref.grad, rtol=1e-6, atol=1e-8)
    assert ("backward" in stats) == adjoint  # backprop through the solver evaluates no f backward


def _tiny_net(augment: int, adjoint: bool = True) -> NeuralODE:
    torch.manual_seed(0)
    cfg = NodeSolverConfig(fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_rtol=1e-9, ode_atol=1e-10,
                       ode_adjoint=adjoint)
    return build_node("aug_conv" if augment else "conv", "digits", channels=3,
                      augment_dim=augment or None, solver=cfg).double()


class TanhField(ConvODEFunc):
    """The ODE function with tanh for relu: a smooth field, whose exact gradient the solvers approach as the
    tolerance shrinks (relu's kinks make the tight-tolerance solve costly and the gradient only O(tol)-close)."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        h = torch.tanh(self.conv1(with_time(t, x)))
        h = torch.tanh(self.conv2(with_time(t, h)))
        return self.conv3(with_time(t, h))


def _smooth_net(adjoint: bool) -> NeuralODE:
    net = _tiny_net(augment=2, adjoint=adjoint)
    smooth = TanhField(3, 3).double()
    smooth.load_state_dict(net.func.state_dict())
    net.func = smooth
    return net


def _loss(net: NeuralODE, x: torch.Tensor) -> torch.Tensor:
    return net(x).square().sum()


def test_adjoint_gradients_match_backprop_and_finite_differences() -> None:
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for adjoint in (True, False):
        net = _smooth_net(adjoint)
        _loss(net, x).backward()
        grads[adjoint] = {n: p.grad.clone() for n, p in net.named_parameters()}
    for name in grads[True]:
        assert torch.allclose(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-9), name
    # central differences on entries of each ODE-function tensor (h large enough to stay above the step-size
    # jitter of the adaptive solver)
    net = _smooth_net(adjoint=True)
    h = 1e-4
    for name, p in net.func.named_parameters():
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[idx] += h
                up = _loss(net, x).item()
                p[idx] -= 2 * h
                down = _loss(net, x).item()
                p[idx] += h
            fd = (up - down) / (2 * h)
            assert grads[True][f"func.{name}"][idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-7), name


def test_relu_model_adjoint_is_close_to_backprop_at_the_papers_tolerance() -> None:
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    grads = []
    for adjoint in (True, False):
        torch.manual_seed(0)
        net = build_node("aug_conv", "digits", channels=4, solver=NodeSolverConfig(
            fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_adjoint=adjoint))
        _loss(net, x).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.func.parameters()]))
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 1e-2


def test_nfe_counts_every_evaluation_forward_and_backward() -> None:
    torch.manual_seed(0)
    net = build_node("conv", "digits", channels=4)  # the paper's solver settings
    calls: list[int] = []
    net.func.register_forward_hook(lambda *_: calls.append(1))  # an independent count of f's evaluations
    x = torch.rand(3, 1, 8, 8)
    loss = net(x).sum()
    nfe = len(calls)
    loss.backward()
    stats = net.solver_stats()
    assert stats["forward"]["iters"] == nfe > 0
    assert stats["backward"]["iters"] == len(calls) - nfe > 0
    assert stats["forward"]["n_not_converged"] == stats["backward"]["n_not_converged"] == 0
    with torch.no_grad():
        calls.clear()
        net(x)
    assert net.solver_stats()["forward"]["iters"] == len(calls)


def test_step_cap_and_nan_are_reported_not_raised() -> None:
    net = build_node("conv", "digits", channels=3, solver=NodeSolverConfig(
        fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_max_num_steps=1, ode_rtol=1e-9, ode_atol=1e-9))
    x = torch.rand(4, 1, 8, 8)
    logits = net(x)
    fwd = net.solver_stats()["forward"]
    assert torch.isnan(logits).all() and fwd["n_not_converged"] == 4 and fwd["nonfinite"] == 0
    logits.sum().backward()  # a failed forward solve has no graph: the backward still runs
    net = build_node("aug_conv", "digits", channels=3)
    out = net(torch.full((4, 1, 8, 8), math.nan))
    fwd = net.solver_stats()["forward"]
    assert torch.isnan(out).all() and fwd["nonfinite"] == 1 and fwd["n_not_converged"] == 4


def test_adjoint_step_cap_is_reported_and_leaves_no_gradient() -> None:
    a, y0 = _linear_problem()
    field = LinearField(a)
    stats: dict[str, SolverStats] = {}
    cfg = NodeSolverConfig(fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_max_num_steps=20)
    y1 = solve_ode(field, y0, cfg, stats.__setitem__)
    assert stats["forward"].converged
    field.scale = 1e4  # the adjoint now faces a stiff field: it needs far more than 20 steps
    y1.sum().backward()
    assert field.a.grad is None
    assert stats["backward"].n_not_converged == 3 and not stats["backward"].converged


@pytest.mark.parametrize(("override", "message"), [
    ("solver.ode_method=rk45", "solver.ode_method=rk45: unknown choice; valid: one of dopri5, dopri8, bosh3"),
    ("solver.ode_rtol=0", "solver.ode_rtol=0: out of range; valid: a number in (0, 1), e.g. solver.ode_rtol=1e-3"),
    ("solver.ode_atol=-1e-3", "solver.ode_atol=-0.001: out of range; valid: a number > 0"),
    ("solver.ode_max_num_steps=0", "solver.ode_max_num_steps=0: out of range; valid: an integer >= 1"),
])
def test_bad_solver_keys_on_the_command_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate_overrides([override])


def test_bad_model_keys_and_library_use() -> None:
    with pytest.raises(ConfigError, match=r"^model.augment_dim=-1: out of range; valid: an integer >= 1"):
        build_net("node", "aug_conv", "mnist", augment_dim=-1)
    with pytest.raises(ConfigError, match="use model=node_aug_conv"):
        build_net("node", "conv", "mnist", augment_dim=3)
    with pytest.raises(ConfigError, match=r"solver.ode_rtol=0.0: out of range"):
        NodeSolverConfig(fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_rtol=0.0)
    with pytest.raises(ConfigError, match="use solver=torchdiffeq for node_\\* models"):
        build_net("node", "conv", "mnist", solver=NodeSolverConfig())
    with pytest.raises(ConfigError, match="takes one filter count"):
        build_net("node", "conv", "mnist", channels=[3, 4])


def _train(tmp_path: Path, *overrides: str) -> dict:
    from pcdeq.training.pipeline import train

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[
            "dataset=mnist", "dataset.synthetic=true", "dataset.synthetic_size=[64,32]", "dataset.batch_size=32",
            "model.channels=4", "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'run'}", "logger=none",
            "num_threads=1", *overrides])
    return train(cfg)


def test_one_training_epoch_through_the_pipeline_reports_nfe(tmp_path: Path) -> None:
    results = _train(tmp_path, "model=node_aug_conv")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == on_disk["status"] == "completed" and on_disk["family"] == "node"
    assert on_disk["variant"] == "anode" and on_disk["solver"] == "dopri5"
    assert on_disk["num_params"] == reference_count(1, 28, 28, 4, 5)
    assert on_disk["fwd_iters"] >= 8 and on_disk["bwd_iters"] >= 8 and on_disk["test/fwd_iters"] >= 8
    assert on_disk["metrics"]["train/fwd_not_converged"] == 0 and on_disk["residual_history"] == []


def test_a_forward_step_cap_ends_the_run_as_diverged(tmp_path: Path) -> None:
    results = _train(tmp_path, "model=node_conv", "solver.ode_max_num_steps=1")
    assert results["status"] == "diverged" and results["test/acc"] is None
    assert results["metrics"]["train/fwd_not_converged"] > 0


def test_a_fixed_point_config_for_a_node_model_fails_validation(tmp_path: Path) -> None:
    cfg = compose_train("model=node_conv", "solver=fixed_point", f"paths.output_dir={tmp_path / 'run'}")
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="solver=torchdiffeq"):
        validate_train(OmegaConf.to_container(cfg, resolve=True), overrides=[])
