"""The bytes autograd keeps for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

Tensor = torch.Tensor


class _Saved:
    """A tensor autograd saved for backward, counted by a :class:`SavedTensorMeter` while it lives."""

    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, tensor: Tensor) -> None:
        self.meter, self.tensor = meter, tensor
        storage = tensor.untyped_storage()
        self.key = (tensor.device, storage.data_ptr())
        meter.add(self.key, storage.nbytes())

    def __del__(self) -> None:
        self.meter.drop(self.key)


class SavedTensorMeter:
    """Peak bytes of the tensors autograd keeps for backward: live ones only, each storage once."""

    def __init__(self) -> None:
        self.refs: dict[tuple, list[int]] = {}  # storage -> [references, bytes]
        self.current = self.peak = 0

    def add(self, key: tuple, nbytes: int) -> None:
        entry = self.refs.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1

    def drop(self, key: tuple) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.refs[key]

    @contextmanager
    def watch(self) -> Iterator[SavedTensorMeter]:
        """Count what autograd saves inside the block."""
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(self, t), lambda s: s.tensor):
            yield self
