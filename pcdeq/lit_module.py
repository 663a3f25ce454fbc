"""The Lightning module shared by every model family (pcDEQ and monDEQ).

It owns the loss, the optimiser/schedule from config, the nonnegativity projection after every optimizer step,
and the per-epoch metrics: loss and accuracy, forward/backward iterations (mean and max), residuals,
non-converged counts, the convergence certificate, the learning rate, epoch time and samples per second.
Only the plain resolved config is saved in checkpoints (``weights_only`` loading works, resume works).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F

from pcdeq.certificate import convergence_certificate
from pcdeq.config import build_net
from pcdeq.optim import build_optimizer, build_scheduler
from pcdeq.solvers import collect_stats

Tensor = torch.Tensor
log = logging.getLogger("pcdeq")
PROGRESS_EVERY_S = 60.0  # progress lines in batch jobs (no progress bar)


class EquilibriumModule(L.LightningModule):
    """Classification with an equilibrium network built from ``config``.

    Args:
        config: the resolved run config (dict with model, dataset, solver, optim, ...).
        eval_prefixes: metric prefix of each validation dataloader (e.g. ["val", "test"]).
        certificate_every_n_steps: compute the Collatz-Wielandt certificate every n training steps (0: never).
    """

    def __init__(self, config: Mapping, eval_prefixes: tuple[str, ...] = ("val",),
                 certificate_every_n_steps: int = 20) -> None:
        super().__init__()
        self.save_hyperparameters({"config": dict(config), "eval_prefixes": list(eval_prefixes),
                                   "certificate_every_n_steps": int(certificate_every_n_steps)})
        self.net = build_net(config)
        self.config = config
        self.eval_prefixes = tuple(eval_prefixes)
        self.certificate_every = int(certificate_every_n_steps)
        self.diverged = False
        self._epoch_start = self._last_progress = 0.0
        self._epoch_samples = 0
        self.epoch_times: list[float] = []
        self._acc: dict[str, tuple] = {}  # name -> (total, count, reduce) for the running epoch

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # ---- logging helpers ----
    # Per-batch figures are accumulated here and logged once per epoch: a Lightning self.log call costs about
    # half a millisecond, which is 10-40% of a small model's training step when done ~20 times per batch.
    def _add(self, name: str, value: float | Tensor, reduce: str = "mean", weight: float = 1.0) -> None:
        if isinstance(value, Tensor):
            value = value.detach()
        if not isinstance(value, Tensor) and not math.isfinite(value):
            return
        total, count, fx = self._acc.get(name, (0.0, 0.0, reduce))
        if reduce == "mean":
            total, count = total + value * weight, count + weight
        elif reduce == "sum":
            total, count = total + value, 1.0
        else:  # max
            total, count = (value if count == 0 else max(total, value)), 1.0
        self._acc[name] = (total, count, reduce)

    def _flush(self, prefix: str) -> None:
        """Log and clear the accumulated figures whose names start with ``prefix/``."""
        sync = self.trainer.world_size > 1
        for name in [k for k in self._acc if k.startswith(prefix + "/")]:
            total, count, reduce = self._acc.pop(name)
            value = total / count if reduce == "mean" else total
            self.log(name, float(value), on_step=False, on_epoch=True, reduce_fx=reduce, sync_dist=sync,
                     add_dataloader_idx=False, prog_bar=name in ("val/acc", "test/acc"))

    def _add_solver_stats(self, prefix: str, direction: str) -> None:
        s = collect_stats(self.net).get(direction)
        if s is None:
            return
        tag = "fwd" if direction == "forward" else "bwd"
        self._add(f"{prefix}/{tag}_iters", s["iters"])
        self._add(f"{prefix}/{tag}_iters_max", s["iters_max"], "max")
        self._add(f"{prefix}/{tag}_residual", s["residual_mean"])
        self._add(f"{prefix}/{tag}_residual_max", s["residual_max"], "max")
        self._add(f"{prefix}/{tag}_not_converged", s["n_not_converged"], "sum")
        self._add(f"{prefix}/{tag}_nonfinite", s["nonfinite"], "sum")

    def _step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, int]:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        return loss, acc, y.shape[0]

    # ---- training ----
    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        hook = getattr(self.net, "on_train_batch_start", None)  # e.g. monDEQ's alpha tuning
        if hook is not None:
            hook(batch[0], batch_idx, self.trainer.num_training_batches)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, acc, n = self._step(batch)
        if not torch.isfinite(loss):
            # A diverged run stops cleanly with status "diverged" instead of training on NaNs.
            self.diverged = True
            self.trainer.should_stop = True
        self._epoch_samples += n
        self._add("train/loss", loss, weight=n)
        self._add("train/acc", acc, weight=n)
        if self.trainer.progress_bar_callback is not None:
            self.log("loss", loss.detach(), prog_bar=True, logger=False)
        self._add_solver_stats("train", "forward")
        if self.certificate_every and batch_idx % self.certificate_every == 0:
            # Here, before the optimizer step, the weights are the ones that produced the fixed points.
            for key, value in convergence_certificate(self.net).items():
                self._add(f"train/{key}", value, "max")
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Project right after every optimizer step, before any callback or checkpoint sees the weights.
        project = getattr(self.net, "project_", None)
        if project is not None:
            project()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._add_solver_stats("train", "backward")  # set by the implicit backward of this batch
        now = time.perf_counter()
        if self.trainer.progress_bar_callback is None and now - self._last_progress >= PROGRESS_EVERY_S:
            # Batch jobs have no progress bar: a line every PROGRESS_EVERY_S seconds during long epochs.
            self._last_progress = now
            if self.trainer.is_global_zero:
                loss, count, _ = self._acc.get("train/loss", (0.0, 1.0, "mean"))
                fwd, nf, _ = self._acc.get("train/fwd_iters", (0.0, 1.0, "mean"))
                log.info(f"epoch {self.current_epoch + 1} batch {batch_idx + 1}/{self.trainer.num_training_batches}"
                         f" | train/loss {float(loss) / count:.4f} | train/fwd_iters {fwd / nf:.1f}"
                         f" | {now - self._epoch_start:.0f} s")

    def on_train_epoch_start(self) -> None:
        self._print_epoch_summary()
        self._epoch_start = self._last_progress = time.perf_counter()
        self._epoch_samples = 0

    def on_train_epoch_end(self) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        self.epoch_times.append(elapsed)
        self._add("train/epoch_s", elapsed)
        self._add("train/samples_per_s", self._epoch_samples / max(elapsed, 1e-9))
        self._add("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        alpha = getattr(self.net, "alpha", None)  # monDEQ's (tuned) splitting step
        if isinstance(alpha, (int, float)):
            self._add("train/alpha", float(alpha))
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
        if self.epoch_times:
            parts.append(f"{self.epoch_times[-1]:.1f} s")
        log.info(" | ".join(parts))

    # ---- evaluation ----
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.eval_prefixes[dataloader_idx])

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        loss, acc, n = self._step(batch)
        self._add(f"{prefix}/loss", loss, weight=n)
        self._add(f"{prefix}/acc", acc, weight=n)
        self._add_solver_stats(prefix, "forward")

    def on_validation_epoch_end(self) -> None:
        for prefix in self.eval_prefixes:
            self._flush(prefix)

    def on_test_epoch_end(self) -> None:
        self._flush("test")

    # ---- optimisation ----
    def configure_optimizers(self):
        optimizer = build_optimizer(self.net.parameters(), self.config["optim"])
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        scheduler = build_scheduler(optimizer, self.config["optim"].get("scheduler", {}), int(steps_per_epoch))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
