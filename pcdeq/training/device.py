"""What a run on a GPU needs besides ``trainer.accelerator=gpu``: loader settings, TF32, and a device that exists.

* ``dataset.num_workers`` / ``dataset.pin_memory`` default to null: 0 workers and no pinning on a CPU (in-memory
  data, where workers only compete with the solver for cores), :data:`GPU_WORKERS` workers and pinned memory on a
  GPU, so that Lightning's host-to-device copies (``non_blocking=True`` on CUDA) overlap with the step.
* ``tf32`` (top level): TensorFloat-32 for float32 matrix products and convolutions. Off by default: its 10-bit
  mantissa (relative rounding about 5e-4) sits next to the solvers' residual tolerances (1e-4 to 1e-2), so the
  stopping rule would measure rounding; on is a speed switch to measure (``make gpu-check`` does).
* :func:`check_devices`: a run that asks for a GPU on a machine without one, or for more GPUs than there are,
  stops with one line naming the fix instead of Lightning's traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pcdeq.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")
GPU_WORKERS = 4


def wants_gpu(config: Mapping) -> bool:
    """Whether the run's trainer asks for a GPU (``auto`` takes whatever is there, so it never fails)."""
    return str((config.get("trainer") or {}).get("accelerator", "cpu")) in GPU_ACCELERATORS


def loader_settings(config: Mapping) -> tuple[int, bool]:
    """(num_workers, pin_memory) of the run: the dataset's values, or the defaults of its device where null."""
    d = config["dataset"]
    gpu = wants_gpu(config)
    workers = d.get("num_workers")
    pin = d.get("pin_memory")
    return (GPU_WORKERS if gpu else 0) if workers is None else int(workers), gpu if pin is None else bool(pin)


def _requested(devices: Any) -> int | None:
    """How many GPUs ``trainer.devices`` asks for (None: all or auto); for a list, the highest index + 1."""
    if isinstance(devices, (list, tuple)):
        return max(int(d) for d in devices) + 1 if devices else None
    if isinstance(devices, str):
        if devices.strip() in ("auto", "-1"):
            return None
        if "," in devices:
            return max(int(d) for d in devices.split(",") if d.strip()) + 1
        return int(devices)
    return None if devices == -1 else int(devices)


def check_devices(config: Mapping, available: int | None = None) -> None:
    """A GPU run has the GPUs it asks for.

    Args:
        config: the resolved run config.
        available: visible CUDA devices (None: ask torch).

    Raises:
        ConfigError: no CUDA device at all, or fewer than ``trainer.devices`` asks for.
    """
    if not wants_gpu(config):
        return
    count = torch.cuda.device_count() if available is None else available
    if count == 0:
        raise ConfigError(f"trainer.accelerator={config['trainer']['accelerator']}: no CUDA GPU is visible on this "
                          "machine (torch.cuda.is_available() is False); run with trainer=cpu, or on a GPU node")
    wanted = _requested(config["trainer"].get("devices", 1))
    if wanted is not None and wanted > count:
        raise ConfigError(f"trainer.devices={config['trainer'].get('devices')}: this machine has {count} CUDA "
                          f"GPU{'s' if count != 1 else ''}; set trainer.devices={count} (or -1 for all of them)")


def apply_tf32(enabled: bool) -> None:
    """TensorFloat-32 on or off for float32 matrix products (cuBLAS) and convolutions (cuDNN); no effect on a CPU."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
