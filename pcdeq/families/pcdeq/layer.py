"""The pcDEQ layer: z* = sigma(W z* + inj(x)) with a nonnegative, weight-normalised W.

Forward: the fixed point is found without gradient tracking; the layer's output is one more application of the
map at z*, g(z*) = sigma(W z* + x~). Backward: the incoming gradient v is replaced by the solution of
u = J^T u + v (J the Jacobian of the map at z*), so the gradients w.r.t. W, g, v and x are the exact implicit
ones, and memory does not depend on the number of iterations.

How the backward is computed is a set of switches in :class:`.solver_config.PcdeqSolverConfig` (each measurable;
the defaults are the fastest exact path, and every combination gives the same gradients):

* ``weight_grad="direct"`` (default): one autograd Function maps (x~, W) to g(z*); its backward solves for u,
  then returns dL/dx~ = sigma'(p*) u and dL/dW = (sigma'(p*) u)^T z* by one matrix product (dense) or one
  convolution-weight-gradient call (conv). ``"autograd"``: the application at z* is tracked by autograd and
  the engine carries u through its graph (the plain path).
* ``jacobian="analytic"`` (default): J^T u = W^T (sigma'(p*) u), with sigma' from the activation's output (its
  closed form) and W^T the transposed matrix or the convolution with the flipped, channel-transposed kernel.
  ``"autograd"``: vector-Jacobian products through a tracked application (the plain path). Activations
  registered without a closed-form derivative use autograd.
* ``backward="unrolled"``: autograd through every forward iteration instead (memory grows with the iterations;
  for memory comparisons and gradient tests).

The untracked iterations write their sums and activations in place (``inplace``), check the residual on the
``check`` schedule, can start in bfloat16 (``precision``) and can be compiled (``compile``); see
:mod:`pcdeq.solver` and :mod:`.solver_config`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from pcdeq.activations import Activation, get_activation
from pcdeq.errors import ConfigError
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.stats import SolverStats

from .solver_config import PcdeqSolverConfig

Tensor = torch.Tensor
Map = Callable[[Tensor], Tensor]

INIT_SCALE = math.sqrt(1e-4)  # reference initialisation: U[0,1) * sqrt(1e-4) / sqrt(out + in)


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored that way (and not also contiguous), else contiguous_format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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

    def adjoint(self, weight: Tensor, like: Tensor | None = None) -> Map:
        """y -> W^T y for the given W: the transposed matrix, or the convolution with the flipped,
        channel-transposed kernel (the adjoint of the padding-1 convolution). ``like``: a tensor in the memory
        format the products will see (the kernel is laid out to match)."""
        if self.kind == "dense":
            return lambda y: y @ weight
        fmt = _memory_format(like) if like is not None else torch.contiguous_format
        wt = weight.transpose(0, 1).flip(-2, -1).contiguous(memory_format=fmt)
        return lambda y: F.conv2d(y, wt, padding=1)

    def weight_grad(self, z: Tensor, su: Tensor, weight: Tensor) -> Tensor:
        """dL/dW of <su, W z> for a batch: su^T z (dense) or one convolution-weight-gradient call (conv)."""
        if self.kind == "dense":
            return su.flatten(0, -2).T @ z.flatten(0, -2)
        return conv2d_weight(z, weight.shape, su, padding=1)

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp g and v at 0 (call after every optimizer step)."""
        self.g.clamp_(min=0)
        self.v.clamp_(min=0)


_COMPILED: dict[tuple[str, str, str], Callable[..., Tensor]] = {}


def _compiled(kind: str, act: Activation, which: str) -> Callable[..., Tensor]:
    """torch.compile'd iteration steps (``solver.compile``), one per (kind, activation, direction)."""
    key = (kind, act.name, which)
    if key not in _COMPILED:
        fn = act.fn

        def lin(z: Tensor, w: Tensor) -> Tensor:
            return F.linear(z, w) if kind == "dense" else F.conv2d(z, w, padding=1)

        def forward_step(z: Tensor, w: Tensor, x: Tensor) -> Tensor:
            return fn(lin(z, w) + x)

        def backward_step(u: Tensor, s: Tensor, wt: Tensor, v: Tensor) -> Tensor:
            return lin(s * u, wt) + v  # wt: W^T (dense) or the adjoint kernel (conv)

        _COMPILED[key] = torch.compile(forward_step if which == "fwd" else backward_step, dynamic=None)
    return _COMPILED[key]


