"""The Lightning module shared by every model family.

It owns the loss, the optimiser/schedule from config, the family's constraint projection after every optimizer
step, and the per-epoch metrics: loss and accuracy, forward/backward iterations (mean and max), residuals,
non-converged counts, the convergence certificate, the learning rate, epoch time and samples per second. It
talks to the network only through :class:`pcdeq.family.EquilibriumNet`. Only the plain resolved config is saved
in checkpoints (``weights_only`` loading works, resume works).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from pcdeq.family import CERTIFICATE_KEYS
from pcdeq.training.checkpoint import (
    CHECKPOINT_VERSION,
    VERSION_KEY,
    check_state_dict,
    checkpoint_config,
    net_state,
    read_checkpoint,
)
from pcdeq.training.config import net_from_config
from pcdeq.training.metrics import EpochAggregate
from pcdeq.training.optim import build_optimizer, build_scheduler

Tensor = torch.Tensor
log = logging.getLogger("pcdeq")
PROGRESS_EVERY_S = 60.0  # progress lines in batch jobs (no progress bar)

# Solver statistics (keys of EquilibriumNet.solver_stats()) -> (logged name suffix, reduction over the epoch).
SOLVER_FIGURES = {
    "iters": ("iters", "mean"), "iters_max": ("iters_max", "max"),
    "residual_mean": ("residual", "mean"), "residual_max": ("residual_max", "max"),
    "n_not_converged": ("not_converged", "sum"), "nonfinite": ("nonfinite", "sum"),
}


def _figure_names(prefix: str, training: bool) -> dict[str, list[str]]:
    """The figures of one prefix, grouped by reduction."""
    names: dict[str, list[str]] = {"mean": [f"{prefix}/loss", f"{prefix}/acc"], "max": [], "sum": []}
    for tag in ("fwd", "bwd") if training else ("fwd",):
        for suffix, reduce in SOLVER_FIGURES.values():
            names[reduce].append(f"{prefix}/{tag}_{suffix}")
    if training:
        for key, reduce in CERTIFICATE_KEYS.items():
            names[reduce].append(f"{prefix}/{key}")
    return names


class EquilibriumModule(L.LightningModule):
    """Classification with an equilibrium network built from ``config``.

    Args:
        config: the resolved run config (dict with model, dataset, solver, optim, ...).
        eval_prefixes: metric prefix of each validation dataloader (e.g. ["val", "test"]).
        certificate_every_n_steps: compute the convergence certificate every n training steps (0: never).
    """

    def __init__(self, config: Mapping, eval_prefixes: tuple[str, ...] = ("val",),
                 certificate_every_n_steps: int = 20) -> None:
        super().__init__()
        self.save_hyperparameters({"config": dict(config), "eval_prefixes": list(eval_prefixes),
                                   "certificate_every_n_steps": int(certificate_every_n_steps)})
        self.net = net_from_config(config)
        self.config = config
        self.eval_prefixes = tuple(eval_prefixes)
        self.certificate_every = int(certificate_every_n_steps)
        self.diverged = False
        self._epoch_start = self._last_progress = 0.0
        self._epoch_samples = 0
        self._batch: tuple[Tensor, Tensor, int] | None = None
        self.epoch_times: list[float] = []
        prefixes = dict.fromkeys(("train", *self.eval_prefixes, "test"))
        # keyed "<prefix>_figures": a ModuleDict key may not shadow a Module attribute such as train()
        self.figures = nn.ModuleDict({
            f"{p}_figures": nn.ModuleDict({r: EpochAggregate(n, r) for r, n in _figure_names(p, p == "train").items()})
            for p in prefixes
        })

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str]) -> EquilibriumModule:
        """The module of a checkpoint, rebuilt from its saved config (safe load and every check of
        :mod:`pcdeq.training.checkpoint`: a damaged, newer or mismatched file is one ``CheckpointError``)."""
        ckpt = read_checkpoint(path)
        config = checkpoint_config(ckpt, path)
        hparams = ckpt["hyper_parameters"]
        module = cls(config, tuple(hparams.get("eval_prefixes", ("val",))),
                     int(hparams.get("certificate_every_n_steps", 20)))
        assert isinstance(module.net, nn.Module)
        check_state_dict(net_state(ckpt["state_dict"]), module.net.state_dict(), path)
        module.load_state_dict(ckpt["state_dict"])
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # ---- per-batch figures, logged once per epoch ----
    def _aggregate(self, prefix: str, reduce: str) -> EpochAggregate:
        return self.figures[f"{prefix}_figures"][reduce]  # type: ignore[index]

    def _record(self, prefix: str, loss: Tensor, acc: Tensor, n: int, directions: tuple[str, ...]) -> None:
        self._aggregate(prefix, "mean").add({f"{prefix}/loss": loss, f"{prefix}/acc": acc}, weight=n)
        stats = self.net.solver_stats()
        by_reduce: dict[str, dict[str, float]] = {"mean": {}, "max": {}, "sum": {}}
        for direction in directions:
            s = stats.get(direction)
            if s is None:
                continue
            tag = "fwd" if direction == "forward" else "bwd"
            for key, (suffix, reduce) in SOLVER_FIGURES.items():
                by_reduce[reduce][f"{prefix}/{tag}_{suffix}"] = s[key]
        for reduce, values in by_reduce.items():
            self._aggregate(prefix, reduce).add(values)

    def _flush(self, prefix: str) -> None:
        """Log the epoch's figures of ``prefix`` (reduced over batches and processes) and reset them."""
        for reduce in ("mean", "max", "sum"):
            agg = self._aggregate(prefix, reduce)
            agg.commit()
            if agg.update_count == 0:  # nothing of this kind in the epoch
                continue
            for name, value in agg.compute().items():
                self.log(name, value, on_step=False, on_epoch=True, sync_dist=False, add_dataloader_idx=False,
                         prog_bar=name in ("val/acc", "test/acc"))
            agg.reset()

    def _step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, int]:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        return loss, acc, y.shape[0]

    # ---- training ----
    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.net.on_train_batch_start(batch[0], batch_idx, int(self.trainer.num_training_batches))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, acc, n = self._step(batch)
        if not math.isfinite(loss.item()):  # one host sync, as bool(torch.isfinite(loss)), one operation fewer
            # A diverged run stops cleanly with status "diverged" instead of training on NaNs.
            self.diverged = True
            self.trainer.should_stop = True
        self._epoch_samples += n
        self._batch = (loss.detach(), acc.detach(), n)
        if self.trainer.progress_bar_callback is not None:
            self.log("loss", loss.detach(), prog_bar=True, logger=False)
        if self.certificate_every and batch_idx % self.certificate_every == 0:
            # Here, before the optimizer step, the weights are the ones that produced the fixed points.
            cert = self.net.certificate()
            for reduce in {CERTIFICATE_KEYS[k] for k in cert}:  # each figure by its epoch reduction
                self._aggregate("train", reduce).add(
                    {f"train/{k}": v for k, v in cert.items() if CERTIFICATE_KEYS[k] == reduce})
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Project right after every optimizer step, before any callback or checkpoint sees the weights.
        self.net.project_()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._batch is not None:  # forward and (implicit) backward statistics of this batch
            self._record("train", *self._batch, directions=("forward", "backward"))
            self._batch = None
        now = time.perf_counter()
        if self.trainer.progress_bar_callback is None and now - self._last_progress >= PROGRESS_EVERY_S:
            # Batch jobs have no progress bar: a line every PROGRESS_EVERY_S seconds during long epochs.
            self._last_progress = now
            if self.trainer.is_global_zero:
                mean = self._aggregate("train", "mean")
                log.info(f"epoch {self.current_epoch + 1} batch {batch_idx + 1}/{self.trainer.num_training_batches}"
                         f" | train/loss {mean.peek('train/loss'):.4f}"
                         f" | train/fwd_iters {mean.peek('train/fwd_iters'):.1f} | {now - self._epoch_start:.0f} s")

    def on_train_epoch_start(self) -> None:
        self._print_epoch_summary()
        self._epoch_start = self._last_progress = time.perf_counter()
        self._epoch_samples = 0

    def on_train_epoch_end(self) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        self.epoch_times.append(elapsed)
        per_epoch = {"train/epoch_s": elapsed, "train/samples_per_s": self._epoch_samples / max(elapsed, 1e-9),
                     "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
        per_epoch.update({f"train/{k}": v for k, v in self.net.epoch_metrics().items()})
        for name, value in per_epoch.items():
            self.log(name, float(value), on_step=False, on_epoch=True)
        self._flush("train")

    def on_fit_end(self) -> None:
        self._print_epoch_summary()

    def _print_epoch_summary(self) -> None:
        """One line per finished epoch on rank 0: progress for batch jobs, where there is no progress bar.

        Called when the next epoch starts (and at the end of fit), because Lightning aggregates an epoch's
        metrics only after every epoch-end hook has run.
        """
        if not self.epoch_times or not self.trainer.is_global_zero:  # nothing finished in this process yet
            return
        m = self.trainer.callback_metrics
        parts = [f"epoch {self.current_epoch}/{self.trainer.max_epochs}"]  # epochs finished (also after resume)
        for key, fmt in (("train/loss", "{:.4f}"), ("train/acc", "{:.2%}"), ("val/acc", "{:.2%}"),
                         ("test/acc", "{:.2%}"), ("train/fwd_iters", "{:.1f}"), ("train/bwd_iters", "{:.1f}")):
            if key in m:
                parts.append(f"{key} " + fmt.format(float(m[key])))
        parts.append(f"{self.epoch_times[-1]:.1f} s")
        log.info(" | ".join(parts))
        # the warnings that matter: one line each per epoch, with the setting to change
        failed = {tag: int(float(m[f"train/{tag}_not_converged"])) for tag in ("fwd", "bwd")
                  if float(m.get(f"train/{tag}_not_converged", 0.0)) > 0}
        if failed:
            counts = " and ".join(f"{n} {'forward' if tag == 'fwd' else 'backward'}" for tag, n in failed.items())
            log.warning(f"epoch {self.current_epoch}: {counts} samples stopped at the iteration cap before the "
                        "tolerance; raise solver." + "/".join(f"{t}_max_iter" for t in failed) + " or relax "
                        "solver." + "/".join(f"{t}_tol" for t in failed))
        uncertified = float(m.get("train/cw_uncertified", 0.0))
        if uncertified > 0:
            log.warning(f"epoch {self.current_epoch}: the convergence certificate did not certify {uncertified:.0f} "
                        "checked batches (Collatz-Wielandt bound >= 1): see train/cw_bound_max")

    # ---- evaluation ----
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record(self.eval_prefixes[dataloader_idx], *self._step(batch), directions=("forward",))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record("test", *self._step(batch), directions=("forward",))

    def on_validation_epoch_end(self) -> None:
        for prefix in self.eval_prefixes:
            self._flush(prefix)

    def on_test_epoch_end(self) -> None:
        self._flush("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the format version: a pcdeq older than the checkpoint refuses it with one message (pcdeq.training.checkpoint)
        checkpoint[VERSION_KEY] = CHECKPOINT_VERSION

    # ---- optimisation ----
    def configure_optimizers(self):
        optimizer = build_optimizer(self.net.parameters(), self.config["optim"])
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        scheduler = build_scheduler(optimizer, self.config["optim"].get("scheduler", {}), int(steps_per_epoch))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
