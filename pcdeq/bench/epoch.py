"""``--epoch``: Lightning's per-epoch overhead.

Two epochs through the real training stack (Hydra config, Lightning Trainer, the project's module and callbacks)
on synthetic data, the same two epochs as a bare loop, and through a bare Trainer with a minimal LightningModule
(same weights, batches, optimizer and per-batch hook); the second epochs' wall times, interleaved.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from pcdeq.bench.setup import Arch, compose_config, config_overrides
from pcdeq.bench.timing import synchronize
from pcdeq.training.optim import build_optimizer
from pcdeq.training.pipeline import build_run


class EpochClock(Callback):
    """Lightning callback: start times of the epochs, the end of training, and time spent inside batches."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch_starts: list[float] = []
        self.batch_time: list[float] = []
        self.end = 0.0
        self._batch_start = 0.0

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self.epoch_starts.append(time.perf_counter())
        self.batch_time.append(0.0)

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batch_time[-1] += time.perf_counter() - self._batch_start

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.end = time.perf_counter()


@contextmanager
def quiet_logging() -> Iterator[None]:
    """Lightning's and the project's info lines off (warnings stay)."""
    loggers = [logging.getLogger(n) for n in ("pcdeq", "lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _epoch_config(arch: Arch, args: argparse.Namespace, n: int, tmp: str) -> DictConfig:
    """The architecture's training config for two epochs of ``n`` synthetic batches, no logger, no test."""
    probe = compose_config(arch, config_overrides(arch, args), tmp)
    batch = int(probe.dataset.batch_size)
    overrides = [*config_overrides(arch, args), f"dataset.synthetic_size=[{n * batch},{batch}]",
                 "trainer.max_epochs=2", f"trainer.limit_train_batches={n}", "test_every_epoch=false",
                 "logger=none", f"num_threads={args.threads}", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false"]
    if args.device == "cuda":
        overrides.append("trainer=gpu")
    return compose_config(arch, overrides, tmp)


def lightning_epochs(cfg: DictConfig) -> tuple[EpochClock, dict[str, float]]:
    """Two epochs through the training stack (``build_run``: Trainer, module, callbacks, checkpoints)."""

    run = build_run(cfg)
    clock = EpochClock()
    run.trainer.callbacks.append(clock)  # type: ignore[attr-defined]  # a list property Lightning does not annotate
    run.trainer.fit(run.module, train_dataloaders=run.datamodule.train_dataloader())
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.endswith("_iters")}
    return clock, metrics


def bare_epochs(cfg: DictConfig, device: torch.device) -> list[float]:
    """The same two epochs as a plain loop: the same network, seed, data order, optimizer and the family's per-batch
    hook (monDEQ's alpha tuning), nothing else.

    Returns:
        The wall time of each epoch (s).
    """
    run = build_run(cfg)  # the same seeding, so the same initial weights and batches as the Lightning run
    net: Any = run.module.net.to(device)  # type: ignore[attr-defined]  # an EquilibriumNet is an nn.Module
    optimizer = build_optimizer(net.parameters(), run.module.config["optim"])
    loader = run.datamodule.train_dataloader()
    net.train()
    times = []
    for _ in range(2):
        synchronize(device)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            x = x.to(device)
            net.on_train_batch_start(x, i, len(loader))  # e.g. monDEQ's alpha tuning, as in the other two
            loss = F.cross_entropy(net(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            net.project_()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


class MinimalModule(L.LightningModule):
    """The least a LightningModule does per batch: the family's batch hook, forward, loss, backward, optimizer step,
    projection.

    Its epoch against the bare loop is Lightning's own per-batch cost; the training module's epoch against its
    epoch is what the training module adds (figures, certificate, checkpoints, scheduler).
    """

    def __init__(self, net: Any, optim_cfg: Any) -> None:  # net: an EquilibriumNet (an nn.Module)
        super().__init__()
        self.net: Any = net
        self.optim_cfg = optim_cfg

    def on_train_batch_start(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # the family's per-batch hook is part of its training algorithm (monDEQ retunes alpha), not overhead
        self.net.on_train_batch_start(batch[0], batch_idx, int(self.trainer.num_training_batches))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.net.project_()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.net.parameters(), self.optim_cfg)


def minimal_lightning_epochs(cfg: DictConfig, device: torch.device) -> EpochClock:
    """The same two epochs through a bare Trainer (no callbacks, logger or checkpoints) and :class:`MinimalModule`."""

    run = build_run(cfg)  # the same seeding, weights and batches as the other two
    clock = EpochClock()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=2,
                        limit_train_batches=cfg.trainer.limit_train_batches, logger=False, callbacks=[clock],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MinimalModule(run.module.net, run.module.config["optim"]),
                train_dataloaders=run.datamodule.train_dataloader())
    return clock


def bench_epoch(arch: Arch, args: argparse.Namespace, bare_step_ms: float, device: torch.device) -> dict[str, Any]:
    """Lightning's per-epoch overhead: the second of two epochs through the training stack against the second of
    the same two epochs as a bare loop and through a minimal LightningModule (same weights, batches, optimizer and
    batch hook, so the iteration counts grow alike), interleaved, medians over the repetitions."""
    n = 2 if args.quick else arch.epoch_batches
    reps = 1 if args.quick else args.epoch_repeats
    lightning_s, in_batch_s, bare_s, minimal_s = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, quiet_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = _epoch_config(arch, args, n, tmp)
        for _ in range(reps):
            clock, metrics = lightning_epochs(cfg)
            lightning_s.append(clock.end - clock.epoch_starts[-1])
            in_batch_s.append(clock.batch_time[-1])
            bare_s.append(bare_epochs(cfg, device)[-1])
            minimal = minimal_lightning_epochs(cfg, device)
            minimal_s.append(minimal.end - minimal.epoch_starts[-1])
    epoch_s, bare, floor = statistics.median(lightning_s), statistics.median(bare_s), statistics.median(minimal_s)
    return {"batches": n, "repeats": reps, "epoch_s": epoch_s, "bare_epoch_s": bare,
            "in_batch_s": statistics.median(in_batch_s), "overhead_pct": (epoch_s / bare - 1) * 100,
            "minimal_epoch_s": floor, "lightning_floor_pct": (floor / bare - 1) * 100,
            "module_pct": (epoch_s / floor - 1) * 100,
            "steps_s": n * bare_step_ms / 1e3, "bare_step_ms": bare_step_ms,
            "train_fwd_iters": metrics.get("train/fwd_iters"), "train_bwd_iters": metrics.get("train/bwd_iters"),
            "measures": "the second of two epochs through Lightning (callback: epoch start to the end of training, "
                        "checkpoint included) against the second of the same two epochs as a bare loop; "
                        "minimal_epoch_s: the same epoch through a bare Trainer and a minimal LightningModule "
                        "(lightning_floor_pct: Lightning's own cost over the bare loop; module_pct: what the "
                        "training stack adds over that); "
                        "steps_s: batches x the fixed-batch step's median (iterations do not grow there)"}


