"""Convergence certificate of pcDEQ fixed points.

At the fixed point z* of g(z) = sigma(W z + x~) the Jacobian J = diag(sigma'(W z* + x~)) W is nonnegative and,
by concavity, J z* <= z* - g(0) < z* componentwise. The Collatz-Wielandt bound of a nonnegative matrix then gives

    rho(J) <= max_i (J z*)_i / z*_i < 1,

a per-sample certificate that plain iteration (and the backward solve u = J^T u + v) contracts locally. It costs
one Jacobian-vector product. The observed contraction ratio of the last iterations is logged beside it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pcdeq.layer import PcDEQLayer

Tensor = torch.Tensor


@torch.no_grad()
def collatz_wielandt_bound(layer: PcDEQLayer, z_star: Tensor, x_inj: Tensor) -> Tensor:
    """Per-sample bound max_i (J z*)_i / z*_i on the spectral radius of the layer's Jacobian at z*.

    Args:
        layer: the pcDEQ layer.
        z_star: fixed points, [B, ...].
        x_inj: the injected inputs x~ that produced them.

    Returns:
        Tensor [B] of bounds (< 1 at a true fixed point).
    """
    w = layer.W.weight()
    with warnings.catch_warnings():  # torch.func.jvp trips an internal torch.jit.script deprecation warning
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        jz = torch.func.jvp(lambda z: layer.map(z, x_inj, w), (z_star,), (z_star,))[1]
    tiny = torch.finfo(z_star.dtype).tiny  # z* > 0 in exact arithmetic; guard underflow to 0
    return (jz / z_star.clamp_min(tiny)).flatten(1).amax(dim=1)


def convergence_certificate(model: nn.Module) -> dict[str, float]:
    """Certificate of the last forward pass of every pcDEQ layer in ``model``.

    Returns:
        ``{"cw_bound_max", "cw_bound_mean", "contraction"}``: the largest and mean per-sample
        Collatz-Wielandt bound over samples and layers, and the largest observed forward contraction ratio
        (geometric mean of the last residual ratios). Empty when the model has no pcDEQ layer or no forward
        pass has run yet.
    """
    bounds, ratios = [], []
    for mod in model.modules():
        if isinstance(mod, PcDEQLayer) and mod.last_fixed_point is not None:
            bounds.append(collatz_wielandt_bound(mod, *mod.last_fixed_point))
            fwd = mod.last_stats.get("forward")
            if fwd is not None:
                ratios.append(fwd.contraction_ratio())
    if not bounds:
        return {}
    per_sample = torch.stack(bounds).amax(dim=0)  # the worst layer per sample
    return {
        "cw_bound_max": float(per_sample.max()),
        "cw_bound_mean": float(per_sample.mean()),
        "contraction": max(ratios) if ratios else float("nan"),
    }
