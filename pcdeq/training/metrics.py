"""Per-epoch aggregates of per-batch figures, as torchmetrics metrics (correct DDP reduction, one log per epoch).

A training batch produces about twenty figures (loss, accuracy, forward and backward iterations, residuals,
non-converged counts, the certificate). Feeding them through torchmetrics every batch costs: one
``MeanMetric.update`` is about 100 us on this CPU, and even one vector update per reduction, with its indexing
and small tensors, cost 0.55 ms per linear-MNIST batch (a training step there is about 3 ms). So
:class:`EpochAggregate` has two paths:

* ``add()`` (every batch): Python floats are summed on the host; tensors (loss, accuracy) are only kept, on their
  device, and folded in a few vectorised operations when the epoch's figures are needed (or every
  :data:`FOLD_EVERY` values), so a batch costs no tensor operation and no host synchronisation on a GPU.
* ``update()`` (the torchmetrics update, vector state per reduction): ``commit()`` folds what ``add()`` gathered
  into it once per epoch, and ``compute()`` then reduces over processes (``dist_reduce_fx``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric

Tensor = torch.Tensor
REDUCTIONS = ("mean", "max", "sum")
FOLD_EVERY = 1024  # kept tensor values folded at once: bounds the memory an epoch of kept values takes


class EpochAggregate(Metric):
    """Named running aggregates over the batches of an epoch.

    Args:
        names: the figures this aggregate may receive.
        reduce: "mean" (weighted mean), "max" or "sum".

    ``add({"train/loss": 0.3, ...}, weight=64)`` (or ``update``, the same through torchmetrics) adds the given
    figures (others untouched; non-finite Python floats are skipped); ``compute()`` returns ``{name: value}`` for
    the figures given at least once since the last ``reset()``, reduced over batches and processes, after
    ``commit()``.
    """

    full_state_update = False
    value: Tensor  # the running sum (mean, sum) or maximum, one entry per name
    count: Tensor  # the summed weight per name (0: no value yet)

    def __init__(self, names: Sequence[str], reduce: str) -> None:
        super().__init__()
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduce!r}; valid choices: {', '.join(REDUCTIONS)}")
        self.names = tuple(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.reduce = reduce
        n = len(self.names)
        start = -math.inf if reduce == "max" else 0.0
        self.add_state("value", torch.full((n,), start, dtype=torch.float64),
                       dist_reduce_fx="max" if reduce == "max" else "sum")
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self._pending: dict[str, float | Tensor] = {}  # add(): sum (mean: weighted) or max per name
        self._pending_count: dict[str, float] = {}
        self._kept: dict[str, tuple[list[Tensor], list[float]]] = {}  # add()'s tensors and weights, not yet folded
        self._n_kept = 0

    # ---- the per-batch path ----
    def add(self, values: Mapping[str, float | Tensor], weight: float = 1.0) -> None:
        """Add one batch's figures: floats on the host, tensors kept on their device; see the module docstring."""
        pending, counts, reduce = self._pending, self._pending_count, self.reduce
        for name, v in values.items():
            if name not in self.index:
                raise KeyError(f"{name!r} is not one of this aggregate's figures: {', '.join(self.names)}")
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    raise ValueError(f"{name!r} must be one number per batch, got a tensor of shape {tuple(v.shape)}")
                kept, weights = self._kept.setdefault(name, ([], []))
                kept.append(v.detach())
                weights.append(weight)
                self._n_kept += 1
                counts[name] = counts.get(name, 0.0) + weight
                continue
            if not math.isfinite(v):
                continue
            old = pending.get(name)
            new = v * weight if reduce == "mean" else v
            pending[name] = new if old is None else self._merge(old, new)
            counts[name] = counts.get(name, 0.0) + weight
        if self._n_kept >= FOLD_EVERY:
            self._fold()

    def _merge(self, old: float | Tensor, new: float | Tensor) -> float | Tensor:
        """Two partial aggregates of one name as one (a sum, or for "max" the larger)."""
        if self.reduce == "max":
            if isinstance(old, Tensor) or isinstance(new, Tensor):
                return torch.maximum(torch.as_tensor(old), torch.as_tensor(new))
            return max(old, new)
        return old + new

    def _fold(self) -> None:
        """Fold the kept tensor values into the pending aggregates: a few vectorised operations per name."""
        for name, (kept, weights) in self._kept.items():
            try:  # one stack for same-shaped values (the usual 0-d loss and accuracy; add() admits one element each)
                x = torch.stack(kept).reshape(-1).to(torch.float64)
            except RuntimeError:  # mixed shapes (0-d and one-element)
                x = torch.stack([t.reshape(()).to(torch.float64) for t in kept])
            if self.reduce == "max":
                part = x.max()
            elif self.reduce == "mean":
                part = (x * torch.tensor(weights, dtype=torch.float64, device=x.device)).sum()
            else:
                part = x.sum()
            old = self._pending.get(name)
            self._pending[name] = part if old is None else self._merge(old, part)
        self._kept, self._n_kept = {}, 0

    def commit(self) -> None:
        """Fold what ``add()`` gathered into the metric state (one torchmetrics update)."""
        self._fold()
        if not self._pending:
            return
        pending, counts = self._pending, self._pending_count
        self._pending, self._pending_count = {}, {}
        values = {n: (v / counts[n] if self.reduce == "mean" else v) for n, v in pending.items()}
        self.update(values, weight=counts)

    def reset(self) -> None:
        """Forget the epoch's values (state and pending)."""
        super().reset()
        self._pending, self._pending_count = {}, {}
        self._kept, self._n_kept = {}, 0

    # ---- torchmetrics ----
    def update(self, values: Mapping[str, float | Tensor], weight: float | Mapping[str, float] = 1.0) -> None:
        """Add figures to the metric state; ``weight`` counts in the mean (one number, or one per name)."""
        idx, vals, weights = [], [], []
        for name, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                continue
            idx.append(self.index[name])
            vals.append(v.detach().to(self.value.device, torch.float64).reshape(()) if isinstance(v, Tensor) else
                        torch.tensor(float(v), dtype=torch.float64, device=self.value.device))
            weights.append(float(weight[name] if isinstance(weight, Mapping) else weight))
        if not idx:
            return
        at = torch.tensor(idx, device=self.value.device)
        x = torch.stack(vals).to(self.value.device)
        w = torch.tensor(weights, dtype=torch.float64, device=self.value.device)
        if self.reduce == "max":
            self.value[at] = torch.maximum(self.value[at], x)
        else:
            self.value[at] += x * w if self.reduce == "mean" else x
        self.count[at] += w

    def peek(self, name: str) -> float:
        """This process's running aggregate of ``name``, pending values included, without synchronising (nan
        before any value)."""
        self._fold()
        i = self.index[name]
        count = float(self.count[i]) + self._pending_count.get(name, 0.0)
        if count == 0:
            return math.nan
        value = float(self.value[i])
        pending = self._pending.get(name)
        if pending is not None:
            value = max(value, float(pending)) if self.reduce == "max" else value + float(pending)
        return value / count if self.reduce == "mean" else value

    def compute(self) -> dict[str, float]:
        """``{name: aggregate}`` for every figure that received at least one value (call ``commit()`` first)."""
        value = self.value / self.count.clamp_min(1e-300) if self.reduce == "mean" else self.value
        return {n: float(value[i]) for i, n in enumerate(self.names) if float(self.count[i]) > 0}
