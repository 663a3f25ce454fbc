"""The pcDEQ layer: z* = sigma(W z* + inj(x)) with a nonnegative, weight-normalised W.

Forward: the fixed point is found without gradient tracking, then ONE tracked application of the map attaches
z* to the graph. Backward: a hook on that application replaces the incoming gradient v by the solution of
u = J^T u + v (J the Jacobian of the map at z*), so the gradients w.r.t. W, g, v and x are the exact implicit
ones, and memory does not depend on the number of iterations. J^T u products reuse the graph of the same
tracked application, so no second copy is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq.activations import Activation, get_activation
from pcdeq.errors import ConfigError
from pcdeq.solvers import SolverConfig, SolverStats

Tensor = torch.Tensor

INIT_SCALE = math.sqrt(1e-4)  # reference initialisation: U[0,1) * sqrt(1e-4) / sqrt(out + in)


class NonnegWeight(nn.Module):
    """Weight W = g * v / ||v|| (per output row or filter), with g, v projected onto the nonnegative orthant.

    Args:
        channels: number of rows (dense) or filters/in-channels (conv).
        kind: "dense" (channels x channels matrix) or "conv" (3x3 convolution, padding 1).
    """

    def __init__(self, channels: int, kind: str = "dense") -> None:
        super().__init__()
        if kind not in ("dense", "conv"):
            raise ConfigError(f"unknown weight kind {kind!r}; valid choices: dense, conv")
        self.kind = kind
        shape = (channels, channels) if kind == "dense" else (channels, channels, 3, 3)
        v = torch.rand(shape) * INIT_SCALE / math.sqrt(shape[0] + shape[1])
        self.v = nn.Parameter(v)
        self.g = nn.Parameter(self._row_norm(v.detach()).flatten())

    @staticmethod
    def _row_norm(v: Tensor) -> Tensor:
        return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))

    def weight(self) -> Tensor:
        """The effective W. A row of v that is entirely 0 gives a 0 row (not 0/0 = NaN)."""
        norm = self._row_norm(self.v)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        return self.g.reshape_as(norm) * self.v / safe

    def matvec(self, z: Tensor, weight: Tensor | None = None) -> Tensor:
        """W z for a batch z ([B, C] dense, [B, C, H, W] conv); ``weight`` reuses a W computed once."""
        w = self.weight() if weight is None else weight
        return F.linear(z, w) if self.kind == "dense" else F.conv2d(z, w, padding=1)

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp g and v at 0 (call after every optimizer step)."""
        self.g.clamp_(min=0)
        self.v.clamp_(min=0)


class PcDEQLayer(nn.Module):
    """One positive concave equilibrium block.

    Args:
        channels: width of the hidden state (features for dense, channels for conv).
        kind: "dense" or "conv".
        activation: registry name (see :mod:`pcdeq.activations`).
        variant: optional check that the activation belongs to this variant ("pcdeq1" / "pcdeq2").
        solver: forward/backward solver settings.

    Attributes:
        last_stats: ``{"forward": SolverStats, "backward": SolverStats}`` of the last call.
        last_fixed_point: (z*, x~) of the last forward, detached, for the convergence certificate.
    """

    def __init__(
        self,
        channels: int,
        kind: str = "dense",
        activation: str | Activation = "tanh",
        variant: str | None = None,
        solver: SolverConfig | None = None,
    ) -> None:
        super().__init__()
        self.act = activation if isinstance(activation, Activation) else get_activation(activation, variant)
        self.W = NonnegWeight(channels, kind)
        self.solver = solver or SolverConfig()
        self.last_stats: dict[str, SolverStats] = {}
        self.last_fixed_point: tuple[Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"kind={self.W.kind}, activation={self.act.name}, variant={self.act.variant}"

    def map(self, z: Tensor, x_inj: Tensor, weight: Tensor | None = None) -> Tensor:
        """g_x(z) = sigma(W z + x~)."""
        return self.act.fn(self.W.matvec(z, weight) + x_inj)

    def forward(self, x: Tensor) -> Tensor:
        x_inj = self.act.injection(x)
        with torch.no_grad():
            w = self.W.weight()
            z_star, fwd = self.solver.solve("fwd", lambda z: self.map(z, x_inj, w), torch.zeros_like(x_inj))
        self.last_stats = {"forward": fwd}
        self.last_fixed_point = (z_star.detach(), x_inj.detach())
        if not torch.is_grad_enabled():  # evaluation (no_grad / inference_mode): nothing to attach
            return self.map(z_star, x_inj)
        z_in = z_star.detach().requires_grad_()
        z_out = self.map(z_in, x_inj)  # the one tracked application
        return _ImplicitGrad.apply(z_out, z_in, self)

    @torch.no_grad()
    def project_(self) -> None:
        """Project W's parameters onto the nonnegative orthant."""
        self.W.project_()


class _ImplicitGrad(torch.autograd.Function):
    """Identity on z_out = g_x(z*) whose backward turns the incoming v into u = J^T u + v.

    J^T u is a vector-Jacobian product through the graph of z_out w.r.t. z_in (= z*, detached); the engine then
    carries u through the same graph to W, g, v and x. Saving z_out/z_in in the context (instead of capturing
    them in a tensor hook) keeps the graph free of reference cycles.
    """

    @staticmethod
    def forward(ctx, z_out: Tensor, z_in: Tensor, layer: PcDEQLayer) -> Tensor:
        ctx.save_for_backward(z_out, z_in)
        ctx.layer = layer
        return z_out.view_as(z_out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z_out, z_in = ctx.saved_tensors

        def backward_map(u: Tensor) -> Tensor:
            (jtu,) = torch.autograd.grad(z_out, z_in, u, retain_graph=True)
            return jtu + grad

        u, bwd = ctx.layer.solver.solve("bwd", backward_map, grad)
        ctx.layer.last_stats["backward"] = bwd
        return u, None, None
