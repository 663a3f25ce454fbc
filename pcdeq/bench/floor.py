"""The compute floor of an architecture: t_unit x (iterations + 1), summed over its equilibrium blocks.

t_unit is the measured time of one float32 application of the block's operator at its shape, without gradient:
sigma(W z + x) for pcDEQ (in the model's memory format), one resolvent application V r for monDEQ
(Peaceman-Rachford applies V once per iteration in both directions). Training counts forward + backward
iterations, evaluation forward ones.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from pcdeq.bench.timing import Variant, median_ms
from pcdeq.families.pcdeq.layer import PcDEQLayer

Tensor = torch.Tensor


def pcdeq_layer_inputs(model: nn.Module, step: Callable[[], None]) -> list[tuple[PcDEQLayer, Tensor]]:
    """Each pcDEQ layer with (a detached copy of) the input it received during ``step``."""
    seen: list[tuple[PcDEQLayer, Tensor]] = []
    layers = [m for m in model.modules() if isinstance(m, PcDEQLayer)]
    run_hooked([m.register_forward_pre_hook(lambda mod, a: seen.append((mod, a[0].detach().clone())))
                for m in layers], step)
    return seen


def run_hooked(hooks: list[Any], step: Callable[[], None]) -> None:
    """Run ``step`` with the given hook handles registered, removing them afterwards whatever happens."""
    try:
        step()
    finally:
        for h in hooks:
            h.remove()


def floor_ops(variant: Variant) -> tuple[str, list[Callable[[], Any]]]:
    """One float32 application of each equilibrium block's operator at its shape, without gradient."""
    model = variant.model
    if hasattr(model, "operator"):  # monDEQ: one resolvent application per iteration, forward and backward
        with torch.no_grad():
            resolvent = model.operator.resolvent(model.alpha)
        g = torch.Generator().manual_seed(0)
        shapes = model.operator.state_shapes(variant.x.shape[0])
        r = [torch.rand(s, generator=g).to(variant.x.device) for s in shapes]
        return "V r (one resolvent application)", [_no_grad(lambda: resolvent.apply(r))]
    model.eval()
    try:
        inputs = pcdeq_layer_inputs(model, variant.eval_step)
    finally:
        model.train()
    ops = []
    for layer, x in inputs:
        z, xi = torch.rand_like(x), torch.rand_like(x)  # in x's memory format
        with torch.no_grad():
            w = layer.W.weight().detach().clone()
        ops.append(_no_grad(partial(layer.map, z, xi, w)))
    return "sigma(W z + x) (one application)", ops


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run under torch.no_grad."""

    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def floor_summary(unit: str, floor_times: list[list[float]], best: Variant) -> dict[str, Any]:
    """The floors t_unit x (iterations + 1), summed over blocks, and the best path's step / floor ratios."""
    unit_ms = [median_ms(t) for t in floor_times]
    fwd, bwd = best.train_iters["forward"], best.train_iters["backward"]
    train = sum(u * (f + b + 1) for u, f, b in zip(unit_ms, fwd, bwd, strict=True))
    evaluation = sum(u * (f + 1) for u, f in zip(unit_ms, best.eval_iters, strict=True))
    return {"unit": unit, "unit_ms_per_block": unit_ms, "train_floor_ms": train, "eval_floor_ms": evaluation,
            "train_ratio": median_ms(best.train_times) / train, "eval_ratio": median_ms(best.eval_times) / evaluation}

