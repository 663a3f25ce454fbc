"""Config composition: the real conf/ tree, every model x dataset pair, asserted against the reference protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pcdeq.family import get_family
from pcdeq.solver import solver_kind
from pcdeq.training.config import net_from_config
from tests.helpers import CONF, compose_train, resolved

DATASETS = ["digits", "mnist", "svhn", "cifar10", "cifar10_aug"]

# The reference implementation's protocol per dataset: epochs, milestone, weight decay (lr 5e-4, batch 64).
PCDEQ_PROTOCOL = {"mnist": (40, 30, 1.5e-2), "svhn": (80, 70, 2e-2), "cifar10": (120, 100, 2e-2)}
PCDEQ_SIZES = {
    ("pcdeq_linear", "mnist"): 80,
    ("pcdeq_conv", "mnist"): 82,
    ("pcdeq_conv", "svhn"): 125,
    ("pcdeq_conv", "cifar10"): 125,
    ("pcdeq_multiconv", "mnist"): [12, 24, 48],
    ("pcdeq_multiconv", "svhn"): [20, 50, 80],
    ("pcdeq_multiconv", "cifar10"): [20, 50, 80],
    ("pcdeq_multiconv", "cifar10_aug"): [100, 120, 140],
}


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", ["pcdeq_linear", "pcdeq_conv", "pcdeq_multiconv"])
def test_pcdeq_model_dataset_pairs(model: str, dataset: str) -> None:
    cfg = compose_train(f"model={model}", f"dataset={dataset}")
    assert cfg.model.name == model and cfg.dataset.name == dataset
    assert cfg.solver.fwd_solver == "fixed_point" and cfg.solver.fwd_tol == pytest.approx(1e-4)
    assert cfg.optim.name == "adamw" and cfg.optim.lr == pytest.approx(5e-4 if dataset != "digits" else 5e-3)
    assert cfg.dataset.batch_size == 64
    if (model, dataset) in PCDEQ_SIZES:
        assert cfg.model.channels == PCDEQ_SIZES[(model, dataset)]
    if dataset in PCDEQ_PROTOCOL:
        epochs, milestone, wd = PCDEQ_PROTOCOL[dataset]
        assert cfg.trainer.max_epochs == epochs
        assert list(cfg.optim.scheduler.milestones) == [milestone]
        assert cfg.optim.weight_decay == pytest.approx(wd)
        assert cfg.optim.scheduler.gamma == pytest.approx(0.1)
    assert cfg.dataset.normalize is (dataset not in ("mnist", "digits"))  # reference: MNIST is ToTensor only
    # The network the config describes builds, with the configured width.
    net = net_from_config(resolved(cfg, "model", "dataset", "solver"))
    assert sum(p.numel() for p in net.parameters()) > 0


def test_cifar10_conv_is_the_paper_model() -> None:
    cfg = compose_train("model=pcdeq_conv", "dataset=cifar10")
    net = net_from_config(resolved(cfg, "model", "dataset", "solver"))
    assert sum(p.numel() for p in net.parameters()) == 164_760
    assert (cfg.trainer.max_epochs, cfg.optim.weight_decay, cfg.dataset.batch_size) == (120, 2e-2, 64)


def test_activation_switches_variant() -> None:
    cfg = compose_train("model=pcdeq_linear", "dataset=mnist", "model.activation=sigmoid")
    net = net_from_config(resolved(cfg, "model", "dataset", "solver"))
    assert net.deq_layers()[0].act.variant == "pcdeq2"
    assert sum(p.numel() for p in net.parameters()) == 70_410


def test_overrides_reach_every_group() -> None:
    cfg = compose_train("solver=anderson", "solver.fwd_tol=1e-6", "solver.bwd_max_iter=7", "optim.lr=0.1",
                        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "seed=5", "dataset.val_size=100")
    assert cfg.solver.fwd_solver == "anderson" and cfg.solver.fwd_tol == 1e-6 and cfg.solver.bwd_max_iter == 7
    assert cfg.optim.lr == 0.1 and cfg.trainer.max_epochs == 1 and cfg.trainer.limit_train_batches == 2
    assert cfg.seed == 5 and cfg.dataset.val_size == 100
    layer = net_from_config(resolved(cfg, "model", "dataset", "solver")).deq_layers()[0]
    assert layer.solver.fwd_solver == "anderson" and layer.solver.bwd_max_iter == 7


@pytest.mark.parametrize("mode", ["frequency", "spatial"])
def test_mondeq_w_reaches_the_model(mode: str) -> None:
    overrides = ["model=mondeq_conv", "dataset=digits"] + ([f"solver.mondeq_w={mode}"] if mode == "spatial" else [])
    cfg = compose_train(*overrides)
    assert cfg.solver.mondeq_w == mode  # frequency: the default
    assert net_from_config(resolved(cfg, "model", "dataset", "solver")).solver.mondeq_w == mode


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_trainer_groups(trainer: str) -> None:
    cfg = compose_train(f"trainer={trainer}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert {"cpu": "cpu", "gpu": "gpu", "ddp": "auto"}[trainer] == cfg.trainer.accelerator
    if trainer == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2


def test_run_dirs_are_unique_per_microsecond_and_job() -> None:
    import re

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    # microseconds in the timestamp and the Slurm job id keep jobs started in the same second apart
    assert re.search(r"runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}_local$", cfg.hydra.run.dir)
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert "SLURM_JOB_ID" in raw["run"]["dir"] and "hydra.job.num" in raw["sweep"]["subdir"]


EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_to_its_table_row(name: str) -> None:
    cfg = compose_train(f"experiment={name}")
    assert f"{cfg.model.name}_{cfg.dataset.name}" == name == cfg.experiment_name
    assert solver_kind(cfg.solver.fwd_solver) == get_family(cfg.model.family).solver_kind
    assert cfg.trainer.max_epochs >= (20 if cfg.model.family == "node" else 40)  # the ANODE paper: 20 epochs
    # The papers' criteria: one whole-batch residual (the pcDEQ reference, monDEQ's authors), and monDEQ exactly
    # as the authors parametrise it (raw scalars, gradient added at the prox step of the PR backward).
    assert cfg.solver.stop_mode == "batch"
    if cfg.model.family == "mondeq":
        assert cfg.model.positive_scalars is False and cfg.solver.bwd_bias == "prox"
    net = net_from_config(resolved(cfg, "model", "dataset", "solver"))
    assert sum(p.numel() for p in net.parameters()) > 0
