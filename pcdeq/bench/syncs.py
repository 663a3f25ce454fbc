"""Host synchronisations counted at the operator level, so that a CPU run shows what would stall a GPU.

On a GPU the host waits for the device whenever Python needs a value that lives there: ``.item()``, ``float(t)``,
``bool(t)`` (``if t:``), an operator whose output shape depends on the data (``nonzero``, ``masked_select``,
``unique``, indexing with a boolean mask), and any copy from the device to the host. :class:`SyncCounter` sees
every aten call of the block it wraps (a ``TorchDispatchMode``) and counts those. On a CPU the same calls run, so
the count is the one a GPU run would make; only a device-to-host copy cannot be told apart there (every tensor is
on the host already), and is counted on a GPU only. Under ``torch.inference_mode`` the mode does not see the
operations on inference tensors: count evaluation under ``torch.no_grad`` (the same operations).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten overload packets whose call makes the host wait for the device's result
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense",  # item(), float(t), int(t), bool(t) and every composite built on them
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
})
COPY_OPS = frozenset({"aten::_to_copy", "aten::copy_", "aten::to"})
INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_"})  # sync with a boolean mask only


def _is_mask_index(name: str, args: tuple) -> bool:
    """Indexing with a boolean mask (``t[t > 0]``): its result's shape needs the mask's count on the host."""
    if name not in INDEX_OPS or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())


def _is_device_to_host(name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """A copy whose source is off the host and whose result is on it."""
    if name not in COPY_OPS:
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    source = tensors[-1] if name == "aten::copy_" else (tensors[0] if tensors else None)
    target = args[0] if name == "aten::copy_" else out
    return (isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor)
            and source.device.type not in ("cpu", "meta") and target.device.type == "cpu")


class SyncCounter(TorchDispatchMode):
    """Counts the host synchronisations of the operators run inside ``with SyncCounter() as c:``.

    Attributes:
        counts: operator name -> calls that synchronise (``"device_to_host"`` for copies).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """All synchronisations counted so far."""
        return sum(self.counts.values())

    def reset(self) -> None:
        """Start counting from zero again."""
        self.counts.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif _is_mask_index(name, args):
            self.counts[f"{name} (boolean mask)"] += 1
        elif _is_device_to_host(name, args, kwargs, out):
            self.counts["device_to_host"] += 1
        return out