class PcDEQLayer(nn.Module):
    """One positive concave equilibrium block.

    Args:
        channels: width of the hidden state (features for dense, channels for conv).
        kind: "dense" or "conv".
        activation: registry name (see :mod:`pcdeq.activations`).
        variant: optional check that the activation belongs to this variant ("pcdeq1" / "pcdeq2").
        solver: forward/backward solver settings and the performance switches (see :class:`PcdeqSolverConfig`; a
            plain :class:`SolverConfig` takes the switches' defaults).

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
        self.solver = PcdeqSolverConfig.of(solver or PcdeqSolverConfig())
        self.last_stats: dict[str, SolverStats] = {}
        self.last_fixed_point: tuple[Tensor, Tensor] | None = None
        self._previous: dict[str, int] = {}  # iterations of the last solve of each kind (check="prior")
        # (versions, dtype, device, data pointers), the tensors g and v (weakly), and W made from them
        self._weight_cache: tuple[tuple[Any, ...], weakref.ref, weakref.ref, Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_weight_cache"] = None  # derived from the parameters (and possibly an inference tensor)
        return state

    def extra_repr(self) -> str:
        return f"kind={self.W.kind}, activation={self.act.name}, variant={self.act.variant}"

    def map(self, z: Tensor, x_inj: Tensor, weight: Tensor | None = None) -> Tensor:
        """g_x(z) = sigma(W z + x~)."""
        return self.act.fn(self.W.matvec(z, weight) + x_inj)

    # ---------------------------------------------------------------- untracked iteration maps

    def _forward_step(self, w: Tensor, x_inj: Tensor, zero: Tensor | None = None) -> Map:
        """z -> sigma(W z + x~) for the untracked iterations; always returns a fresh tensor.

        ``zero``: the solve's zero start; the map returns sigma(x~) for it without the product (W 0 = 0 exactly,
        so the iterate is the same, one product fewer per solve).
        """
        cfg, act, matvec = self.solver, self.act, self.W.matvec
        step: Map
        if cfg.compile:
            compiled = _compiled(self.W.kind, act, "fwd")
            step = lambda z: compiled(z, w, x_inj)  # noqa: E731
        elif cfg.inplace and act.fn_ is not None:  # the product is a fresh tensor: add and activate in it
            fn_ = act.fn_
            step = lambda z: fn_(matvec(z, w).add_(x_inj))  # noqa: E731
        else:
            step = lambda z: act.fn(matvec(z, w) + x_inj)  # noqa: E731
        if zero is None:
            return step
        return lambda z: act.fn(x_inj) if z is zero else step(z)

    def _backward_step(self, s: Tensor, w: Tensor, grad: Tensor) -> Map:
        """u -> W^T (s u) + grad (analytic J^T u + v); always returns a fresh tensor."""
        cfg = self.solver
        if cfg.compile:
            step = _compiled(self.W.kind, self.act, "bwd")
            if self.W.kind == "dense":
                wt = w.T  # F.linear(y, W^T) = y W = W^T y for row vectors
            else:
                wt = w.transpose(0, 1).flip(-2, -1).contiguous(memory_format=_memory_format(s))
            return lambda u: step(u, s, wt, grad)
        adj = self.W.adjoint(w, like=s)
        if cfg.inplace:
            return lambda u: adj(s * u).add_(grad)
        return lambda u: adj(s * u) + grad

    def _analytic(self) -> bool:
        return self.solver.jacobian == "analytic" and self.act.deriv is not None

    # ---------------------------------------------------------------- solves

    def _solve_forward(self, x_inj: Tensor, w: Tensor) -> Tensor:
        """z* of sigma(W z + x~) from z = 0, without tracking; records the statistics and the fixed point."""
        cfg = self.solver
        key = "fwd_train" if self.training else "fwd_eval"
        with torch.no_grad():
            if cfg.skip_zero_product:  # a zero scalar broadcast to the iterate's shape: nothing to fill
                z0 = x_inj.new_zeros(()).expand_as(x_inj)
                zero: Tensor | None = z0
            else:
                z0, zero = torch.zeros_like(x_inj), None
            f = self._forward_step(w, x_inj, zero)
            f_low = None
            if cfg.precision != "off":
                f_low = self._forward_step(w.to(torch.bfloat16), x_inj.to(torch.bfloat16))
            z, stats = cfg.solve("fwd", f, z0, previous=self._previous.get(key), f_low=f_low,
                                 inplace=cfg.inplace, precision=cfg.precision)
        self._previous[key] = stats.iters - stats.low_precision_iters
        self.last_stats = {"forward": stats}
        self.last_fixed_point = (z, x_inj.detach())
        return z

    def _solve_backward(self, grad: Tensor, s: Tensor, w: Tensor) -> Tensor:
        """u = W^T (s u) + grad (the analytic backward), without tracking; records the statistics."""
        cfg = self.solver
        with torch.no_grad():
            f = self._backward_step(s, w, grad)
            f_low = None
            if cfg.precision != "off":
                f_low = self._backward_step(s.to(torch.bfloat16), w.to(torch.bfloat16), grad.to(torch.bfloat16))
            u, stats = cfg.solve("bwd", f, grad, previous=self._previous.get("bwd"), f_low=f_low,
                                 inplace=cfg.inplace, precision=cfg.precision)
        self._previous["bwd"] = stats.iters - stats.low_precision_iters
        self.last_stats["backward"] = stats
        return u

    def _solve_backward_autograd(self, grad: Tensor, z_out: Tensor, z_in: Tensor) -> Tensor:
        """u = J^T u + grad with J^T u by autograd through the graph of z_out = g(z_in); records the statistics."""
        cfg = self.solver

        def backward_map(u: Tensor) -> Tensor:
            (jtu,) = torch.autograd.grad(z_out, z_in, u, retain_graph=True)
            return jtu + grad

        u, stats = cfg.solve("bwd", backward_map, grad, previous=self._previous.get("bwd"), inplace=True)
        self._previous["bwd"] = stats.iters
        self.last_stats["backward"] = stats
        return u

    def _eval_weight(self) -> Tensor:
        """W, reused while g and v are unchanged (in-place updates bump their version counters).

        Writes that bypass the version counters are not seen: through ``.data`` or by fused optimisers
        (``torch.optim.AdamW(..., fused=True)``, the training stack's default). The training stack is safe: every
        forward with gradients clears the cache, and :meth:`project_` after every optimizer step bumps the
        counters. A loop of your own that updates g and v that way between two no-grad evaluations must call
        ``project_()`` (which it needs for the constraint anyway) or set ``cache_weight=False``.
        """
        g, v = self.W.g, self.W.v
        key = (g._version, v._version, g.data_ptr(), v.data_ptr(), g.dtype, g.device)
        cache = self._weight_cache
        # the tensors' identity as well: a new tensor (torch.func.functional_call's) can reuse a freed one's memory
        # with the same version counter, so pointers and versions alone can match another tensor's
        if cache is None or cache[0] != key or cache[1]() is not g or cache[2]() is not v:
            with torch.no_grad():
                self._weight_cache = cache = (key, weakref.ref(g), weakref.ref(v), self.W.weight())
        return cache[3]

    # ---------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        x_inj = self.act.injection(x)
        cfg = self.solver
        if not torch.is_grad_enabled():  # evaluation (no_grad / inference_mode): nothing to attach
            w = self._eval_weight() if cfg.cache_weight else self.W.weight()
            z_star = self._solve_forward(x_inj, w)
            return z_star if cfg.eval_output == "last" else self._forward_step(w, x_inj)(z_star)
        self._weight_cache = None  # a training step may change g and v by any means
        if cfg.backward == "unrolled":
            return self._unrolled(x_inj)
        w = self.W.weight()
        if cfg.weight_grad == "direct":
            return _DirectImplicit.apply(x_inj, w, self)
        z_star = self._solve_forward(x_inj, w.detach())
        if not self._analytic():  # the plain path: autograd for J^T u and for the parameter gradients
            z_in = z_star.detach().requires_grad_()
            z_out = self.map(z_in, x_inj, w)  # the one tracked application
            return _ImplicitGrad.apply(z_out, z_in, self)
        z_out = self.map(z_star, x_inj, w)  # tracked through W and x~ only: z* needs no gradient
        return _AnalyticImplicit.apply(z_out, w.detach(), self)

    def _unrolled(self, x_inj: Tensor) -> Tensor:
        """Backpropagation through the forward iterations (same iterates, same stopping rule), then g(z_K)."""
        cfg = self.solver
        w = self.W.weight()
        z, stats = cfg.solve("fwd", lambda z: self.map(z, x_inj, w), torch.zeros_like(x_inj))  # tracked
        self.last_stats = {"forward": stats}
        self.last_fixed_point = (z.detach(), x_inj.detach())
        return self.map(z, x_inj, w)

    @torch.no_grad()
    def project_(self) -> None:
        """Project W's parameters onto the nonnegative orthant."""
        self.W.project_()


class _ImplicitGrad(torch.autograd.Function):
    """Identity on z_out = g_x(z*) whose backward turns the incoming v into u = J^T u + v (the plain path).

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
        return ctx.layer._solve_backward_autograd(grad, z_out, z_in), None, None


class _AnalyticImplicit(torch.autograd.Function):
    """Identity on the tracked z_out = g_x(z*) whose backward solves u = W^T (sigma' u) + v in closed form;
    the engine carries u through z_out's graph to W and x~ (``weight_grad="autograd"``)."""

    @staticmethod
    def forward(ctx, z_out: Tensor, w: Tensor, layer: PcDEQLayer) -> Tensor:
        ctx.save_for_backward(z_out, w)
        ctx.layer = layer
        return z_out.view_as(z_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        z_out, w = ctx.saved_tensors
        layer: PcDEQLayer = ctx.layer
        assert layer.act.deriv is not None
        s = layer.act.deriv(z_out)
        return layer._solve_backward(grad, s, w), None, None


class _DirectImplicit(torch.autograd.Function):
    """(x~, W) -> g(z*) with the implicit gradients for x~ and W in one call each (``weight_grad="direct"``).

    Saved for the backward: z* and W, and the output (g(z*), or z* itself with ``train_output="last"``: equal
    at the fixed point) for sigma'; with the autograd Jacobian x~ instead, to rebuild the map's graph at z*.
    """

    @staticmethod
    def forward(ctx, x_inj: Tensor, w: Tensor, layer: PcDEQLayer) -> Tensor:
        z_star = layer._solve_forward(x_inj, w)
        # the layer's output: one more application at z* (the reference's), or z* itself (train_output="last",
        # except with precision="bf16": its z* is only bfloat16-accurate, and sigma' must come from float32)
        cfg = layer.solver
        last = cfg.train_output == "last" and cfg.precision != "bf16"
        y = z_star if last else layer._forward_step(w, x_inj)(z_star)
        analytic = layer._analytic()
        ctx.save_for_backward(z_star, y if analytic else x_inj, w)
        ctx.layer, ctx.analytic = layer, analytic
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        z_star, saved, w = ctx.saved_tensors
        layer: PcDEQLayer = ctx.layer
        if ctx.analytic:
            assert layer.act.deriv is not None
            s = layer.act.deriv(saved)
            u = layer._solve_backward(grad, s, w)
            su = s * u
        else:
            with torch.enable_grad():
                z_in = z_star.detach().requires_grad_()
                pre = layer.W.matvec(z_in, w) + saved
                z_out = layer.act.fn(pre)
            u = layer._solve_backward_autograd(grad, z_out, z_in)
            (su,) = torch.autograd.grad(z_out, pre, u)
        return su, layer.W.weight_grad(z_star, su, w), None
