"""monDEQ configs and the optimisation protocols: composition against the paper's appendix E, schedules, results."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from pcdeq.results import SCHEMA_VERSION, atomic_write_json, read_results, write_results
from pcdeq.training.config import net_from_config
from pcdeq.training.optim import OneCycle, build_optimizer, build_scheduler
from tests.helpers import compose_train, resolved

# (model, dataset) -> (parameters, lr, schedule name, step size or max lr, epochs), from the monDEQ paper.
MONDEQ = {
    ("mondeq_fc", "mnist"): (84_313, 1e-3, "step", 10, 40),
    ("mondeq_conv", "mnist"): (79_500, 1e-3, "step", 10, 40),
    ("mondeq_multitier", "mnist"): (81_394, 1e-3, "step", 10, 40),
    ("mondeq_conv", "svhn"): (172_218, 1e-3, "step", 25, 40),
    ("mondeq_multitier", "svhn"): (170_194, 1e-3, "step", 10, 40),
    ("mondeq_conv", "cifar10"): (172_218, 1e-3, "step", 25, 40),
    ("mondeq_multitier", "cifar10"): (170_194, 1e-2, "step", 10, 40),
    ("mondeq_conv", "cifar10_aug"): (853_612, 1e-3, "onecycle", 1e-2, 65),
    ("mondeq_multitier", "cifar10_aug"): (1_014_546, 1e-3, "onecycle", 5e-2, 65),
}


@pytest.mark.parametrize(("model", "dataset"), sorted(MONDEQ))
def test_mondeq_paper_configs(model: str, dataset: str) -> None:
    params, lr, schedule, arg, epochs = MONDEQ[(model, dataset)]
    cfg = compose_train(f"model={model}", f"dataset={dataset}")
    for which in ("fwd", "bwd"):  # the authors: the same settings forward and backward
        assert cfg.solver[f"{which}_solver"] == "peaceman_rachford" and cfg.solver[f"{which}_tol"] == 1e-2
        assert cfg.solver[f"{which}_max_iter"] == 300
    assert cfg.solver.alpha_tuning is True and cfg.solver.stop_mode == "batch" and cfg.model.m == 1.0
    assert cfg.optim.name == "adam" and cfg.optim.lr == pytest.approx(lr)
    assert cfg.dataset.batch_size == 128 and cfg.dataset.normalize is True and cfg.trainer.max_epochs == epochs
    sched = cfg.optim.scheduler
    assert sched.name == schedule
    if schedule == "step":
        assert sched.step_size == arg and sched.gamma == pytest.approx(0.1)
    else:
        assert sched.max_lr == pytest.approx(arg) and (sched.up_epochs, sched.down_epochs) == (30, 30)
        assert list(sched.beta1) == [0.95, 0.85]
    net = net_from_config(resolved(cfg, "model", "dataset", "solver"))
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize("dataset", ["digits", "mnist", "svhn", "cifar10", "cifar10_aug"])
@pytest.mark.parametrize("model", ["mondeq_fc", "mondeq_conv", "mondeq_multitier"])
def test_every_mondeq_pair_composes_and_builds(model: str, dataset: str) -> None:
    cfg = compose_train(f"model={model}", f"dataset={dataset}", "solver=forward_backward")
    assert cfg.solver.fwd_solver == cfg.solver.bwd_solver == "forward_backward" and cfg.solver.alpha <= 0.125
    net = net_from_config(resolved(cfg, "model", "dataset", "solver"))
    assert net.alpha == pytest.approx(cfg.solver.alpha)


def test_pcdeq_solver_on_mondeq_model_is_refused() -> None:
    cfg = compose_train("model=mondeq_fc", "dataset=mnist", "solver=fixed_point")
    with pytest.raises(ValueError, match="solver=peaceman_rachford or solver=forward_backward for mondeq"):
        net_from_config(resolved(cfg, "model", "dataset", "solver"))


def test_onecycle_follows_the_monDEQ_schedule() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999]})
    sched = build_scheduler(opt, {"name": "onecycle", "max_lr": 1e-2, "up_epochs": 30, "down_epochs": 30,
                                  "beta1": [0.95, 0.85]}, steps_per_epoch=10)
    assert sched["interval"] == "step"
    lrs, betas = [], []
    for _ in range(650):  # 65 epochs of 10 batches
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched["scheduler"].step()
    assert lrs[0] == pytest.approx(1e-3) and betas[0] == pytest.approx(0.95)
    assert lrs[150] == pytest.approx(1e-3 + 0.5 * 9e-3)  # halfway up, linear
    assert lrs[300] == pytest.approx(1e-2) and betas[300] == pytest.approx(0.85)  # peak, lowest momentum
    assert lrs[450] == pytest.approx(1e-3 + 0.5 * 9e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[600:])  # the last 5 epochs at the base lr
    assert all(b == pytest.approx(0.95) for b in betas[600:])


def test_multistep_and_step_schedules() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], {"name": "adamw", "lr": 5e-4, "weight_decay": 1.5e-2})
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 1.5e-2
    sched = build_scheduler(opt, {"name": "multistep", "milestones": [30], "gamma": 0.1}, steps_per_epoch=5)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    assert sched["interval"] == "epoch" and lrs[29] == pytest.approx(5e-4) and lrs[30] == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid choices"):
        build_scheduler(opt, {"name": "cosine"}, 1)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer([p], {"name": "lamb", "lr": 1.0})
    assert isinstance(OneCycle(opt, 1.0, 1, 1), OneCycle)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_optimizer_makes_the_same_update(name: str) -> None:
    torch.manual_seed(0)
    start = torch.randn(50, 20)
    params = {fused: torch.nn.Parameter(start.clone()) for fused in (True, False)}
    opts = {fused: build_optimizer([p], {"name": name, "lr": 1e-2, "weight_decay": 1e-2, "fused": fused})
            for fused, p in params.items()}
    assert opts[True].param_groups[0]["fused"] and not opts[False].param_groups[0]["fused"]
    for step in range(5):
        grad = torch.randn(50, 20, generator=torch.Generator().manual_seed(step))
        for fused, p in params.items():
            p.grad = grad.clone()
            opts[fused].step()
    assert not torch.equal(params[True], start)
    torch.testing.assert_close(params[True], params[False], rtol=1e-6, atol=1e-7)


def test_cpu_trainer_drops_lightnings_nvml_check(monkeypatch) -> None:
    from omegaconf import OmegaConf

    from pcdeq.training.pipeline import make_trainer

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    make_trainer(OmegaConf.create({"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1,
                                   "logger": False, "enable_checkpointing": False}), [], [])
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ


def test_results_json_is_written_atomically_and_validated(tmp_path) -> None:
    path = tmp_path / "run" / "results.json"
    write_results(path, {"status": "completed", "test/acc": 0.9, "fwd_iters": torch.tensor(4.5), "nan": math.nan})
    data = read_results(path)
    assert data["schema_version"] == SCHEMA_VERSION == 2 and data["fwd_iters"] == 4.5 and data["nan"] is None
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="status must be one of"):
        write_results(path, {"status": "done"})
    assert read_results(path)["status"] == "completed"  # the failed write did not touch the file

    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["status"] == "completed"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
