"""Optional diagnostic callbacks (``callbacks=debug``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from pcdeq.families.pcdeq.layer import NonnegWeight


class SanityCheck(L.Callback):
    """Per-rank checks written to ``<out_dir>/sanity_rank<r>.json`` at the end of training.

    * every trainable parameter received a finite gradient at least once (after DDP's all-reduce);
    * after every optimizer step, every pcDEQ weight (g, v and W) is nonnegative and finite;
    * a checksum of the parameters, so ranks can be compared (DDP keeps them identical).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.with_grad: set[str] = set()
        self.steps = 0
        self.projection_ok = True
        self.min_weight = float("inf")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, p in pl_module.named_parameters():
            if p.requires_grad and p.grad is not None and bool(torch.isfinite(p.grad).all()):
                self.with_grad.add(name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        for mod in pl_module.modules():
            if isinstance(mod, NonnegWeight):
                w = mod.weight().detach()
                lowest = min(float(mod.g.detach().min()), float(mod.v.detach().min()), float(w.min()))
                self.min_weight = min(self.min_weight, lowest)
                if lowest < 0 or not bool(torch.isfinite(w).all()):
                    self.projection_ok = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps": self.steps,
            "params_without_grad": [n for n in names if n not in self.with_grad],
            "projection_ok": self.projection_ok,
            "min_weight": self.min_weight if self.min_weight != float("inf") else None,
            "param_checksum": checksum,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"sanity_rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=2))
