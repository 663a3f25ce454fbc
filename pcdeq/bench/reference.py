"""The authors' pcDEQ implementation beside ours: imported at runtime from their checkout (nothing is copied),
given our weights, checked on one training batch (fixed points and gradients), then timed like our variants.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq.activations import get_activation
from pcdeq.bench.floor import run_hooked
from pcdeq.bench.setup import Setup
from pcdeq.bench.timing import Variant
from pcdeq.dataset_specs import get_spec
from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.training.optim import build_optimizer

Tensor = torch.Tensor
REF_MODULES = ("networks", "blocks", "layers", "solvers", "utils")  # the reference's top-level module names
REF_CHILDREN = {  # the reference's stateful modules, in the order of our networks' stateful modules
    "linear": ("linear1", "bn1", "block", "bn2", "classifier"),
    "conv": ("conv1", "bn1", "block", "bn2", "classifier"),
    "multiconv": ("conv1", "bn1", "block1", "bn2", "downsample1", "bn3", "block2", "bn4", "downsample2", "bn5",
                  "block3", "bn6", "classifier"),
}
FIXED_POINT_LIMIT, GRAD_LIMIT = 1e-4, 1e-3
ZERO_GRAD = 1e-4  # a parameter gradient below this fraction of the whole gradient's norm is 0 up to rounding


def reference_counts(model: Any, direction: str) -> list[int]:
    """The reference's iteration counts of its last solves, per block."""
    key = "iter_forward" if direction == "forward" else "iter_backward"
    return [int(getattr(b.deq, key)) for b in model.blocks]


def import_reference(path: Path) -> ModuleType:
    """The authors' ``networks`` module from their checkout at ``path``, imported at runtime.

    Its modules have generic top-level names (``solvers``, ``utils``, ...): any module of those names already
    imported is set aside during the import and put back afterwards, and the reference's own are removed from
    ``sys.modules`` again (its classes keep working through the returned module).
    """
    if not (path / "networks.py").is_file():
        raise SystemExit(f"--reference {path}: no networks.py there (expected a checkout of the authors' code)")
    saved = {name: sys.modules.pop(name) for name in REF_MODULES if name in sys.modules}
    sys.path.insert(0, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("networks")
    finally:
        sys.path.remove(str(path))
        for name in REF_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def build_reference(networks: ModuleType, setup: Setup) -> Any:
    """The reference's network (an nn.Module of foreign code, so typed Any) for the same architecture, size,
    dataset shape and activation."""
    model = setup.config["model"]
    arch, channels, act = model["arch"], model["channels"], model["activation"]
    n = "1" if get_activation(act, model.get("variant")).variant == "pcdeq1" else "2"
    c_in, side, _ = get_spec(setup.config["dataset"]["name"]).shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's FutureWarning for the legacy weight_norm the reference uses
        if arch == "linear":
            if c_in * side * side != 784:
                raise SystemExit("the reference's linear network takes 28x28 single-channel inputs only")
            return getattr(networks, f"LinearPcDEQ{n}")(channels, act)
        if arch == "conv":
            return getattr(networks, f"SingleConvPcDEQ{n}")(side, c_in, channels, act)
        return getattr(networks, f"MultiConvPcDEQ{n}")(c_in, *channels, act)


def module_pairs(ours: nn.Module, ref: Any, arch: str) -> list[tuple[nn.Module, Any]]:
    """Our stateful modules (pcDEQ layers, and modules with parameters or buffers) paired with the reference's."""
    mine = [m for m in ours.children() if isinstance(m, PcDEQLayer)
            or any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]
    theirs = [getattr(ref, name) for name in REF_CHILDREN[arch]]
    if len(mine) != len(theirs):
        raise RuntimeError(f"{arch}: {len(mine)} stateful modules here, {len(theirs)} in the reference")
    return list(zip(mine, theirs, strict=True))


def parameter_pairs(ours: nn.Module, ref: Any, arch: str) -> list[tuple[str, Tensor, Tensor]]:
    """(name, our parameter, the reference's) for every parameter; W's g and v map to weight_g and weight_v."""
    out: list[tuple[str, Tensor, Tensor]] = []
    for i, (o, r) in enumerate(module_pairs(ours, ref, arch)):
        if isinstance(o, PcDEQLayer):
            w = r.deq.f.W
            out += [(f"{i}.W.g", o.W.g, w.weight_g), (f"{i}.W.v", o.W.v, w.weight_v)]
        else:
            theirs = dict(r.named_parameters())
            out += [(f"{i}.{name}", p, theirs[name]) for name, p in o.named_parameters()]
    return out


@torch.no_grad()
def copy_to_reference(ours: nn.Module, ref: Any, arch: str) -> None:
    """Our weights (and batch-norm statistics) into the reference, so that both compute the same thing."""
    for o, r in module_pairs(ours, ref, arch):
        if isinstance(o, PcDEQLayer):
            w = r.deq.f.W
            w.weight_v.copy_(o.W.v)
            w.weight_g.copy_(o.W.g.reshape_as(w.weight_g))
        else:
            r.load_state_dict(o.state_dict())


def block_outputs(model: nn.Module, blocks: list[nn.Module], step: Callable[[], None]) -> list[Tensor]:
    """The output of each module in ``blocks`` during ``step``."""
    seen: list[Tensor] = []
    run_hooked([b.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone())) for b in blocks], step)
    return seen


