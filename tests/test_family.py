"""The model-family contract and registry, the light core, and the configs that describe the families."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import pcdeq
from pcdeq.families.mondeq.solver_config import MondeqSolverConfig
from pcdeq.family import FAMILIES, EquilibriumNet, Family, build_net, get_family, register_family, solver_fields
from pcdeq.solver.config import SolverConfig
from tests.helpers import CONF, compose_train

FAMILY_ARCHS = [(f.name, arch) for f in FAMILIES.values() for arch in f.archs]


def _tiny(family: str, arch: str) -> EquilibriumNet:
    size = {"linear": 6, "conv": 4, "multiconv": (3, 4, 5), "fc": 6, "multitier": (2, 3, 4), "aug_conv": 4}[arch]
    return build_net(family, arch, "digits", channels=size)


@pytest.mark.parametrize(("family", "arch"), FAMILY_ARCHS)
def test_every_network_implements_the_contract(family: str, arch: str) -> None:
    torch.manual_seed(0)
    net = _tiny(family, arch)
    assert isinstance(net, EquilibriumNet) and net.family == family
    x = torch.rand(4, 1, 8, 8)
    net.on_train_batch_start(x, 0, 10)
    net(x).sum().backward()
    stats = net.solver_stats()
    assert stats["forward"]["iters"] >= 1 and stats["backward"]["iters"] >= 1  # the implicit backward ran
    net.project_()
    assert set(net.describe()) == {"activation", "variant", "solver"}
    assert set(net.certificate()) <= set(pcdeq.family.CERTIFICATE_KEYS)
    assert all(isinstance(v, float) for v in net.epoch_metrics().values())
    histories = net.residual_history()
    if family == "node":  # an ODE solve has no fixed-point residual
        assert histories == []
    else:
        assert histories and all(len(h) >= 1 and all(r >= 0 for r in h) for h in histories)


@pytest.mark.parametrize(("family", "arch"), FAMILY_ARCHS)
def test_module_apply_reaches_every_submodule(family: str, arch: str) -> None:
    # nn.Module.apply(fn) must not be shadowed by an operator method (it was: NonnegWeight.apply was W z).
    net = _tiny(family, arch)
    seen: list[type] = []
    assert net.apply(lambda m: seen.append(type(m))) is net
    assert len(seen) == len(list(net.modules()))


def test_build_net_checks_options_and_solver_kind() -> None:
    with pytest.raises(pcdeq.ConfigError, match="unknown option"):
        build_net("pcdeq", "linear", "digits", m=1.0)
    with pytest.raises(pcdeq.ConfigError, match="solver=peaceman_rachford or solver=forward_backward"):
        build_net("mondeq", "fc", "digits", solver=SolverConfig())
    with pytest.raises(pcdeq.ConfigError, match="unknown model family 'deq'; valid choices: mondeq, node, pcdeq"):
        get_family("deq")


def test_solver_config_rejects_unknown_names_and_bad_alpha() -> None:
    with pytest.raises(pcdeq.ConfigError, match="unknown solver 'broyden'"):
        SolverConfig(fwd_solver="broyden")
    with pytest.raises(pcdeq.ConfigError, match="solver.alpha must be a positive"):
        MondeqSolverConfig(alpha=0.0)


def test_model_api_imports_without_the_training_stack() -> None:
    code = ("import sys, pcdeq; heavy = [m for m in ('lightning', 'torchvision', 'hydra', 'omegaconf', "
            "'torchmetrics') if m in sys.modules]; print(heavy); assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("family", "arch"), FAMILY_ARCHS)
def test_model_configs_match_the_registry(family: str, arch: str) -> None:
    """The YAML files select what the registry says: solver defaults, protocol set, paper size, name."""
    fam = get_family(family)
    cfg = compose_train(f"model={family}_{arch}", "dataset=mnist")
    assert cfg.model.name == f"{family}_{arch}" and cfg.model.family == family and cfg.model.arch == arch
    assert cfg.protocol.name == fam.protocols[arch]
    solver = OmegaConf.to_container(cfg.solver)
    own = fam.solver_class.__dataclass_fields__  # the group holds every family's keys; the family reads its own
    assert fam.solver_class(**{k: v for k, v in solver.items() if k in own}) == fam.default_solver
    size = fam.paper_size(arch, "mnist")
    assert cfg.model.channels == (list(size) if isinstance(size, tuple) else size)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1e-3", "Could not override 'optim.lrr'"),
        ("seed=abc", "Error merging override seed=abc"),
        ("solver.fwd_tol=fast", "Error merging override solver.fwd_tol=fast"),
        ("model.activaton=tanh", "Could not override 'model.activaton'"),
        ("dataset.batch_size=1.5", "Error merging override dataset.batch_size=1.5"),
    ],
)
def test_schema_rejects_mistyped_keys_and_wrong_types(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException, match=message.replace(".", r"\.").replace("'", ".")):
        compose_train(override)


def test_protocol_group_applies_the_papers_values() -> None:
    cfg = compose_train("model=mondeq_multitier", "dataset=cifar10")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler.step_size) == ("adam", 1e-2, 10)
    assert cfg.protocol.published is True and cfg.protocol.dataset == "cifar10"
    cfg = compose_train("model=pcdeq_conv", "dataset=cifar10")
    assert cfg.protocol.published is False and "assumption" in cfg.protocol.note
    # An explicit value still wins over the protocol.
    assert compose_train("dataset=mnist", "optim.lr=0.1").optim.lr == 0.1


TOY_MODULE = '''
import torch
from dataclasses import dataclass
from torch import nn
from pcdeq.family import Family, register_family
from pcdeq.dataset_specs import get_spec
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.stats import SolverStats


@dataclass
class ToyOptions:
    depth: int = 3


class Unrolled(nn.Module):
    """A weight-tied tanh block unrolled ``depth`` times (plain backprop): the smallest complete family."""

    family = "toyunrolled"

    def __init__(self, arch, dataset, *, channels, solver, depth=3):
        super().__init__()
        spec = get_spec(dataset)
        self.inp = nn.Linear(int(torch.tensor(spec.shape).prod()), channels)
        self.w = nn.Linear(channels, channels)
        self.head = nn.Linear(channels, spec.num_classes)
        self.depth, self.solver = depth, solver

    def forward(self, x):
        u = self.inp(x.flatten(1))
        z = torch.zeros_like(u)
        for _ in range(self.depth):
            z = torch.tanh(self.w(z) + u)
        return self.head(z)

    def solver_stats(self):
        return {"forward": {"iters": float(self.depth), "iters_max": float(self.depth), "residual_mean": 0.0,
                            "residual_max": 0.0, "n_not_converged": 0.0, "nonfinite": 0.0, "contraction": 0.0}}

    def project_(self):
        pass

    def on_train_batch_start(self, x, batch_idx, num_batches):
        pass

    def epoch_metrics(self):
        return {}

    def certificate(self):
        return {}

    def describe(self):
        return {"activation": "tanh", "variant": None, "solver": "unrolled"}

    def residual_history(self):
        return []


register_family(Family(
    name="toyunrolled", archs=("mlp",), sizes={"mlp": {}}, default_sizes={"mlp": 16}, build=Unrolled,
    solver_kind="map", default_solver=SolverConfig(), protocols={"mlp": "pcdeq"}, options=ToyOptions,
))
'''

TOY_CONFIG = """# @package _global_
defaults:
  - override /solver: fixed_point
  - _self_
