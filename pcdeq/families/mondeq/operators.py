"""Monotone parameterisations of the monDEQ layer z = relu(W z + U x + b).

I - W is kept m-strongly monotone by construction, W = (1 - m) I - A^T A + B - B^T (Winston & Kolter 2020).
Two modules cover the three architectures of the paper:

* :class:`DenseMonotone`: fully connected, A and B dense and unnormalised, no scalars.
* :class:`ConvTiersMonotone`: T tiers of circular 3x3 convolutions; T = 1 is the single-conv model, T = 3 the
  multi-tier one. Per tier A_ii = sqrt(g_i) A0_i/||A0_i||, B_ii = h_i B0_i/||B0_i||, and a stride-2 coupling
  A_(i+1,i) = sqrt(gn_i) A0n_i/||A0n_i|| (Frobenius norms of whole kernels). W is block lower-bidiagonal:
  W_ii = (1 - m) I - A_ii^T A_ii - A_(i+1,i)^T A_(i+1,i) + B_ii - B_ii^T (no coupling term on the last tier)
  and W_(i+1,i) = -2 A_(i+1,i+1)^T A_(i+1,i); its symmetric part equals that of (1 - m) I - A^T A for the
  block lower-bidiagonal A, so monotonicity is kept. For T = 1 this is W = (1 - m) I - g A^T A + B - B^T with
  A = A0/||A0||, B = h B0/||B0||, the paper's single-conv layer.

Option (``positive_scalars=True``, our deviation): g, gn, h are stored as logarithms, g = exp(g_param), so
they stay positive (the authors' raw scalars can turn negative, making sqrt(g) NaN and losing monotonicity).
At initialisation value (1) and gradient equal those of the raw scalar, and Adam steps become relative steps.
``positive_scalars=False`` (the default) stores the raw scalars exactly as the authors did.

Every module offers the same small interface, used by the model and the splitting solvers:
``inject(x)`` (U x + b per tier), ``matvec(z, transpose)`` (W z or W^T z, differentiable),
``resolvent(alpha)`` (V = (I + alpha (I - W))^-1 without gradient tracking), ``state_masks(like)``
(the zero border of each tier, None where there is none) and ``state_shapes(batch)``.
:meth:`ConvTiersMonotone.frequency_weight` gives the same W and W^T applied in the frequency domain
(:class:`FrequencyW`), several times faster than the circular convolutions of ``matvec``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .circular import adjoint, cconv, cconv_t, down, down_t, spectral_apply
from .resolvents import ConvResolvent, DenseResolvent, tier_spectrum

Tensor = torch.Tensor


def _default_weight(*shape: int) -> nn.Parameter:
    """A parameter initialised like nn.Linear / nn.Conv2d weights (uniform, bound 1/sqrt(fan_in))."""
    w = torch.empty(*shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return nn.Parameter(w)


def _check_m(m: float) -> None:
    if not (isinstance(m, (int, float)) and m > 0 and math.isfinite(m)):
        raise ValueError(f"monotonicity parameter m must be a positive finite number, got {m!r}")


class DenseMonotone(nn.Module):
    """Fully connected monotone layer: U = Linear(in_features, width), A, B dense width x width.

    Args:
        in_features: input dimension (flattened image).
        width: hidden units.
        m: strong-monotonicity parameter, > 0.
    """

    def __init__(self, in_features: int, width: int, m: float = 1.0) -> None:
        super().__init__()
        _check_m(m)
        self.m = float(m)
        self.width = width
        self.U = nn.Linear(in_features, width)
        self.A = _default_weight(width, width)
        self.B = _default_weight(width, width)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Shapes of the hidden state (one tier)."""
        return [(batch, self.width)]

    def state_masks(self, like: Tensor) -> list[Tensor | None]:
        """No border: the whole state is free."""
        return [None]

    def inject(self, x: Tensor) -> list[Tensor]:
        """U x + b for a flattened input [B, in_features]."""
        return [self.U(x)]

    def weight_matrix(self) -> Tensor:
        """W = (1 - m) I - A^T A + B - B^T as a dense [width, width] matrix."""
        eye = torch.eye(self.width, dtype=self.A.dtype, device=self.A.device)
        return (1 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def matvec(self, z: Sequence[Tensor], transpose: bool = False) -> list[Tensor]:
        """W z (or W^T z) for a state [B, width]; matrix-free, so the cost stays O(B width^2)."""
        z0 = z[0]
        ata = (z0 @ self.A.T) @ self.A  # rows of A^T A z
        skew = z0 @ self.B.T - z0 @ self.B  # rows of (B - B^T) z
        return [(1 - self.m) * z0 - ata + (-skew if transpose else skew)]

    @torch.no_grad()
    def resolvent(self, alpha: float) -> DenseResolvent:
        """V = (I + alpha (I - W))^-1 from the current weights (dense inverse)."""
        return DenseResolvent(self.weight_matrix(), alpha)


class ConvTiersMonotone(nn.Module):
    """Tiers of circular 3x3 convolutions, coupled by stride-2 convolutions (see the module docstring).

    Args:
        in_channels: image channels; U = Conv3x3(in_channels, channels[0]) with bias, circular.
        channels: channels per tier, e.g. (81,) for single conv, (16, 32, 60) for multi-tier.
        grid: spatial size of tier 0 (the zero-padded image). Each later tier has size s / 2 + 1, so every
            tier except the last must have even sizes.
        m: strong-monotonicity parameter, > 0.
        positive_scalars: keep g, gn, h positive through an exp reparametrisation (documented deviation).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], grid: tuple[int, int], m: float = 1.0,
                 positive_scalars: bool = False) -> None:
        super().__init__()
        _check_m(m)
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels!r}")
        grids: list[tuple[int, int]] = [(int(grid[0]), int(grid[1]))]
        for i in range(len(channels) - 1):
            s1, s2 = grids[-1]
            if s1 % 2 or s2 % 2:
                raise ValueError(f"tier {i} grid {grids[-1]} must be even to couple to a next tier "
                                 f"(tier grids so far: {grids})")
            grids.append((s1 // 2 + 1, s2 // 2 + 1))
        if min(min(g) for g in grids) < 3:
            raise ValueError(f"tier grids {grids} are too small for 3x3 kernels")
        self.m = float(m)
        self.channels = channels
        self.grids = grids
        self.positive_scalars = positive_scalars
        n = len(channels)
        self.U = nn.Conv2d(in_channels, channels[0], 3, padding=1, padding_mode="circular")
        self.A0 = nn.ParameterList([_default_weight(c, c, 3, 3) for c in channels])
        self.B0 = nn.ParameterList([_default_weight(c, c, 3, 3) for c in channels])
        self.A0n = nn.ParameterList(
            [_default_weight(c2, c1, 3, 3) for c1, c2 in zip(channels[:-1], channels[1:], strict=True)]
        )
        init = 0.0 if positive_scalars else 1.0  # the scalar itself starts at 1 either way
        self.g_param = nn.Parameter(torch.full((n,), init))
        self.h_param = nn.Parameter(torch.full((n,), init))
        self.gn_param = nn.Parameter(torch.full((n - 1,), init)) if n > 1 else None

    def _scalar(self, p: Tensor) -> Tensor:
        return p.exp() if self.positive_scalars else p

    def kernels(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Effective kernels (A_ii, B_ii, A_(i+1,i)), differentiable w.r.t. the parameters."""
        g, h = self._scalar(self.g_param), self._scalar(self.h_param)
        A = [g[i].sqrt() * w / w.norm() for i, w in enumerate(self.A0)]
        B = [h[i] * w / w.norm() for i, w in enumerate(self.B0)]
        An: list[Tensor] = []
        if self.gn_param is not None:
            gn = self._scalar(self.gn_param)
            An = [gn[i].sqrt() * w / w.norm() for i, w in enumerate(self.A0n)]
        return A, B, An

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Shapes [B, C_i, s_i, s_i'] of the tiers."""
        return [(batch, c, *g) for c, g in zip(self.channels, self.grids, strict=True)]

    def state_masks(self, like: Tensor) -> list[Tensor | None]:
        """Per tier a [1, 1, s1, s2] mask that zeroes the one-pixel border."""
        masks: list[Tensor | None] = []
        for s1, s2 in self.grids:
            mk = like.new_zeros(1, 1, s1, s2)
            mk[..., 1:-1, 1:-1] = 1
            masks.append(mk)
        return masks

    def inject(self, x: Tensor) -> list[Tensor]:
        """U x + b on tier 0 (x is the zero-padded image on tier 0's grid); later tiers get no input."""
        b0 = self.U(x)
        rest = zip(self.channels[1:], self.grids[1:], strict=True)
        return [b0] + [b0.new_zeros(x.shape[0], c, *g) for c, g in rest]

    def matvec(self, z: Sequence[Tensor], transpose: bool = False) -> list[Tensor]:
        """W z (or W^T z) with circular convolutions, differentiable w.r.t. the parameters."""
        A, B, An = self.kernels()
        n = len(self.channels)
        out = []
        for i in range(n):
            zi = z[i]
            skew = cconv(zi, B[i]) - cconv_t(zi, B[i])
            wi = (1 - self.m) * zi - cconv_t(cconv(zi, A[i]), A[i]) + (-skew if transpose else skew)
            if i < n - 1:
                wi = wi - down_t(down(zi, An[i]), An[i])
            # W_(i+1,i) = -2 A_(i+1)^T A_n(i): W takes it from tier i-1, W^T from tier i+1
            if not transpose and i > 0:
                wi = wi - 2 * cconv_t(down(z[i - 1], An[i - 1]), A[i])
            if transpose and i < n - 1:
                wi = wi - 2 * down_t(cconv(z[i + 1], A[i + 1]), An[i])
            out.append(wi)
        return out

    @torch.no_grad()
    def resolvent(self, alpha: float) -> ConvResolvent:
        """V = (I + alpha (I - W))^-1 from the current weights, via the FFT (see :mod:`.resolvents`)."""
        A, B, An = self.kernels()
        return ConvResolvent(A, B, An, self.grids, self.m, alpha)

    def frequency_weight(self) -> FrequencyW:
        """W and W^T in the frequency domain from the current weights (tracked when grad mode is on).

        Returns:
            A :class:`FrequencyW`, meant to live for one forward pass and its backward.
        """
        A, B, An = self.kernels()
        return FrequencyW(A, B, An, self.grids, self.m)


class FrequencyW:
    """W and W^T of :class:`ConvTiersMonotone` applied in the frequency domain, for one forward pass.

    Per tier, the circular part (1 - m) I - A^T A + B - B^T is one C x C matrix per frequency of the half
    spectrum, M(k) = (1 - m) I - P(k) with P from :func:`.resolvents.tier_spectrum`: an application is rfft2,
    one batched complex matrix product, irfft2 (W^T uses M(k)^H). The spectra are computed once, when the
    object is built, and are tracked by autograd when grad mode is on (the tracked application at the
    equilibrium then gives the parameter gradients); applications under ``torch.no_grad`` build no graph.
    :meth:`resolvent` builds V from the same spectra.

    The stride-2 terms of multi-tier models stay spatial: ``down`` samples even positions and appends a zero
    row and column, mapping a grid s to s / 2 + 1, so neither A_n^T A_n (which couples aliased frequencies,
    outside the half spectrum) nor the coupling W_(i+1,i) is one matrix per frequency of a real FFT.

    Args:
        A, B, An: effective kernels (:meth:`ConvTiersMonotone.kernels`).
        grids: per-tier grids.
        m: monotonicity parameter.
    """

    def __init__(self, A: Sequence[Tensor], B: Sequence[Tensor], An: Sequence[Tensor],
                 grids: Sequence[tuple[int, int]], m: float) -> None:
        n = len(A)
        self.A, self.B, self.An, self.grids, self.m = list(A), list(B), list(An), list(grids), m
        # full spectrum on tiers with a coupling, as the resolvent's Woodbury step needs it there
        self.spectra = [tier_spectrum(A[i], B[i], grids[i], onesided=i == n - 1) for i in range(n)]
        self.M = []
        for P, (_, s2) in zip(self.spectra, grids, strict=True):
            eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
            self.M.append(((1 - m) * eye - P[:, : s2 // 2 + 1]).contiguous())
        self._MH: list[Tensor] | None = None  # the M(k)^H of untracked W^T applications, made at the first one

    def _adjoints(self) -> list[Tensor]:
        """M(k)^H per tier; kept only when no graph is being recorded (a tracked W^T gets its own)."""
        if torch.is_grad_enabled() and any(M.requires_grad for M in self.M):
            return [adjoint(M) for M in self.M]
        if self._MH is None:
            self._MH = [adjoint(M.detach()) for M in self.M]
        return self._MH

    def apply(self, z: Sequence[Tensor], transpose: bool = False) -> list[Tensor]:
        """W z (or W^T z) for a tiered state; equal to :meth:`ConvTiersMonotone.matvec` up to rounding.

        Args:
            z: one tensor [B, C_i, s_i, s_i'] per tier.
            transpose: apply W^T.

        Returns:
            One tensor per tier.
        """
        out = [spectral_apply(M, zi) for M, zi in zip(self._adjoints() if transpose else self.M, z, strict=True)]
        for i, An in enumerate(self.An):  # stride-2 terms, spatial (see the class docstring)
            d = down(z[i], An)
            if transpose:
                out[i] = out[i] - down_t(d + 2 * cconv(z[i + 1], self.A[i + 1]), An)
            else:
                out[i] = out[i] - down_t(d, An)
                out[i + 1] = out[i + 1] - 2 * cconv_t(d, self.A[i + 1])
        return out

    @torch.no_grad()
    def resolvent(self, alpha: float) -> ConvResolvent:
        """V = (I + alpha (I - W))^-1 from the same kernels and spectra (untracked)."""
        A, B, An, P = ([t.detach() for t in ts] for ts in (self.A, self.B, self.An, self.spectra))
        return ConvResolvent(A, B, An, self.grids, self.m, alpha, spectra=P)