def grad_of(p: Tensor) -> Tensor:
    """The gradient a backward pass left on ``p``."""
    if p.grad is None:
        raise RuntimeError("a parameter without a gradient after backward: the networks differ in structure")
    return p.grad


def check_reference(ours: nn.Module, ref: Any, arch: str, x: Tensor, y: Tensor) -> dict[str, Any]:
    """One training batch through both (train mode, no optimizer step): fixed points and gradients compared.

    The fixed point is each block's output g(z*) (one application at the solver's last iterate, in both). The
    gradient error is the largest ||dL/dp - dL/dp_ref|| / ||dL/dp_ref|| over the parameters, leaving out those
    whose reference gradient is below :data:`ZERO_GRAD` of the whole gradient's norm: parameters followed by batch
    norm up to a constant shift or scale (a bias before batch norm) have gradient 0 in exact arithmetic, so both
    sides hold rounding noise there (about 1e-6 of the norm, against 1e-2 or more for the others).
    ``grad_rel_err_overall`` is the relative error of all parameters' gradients at once.
    """
    ours.train()
    ref.train()

    def backward(model: Any) -> Callable[[], None]:
        return lambda: F.cross_entropy(model(x), y).backward()

    z_ours = block_outputs(ours, [m for m in ours.modules() if isinstance(m, PcDEQLayer)], backward(ours))
    z_ref = block_outputs(ref, [b.deq for b in ref.blocks], backward(ref))
    dz = max(float((a - b).abs().max()) for a, b in zip(z_ours, z_ref, strict=True))
    pairs = [(name, grad_of(p).reshape_as(grad_of(q)), grad_of(q)) for name, p, q in parameter_pairs(ours, ref, arch)]
    total = sum(float((q.double() ** 2).sum()) for _, _, q in pairs) ** 0.5
    overall = sum(float(((p - q).double() ** 2).sum()) for _, p, q in pairs) ** 0.5 / total
    per_param = {name: float((p - q).norm() / q.norm()) for name, p, q in pairs
                 if float(q.norm()) > ZERO_GRAD * total}
    worst = max(per_param, key=per_param.__getitem__)
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    return {"max_fixed_point_diff": dz, "grad_rel_err": per_param[worst], "grad_rel_err_param": worst,
            "grad_rel_err_overall": overall, "zero_grad_params": [n for n, _, _ in pairs if n not in per_param],
            "passed": dz <= FIXED_POINT_LIMIT and per_param[worst] <= GRAD_LIMIT,
            "limits": {"fixed_point": FIXED_POINT_LIMIT, "grad_rel_err": GRAD_LIMIT}}


def reference_variant(networks: ModuleType, setup: Setup, best: Variant) -> tuple[Variant, dict[str, Any]]:
    """The reference with our weights, checked against ours on the batch; both are left at the same weights."""
    arch = setup.config["model"]["arch"]
    ref = build_reference(networks, setup).to(setup.x.device)
    initial = copy.deepcopy(best.model.state_dict())
    copy_to_reference(best.model, ref, arch)
    check = check_reference(best.model, ref, arch, setup.x, setup.y)
    best.model.load_state_dict(initial)  # the check's batch-norm updates undone
    copy_to_reference(best.model, ref, arch)
    # the reference script's optimizer: torch's AdamW with its default (per-tensor) implementation
    optimizer = build_optimizer(ref.parameters(), dict(setup.config["optim"], fused=False))
    variant = Variant("reference", ref, optimizer, setup.x, setup.y, lambda d: reference_counts(ref, d), ref.clamp,
                      grad_eval=True)
    return variant, check