model:
  family: toyunrolled
  arch: mlp
  name: ${model.family}_${model.arch}
  channels: ${paper_channels:${model.family},${model.arch},${dataset.name}}
  depth: 2
"""


def test_a_third_family_is_one_module_and_one_config_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "toyfam.py").write_text(TOY_MODULE)
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "toyunrolled_mlp.yaml").write_text(TOY_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    from pcdeq.training.pipeline import train

    importlib.import_module("toyfam")
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", overrides=[
                f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=toyunrolled_mlp", "trainer.max_epochs=2",
                f"paths.output_dir={tmp_path / 'run'}", "logger=none", "num_threads=1",
            ])
        results = train(cfg)
    finally:
        FAMILIES.pop("toyunrolled", None)
    assert results["status"] == "completed" and results["family"] == "toyunrolled" and results["test/acc"] > 0.5
    assert results["fwd_iters"] == 2.0 and results["solver"] == "unrolled"
    assert (tmp_path / "run" / "results.json").is_file()


@dataclass
class _DampedSolverConfig(SolverConfig):
    """A family's own solver key, as a new family declares it (docs/extending.md)."""

    damping: float = field(default=0.5, metadata={"valid": "(0, 1]", "example": "0.5"})


def _toy_family(name: str, default_solver: SolverConfig) -> Family:
    return Family(name=name, archs=("mlp",), sizes={"mlp": {}}, default_sizes={"mlp": 4}, build=lambda *a, **k: None,
                  solver_kind="map", default_solver=default_solver, protocols={"mlp": "pcdeq"})


def test_a_family_adds_solver_keys_that_stay_solver_keys_on_the_command_line() -> None:
    from pcdeq.training.config import solver_config
    from pcdeq.training.schema import register_schemas, solver_schema
    from pcdeq.training.validate import check_declared, train_groups

    register_family(_toy_family("toydamped", _DampedSolverConfig()))
    try:
        register_schemas()
        assert "damping" in {f.name for f in dataclasses.fields(solver_schema())}
        cfg = compose_train("model=pcdeq_linear", "solver.damping=0.7")
        assert cfg.solver.damping == 0.7 and cfg.solver.alpha == 1.0  # one flat group: every family's keys
        with pytest.raises(pcdeq.ConfigError, match=r"^solver\.damping=2: out of range; valid: a number in \(0, 1\]"):
            check_declared({"solver": {"damping": 2}}, train_groups())
        flat = OmegaConf.to_container(cfg.solver)
        toy = solver_config(flat, get_family("toydamped"))
        assert isinstance(toy, _DampedSolverConfig) and toy.damping == 0.7 and toy.fwd_tol == cfg.solver.fwd_tol
        pc = solver_config(flat, get_family("pcdeq"))  # the other families read only their own keys
        assert not hasattr(pc, "damping") and not hasattr(pc, "alpha") and pc.inplace is True
    finally:
        FAMILIES.pop("toydamped", None)
        register_schemas()
    with pytest.raises(ConfigCompositionException, match="Could not override 'solver.damping'"):
        compose_train("model=pcdeq_linear", "solver.damping=0.7")  # gone with its family


def test_two_families_may_share_a_solver_key_only_alike() -> None:
    @dataclass
    class Other(SolverConfig):
        damping: float = field(default=0.9, metadata={"valid": "(0, 1]", "example": "0.5"})  # another default

    register_family(_toy_family("toydamped", _DampedSolverConfig()))
    register_family(_toy_family("toyother", Other()))
    try:
        with pytest.raises(ValueError, match="solver.damping is declared differently by _DampedSolverConfig and Other"):
            solver_fields()
    finally:
        FAMILIES.pop("toydamped", None)
        FAMILIES.pop("toyother", None)
    assert "damping" not in solver_fields()
