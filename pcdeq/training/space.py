"""Pre-flight: does the run directory's filesystem have room for one checkpoint? Checked before the first epoch.

A short run directory warns (one line) instead of failing: the figure is an estimate, space may be freed while
the first epoch trains, and a checkpoint write that does fail is safe (the previous checkpoint stays intact; see
:mod:`pcdeq.disk`) and reported in one line.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from pcdeq.disk import free_space, human_bytes

log = logging.getLogger("pcdeq")

# Optimizer state tensors kept per parameter: Adam/AdamW exp_avg and exp_avg_sq; SGD at most a momentum buffer.
OPTIMIZER_SLOTS = {"adam": 2, "adamw": 2, "sgd": 1}
MARGIN = 1.1  # zip records are aligned and each tensor has a header; 10% covers them for any model size
EXTRAS_BYTES = 64 * 1024  # the run config (hyper-parameters), loop, scheduler and callback state


def checkpoint_bytes(module: torch.nn.Module, optimizer: str) -> int:
    """An upper estimate of the size of one Lightning checkpoint of ``module`` trained with ``optimizer``.

    A checkpoint holds the state dict (parameters and buffers), the optimizer state (``OPTIMIZER_SLOTS`` tensors
    the size of each parameter; an unknown optimizer counts as Adam's two) and small extras.
    """
    state = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    return int((state + OPTIMIZER_SLOTS.get(optimizer, 2) * params) * MARGIN) + EXTRAS_BYTES


def warn_if_no_room(run_dir: Path, module: torch.nn.Module, optimizer: str) -> bool:
    """Log one warning when ``run_dir``'s filesystem has less free space than one checkpoint; True if it warned."""
    needed = checkpoint_bytes(module, optimizer)
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return False  # no figure to compare; a write that fails is still reported
    if free >= needed:
        return False
    log.warning("run directory %s: %s, less than one checkpoint needs (about %s); writing the checkpoint after the "
                "first epoch will likely fail; fix: free space, or point hydra.run.dir / paths.log_dir elsewhere",
                run_dir, free_space(run_dir), human_bytes(needed))
    return True
