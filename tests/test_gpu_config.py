"""The GPU configuration on a machine without a GPU: what ``trainer=gpu`` sets, and the one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pcdeq.errors import ConfigError
from pcdeq.training.config import datamodule_from_config
from pcdeq.training.device import GPU_WORKERS, apply_tf32, check_devices, loader_settings
from pcdeq.training.validate import validate_overrides, validate_train

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")


def resolved(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["dataset.synthetic=true", f"paths.output_dir={tmp_path / 'run'}",
                                          *overrides])
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return config


def test_gpu_runs_get_workers_and_pinned_memory(tmp_path: Path) -> None:
    gpu, cpu = resolved(tmp_path, "trainer=gpu"), resolved(tmp_path, "trainer=cpu")
    assert gpu["trainer"]["accelerator"] == "gpu" and gpu["trainer"]["precision"] == "32-true"
    assert loader_settings(gpu) == (GPU_WORKERS, True)
    assert loader_settings(cpu) == (0, False)
    # an explicit value wins over the device's default, on either device
    assert loader_settings(resolved(tmp_path, "trainer=gpu", "dataset.num_workers=1", "dataset.pin_memory=false")) \
        == (1, False)
    dm = datamodule_from_config(resolved(tmp_path, "trainer=gpu", "dataset.num_workers=0"), seed=0)
    assert dm.pin_memory is True and dm.num_workers == 0


def test_ddp_asks_for_every_process_its_gpu(tmp_path: Path) -> None:
    config = resolved(tmp_path, "trainer=ddp", "trainer.accelerator=gpu")
    assert config["trainer"]["strategy"] == "ddp" and loader_settings(config) == (GPU_WORKERS, True)
    with pytest.raises(ConfigError, match=r"trainer.devices=2: this machine has 1 CUDA GPU; set trainer.devices=1"):
        check_devices(config, available=1)
    check_devices(config, available=2)


@pytest.mark.parametrize("devices,available,message", [
    (1, 0, "no CUDA GPU is visible on this machine .*; run with trainer=cpu, or on a GPU node"),
    (3, 1, r"trainer.devices=3: this machine has 1 CUDA GPU; set trainer.devices=1 \(or -1 for all of them\)"),
    ([0, 2], 2, r"trainer.devices=\[0, 2\]: this machine has 2 CUDA GPUs; set trainer.devices=2"),
    ("0,1", 1, "this machine has 1 CUDA GPU"),
])
def test_asking_for_gpus_that_are_not_there(devices: Any, available: int, message: str) -> None:
    config = {"trainer": {"accelerator": "gpu", "devices": devices}}
    with pytest.raises(ConfigError, match=message):
        check_devices(config, available=available)


@pytest.mark.parametrize("devices,available", [(1, 1), (-1, 2), ("auto", 1), ([1], 2), ("2", 2)])
def test_gpus_that_are_there_pass(devices: Any, available: int) -> None:
    check_devices({"trainer": {"accelerator": "gpu", "devices": devices}}, available=available)
    check_devices({"trainer": {"accelerator": "cpu", "devices": 4}}, available=0)  # a CPU run never asks


def test_precision_is_validated_like_every_other_key() -> None:
    with pytest.raises(ConfigError, match="trainer.precision=fp8: unknown choice; valid: one of 32-true, .*bf16-mixed"):
        validate_overrides(["trainer.precision=fp8"])
    validate_overrides(["trainer.precision=bf16-mixed", "solver.precision=mixed", "tf32=true"])


@NO_CUDA
def test_validate_train_refuses_trainer_gpu_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu: no CUDA GPU"):
        validate_train(resolved(tmp_path, "trainer=gpu"))
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_tf32_switch_sets_both_backends() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        apply_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@NO_CUDA
def test_train_py_with_trainer_gpu_on_a_cpu_machine_prints_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer=gpu", "dataset.synthetic=true",
                           f"hydra.run.dir={run_dir}", "logger=none"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "no CUDA GPU is visible" in errors[0] and "trainer=cpu" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "results.json").exists()
