"""Timing: the variants of one architecture, their training and evaluation steps, timed interleaved.

* training step: forward + cross-entropy + backward + optimizer step + constraint projection. Model and optimizer
  state are restored before every timed training step, so each repetition does the same work.
* evaluation step: forward + cross-entropy under ``torch.inference_mode`` (the reference: with gradients enabled,
  as its scripts evaluate; its forward registers a tensor hook, which raises under ``no_grad``), weights fixed.
* figures are medians; the variants of one architecture run interleaved, in an order that rotates every repetition.
* iterations: forward and backward solver iterations of the last timed training step (per equilibrium block),
  forward iterations of the last evaluation step.
* host syncs: one extra untimed training and evaluation step under :class:`pcdeq.bench.syncs.SyncCounter`.
* memory of the first training step: the peak bytes autograd holds for backward (:mod:`pcdeq.bench.saved`); on
  CUDA also ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq.bench.saved import SavedTensorMeter
from pcdeq.bench.setup import Setup
from pcdeq.bench.syncs import SyncCounter
from pcdeq.training.optim import build_optimizer

Tensor = torch.Tensor


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call in seconds, synchronised around on CUDA."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median_ms(times: Sequence[float]) -> float:
    """Median of times in seconds, in milliseconds."""
    return statistics.median(times) * 1e3


def eq_modules(model: nn.Module) -> list[Any]:
    """Our equilibrium modules (the ones keeping ``last_stats``), in module order."""
    return [m for m in model.modules() if isinstance(getattr(m, "last_stats", None), dict)]


def our_counts(model: nn.Module, direction: str) -> list[int]:
    """Iterations of the last solve in ``direction`` ("forward"/"backward") of each equilibrium module."""
    out = []
    for m in eq_modules(model):
        stats = m.last_stats.get(direction)
        if stats is not None:
            out.append(int(stats.iters))
    return out


@dataclass
class Variant:
    """One implementation of an architecture, with its optimizer and step functions.

    Attributes:
        name: "best", "plain" or "reference".
        counts: ``counts(direction)`` -> iterations per block of the last solve.
        project: restores the parameter constraints after the optimizer step.
        grad_eval: evaluate with gradients enabled (the reference, as-is) instead of under inference_mode.
    """

    name: str
    model: Any  # our network (an nn.Module and an EquilibriumNet) or the reference's: duck-typed on purpose
    optimizer: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    counts: Callable[[str], list[int]]
    project: Callable[[], None]
    grad_eval: bool = False
    state: tuple[dict, dict] | None = None
    train_times: list[float] = field(default_factory=list)
    eval_times: list[float] = field(default_factory=list)
    train_iters: dict[str, list[int]] = field(default_factory=dict)
    eval_iters: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def train_step(self) -> None:
        """Forward, loss, backward, optimizer step, projection."""
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.project()

    def eval_step(self) -> None:
        """Forward and loss without a backward (inference_mode, or gradients enabled for the reference)."""
        if self.grad_eval:
            F.cross_entropy(self.model(self.x), self.y)
            return
        with torch.inference_mode():
            F.cross_entropy(self.model(self.x), self.y)

    def snapshot(self) -> None:
        """Keep the model and optimizer state, restored before every timed training step."""
        self.state = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def restore(self) -> None:
        """Return to the snapshot."""
        assert self.state is not None
        self.model.load_state_dict(self.state[0])
        self.optimizer.load_state_dict(copy.deepcopy(self.state[1]))

    def record_train(self) -> None:
        """Iterations of the training step just run."""
        self.train_iters = {"forward": self.counts("forward"), "backward": self.counts("backward")}
        if hasattr(self.model, "solver_stats"):
            self.stats["solver_stats_train"] = self.model.solver_stats()

    def record_eval(self) -> None:
        """Iterations of the evaluation step just run."""
        self.eval_iters = self.counts("forward")
        if hasattr(self.model, "solver_stats"):
            self.stats["solver_stats_eval"] = self.model.solver_stats()

    def count_syncs(self) -> None:
        """Host syncs of one training and one evaluation step (:mod:`pcdeq.bench.syncs`), untimed: counting slows
        every operation. Evaluation runs under no_grad here (the dispatch mode does not see inference tensors).
        The state is restored before and after, so the timed steps start where they would have."""
        self.restore()
        with SyncCounter() as train:
            self.train_step()
        self.restore()
        self.model.eval()
        with torch.set_grad_enabled(self.grad_eval), SyncCounter() as evaluation:
            F.cross_entropy(self.model(self.x), self.y)
        self.model.train()
        self.restore()
        self.stats["syncs_train"], self.stats["syncs_eval"] = train.total, evaluation.total
        self.stats["syncs_train_ops"], self.stats["syncs_eval_ops"] = dict(train.counts), dict(evaluation.counts)


def our_variant(name: str, model: Any, setup: Setup) -> Variant:
    """A variant of our network with the protocol's optimizer (torch's per-tensor loop for the plain path)."""
    optim = dict(setup.config["optim"], fused=bool(setup.config["optim"].get("fused", True)) and name != "plain")
    optimizer = build_optimizer(model.parameters(), optim)
    return Variant(name, model, optimizer, setup.x, setup.y, lambda d: our_counts(model, d), model.project_)


def instrumented_step(variant: Variant, device: torch.device) -> None:
    """The first training step, with the saved-for-backward meter and CUDA's peak memory counter."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = SavedTensorMeter()
    with meter.watch():
        variant.train_step()
    variant.stats["saved_for_backward_mb"] = meter.peak / 2**20
    variant.stats["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def rotated(items: list, r: int) -> list:
    """``items`` starting at position r (mod len): the interleaving order of repetition r."""
    k = r % len(items)
    return items[k:] + items[:k]


def time_training(variants: list[Variant], floor_ops: list[Callable[[], Any]], repeats: int, warmup: int,
                  device: torch.device) -> list[list[float]]:
    """Warm up, then time training steps interleaved (state restored before each); returns the floor-op times."""
    for v in variants:
        v.model.train()
        instrumented_step(v, device)
        v.snapshot()
        for _ in range(warmup - 1):
            v.restore()
            v.train_step()
        v.count_syncs()
    for op in floor_ops:
        op()
    floor_times: list[list[float]] = [[] for _ in floor_ops]
    for r in range(repeats):
        for v in rotated(variants, r):
            v.restore()
            v.train_times.append(timed(v.train_step, device))
            v.record_train()
        for i, op in enumerate(floor_ops):
            floor_times[i].append(timed(op, device))
    return floor_times


def time_evaluation(variants: list[Variant], repeats: int, warmup: int, device: torch.device) -> None:
    """Time evaluation steps interleaved, every variant from the same post-warm-up weights."""
    for v in variants:
        v.restore()
        v.model.eval()
        for _ in range(warmup):
            v.eval_step()
    for r in range(repeats):
        for v in rotated(variants, r):
            v.eval_times.append(timed(v.eval_step, device))
            v.record_eval()
    for v in variants:
        v.model.train()

