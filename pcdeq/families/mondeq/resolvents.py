"""The Peaceman-Rachford resolvent V = (I + alpha (I - W))^-1 and its adjoint, one object per call.

Resolvents are built without gradient tracking from the operator's current (detached) weights and are meant
to live only for one forward pass and its implicit backward; they are never stored on a module.

* :class:`DenseResolvent`: a dense inverse (fully connected model).
* :class:`ConvResolvent`: convolutional tiers. I + alpha (I - W) is block lower-bidiagonal over tiers, so V is
  applied by forward substitution (V^T by back substitution). Each diagonal block is a circular operator,
  diagonalised by the 2-D DFT (:class:`TierInverse`):

  - without a stride-2 term (the last tier, or the single-conv model): one C x C complex inverse per frequency
    of the half spectrum (``rfft2``);
  - with the stride-2 term A_n^T A_n of the coupling to the next tier: keeping only even positions couples the
    four aliased frequencies k, k + (0, s/2), k + (s/2, 0), k + (s/2, s/2). The block is then
    D + (alpha / 4) L^H L per alias group, with D the per-frequency part and L (C_next x 4C) the stacked
    stride-conv spectra, and it is inverted with the Woodbury identity (a C_next x C_next inverse per group).
    The aliased pairs straddle the half spectrum, so these tiers use the full spectrum (``fft2``).

  The adjoint uses the conjugate transpose of every per-frequency matrix. The per-frequency part P of
  I - W (:func:`tier_spectrum`) is shared with W's frequency-domain application
  (:class:`pcdeq.families.mondeq.operators.FrequencyW`), so one forward pass computes the kernel spectra once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .circular import adjoint, cconv, cconv_t, down, down_t, freq_apply, kernel_spectrum, spectral_apply

Tensor = torch.Tensor


class DenseResolvent:
    """V = (I + alpha (I - W))^-1 for a dense W.

    Args:
        W: the dense operator [n, n] (detached).
        alpha: splitting step, > 0.
    """

    def __init__(self, W: Tensor, alpha: float) -> None:
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        self.V = torch.linalg.inv((1 + alpha) * eye - alpha * W)

    def apply(self, r: Sequence[Tensor], transpose: bool = False) -> list[Tensor]:
        """V r (or V^T r) for a one-tier state [B, n] (row-vector convention)."""
        return [r[0] @ (self.V if transpose else self.V.T)]


def _group_sum(x: Tensor, dims: tuple[int, int]) -> Tensor:
    """Sum the four aliases k, k + s/2 along the two frequency axes ``dims`` (full spectrum, s even)."""
    for d in dims:
        half = x.shape[d] // 2
        # two contiguous halves added: about 5x faster than a strided reshape-and-sum on complex tensors
        x = x.narrow(d, 0, half) + x.narrow(d, half, half)
    return x


def tier_kernel(A: Tensor, B: Tensor) -> Tensor:
    """One kernel for the circular part of I - W on a tier, less m I: A^T A - B + B^T.

    cconv_t(cconv(z, A), A) is the circular convolution with the (2k - 1) x (2k - 1) kernel
    K2[c, c', e] = sum_(o, d) A[o, c, d] A[o, c', d + e] (the channel-wise autocorrelation of A, a conv2d of A
    with itself), and cconv_t(z, B) that with B's channel-transposed, flipped kernel.

    Args:
        A, B: the tier's effective kernels [C, C, k, k], k odd.

    Returns:
        [C, C, 2k - 1, 2k - 1], differentiable w.r.t. A and B.
    """
    k1, k2 = A.shape[-2:]
    At = A.transpose(0, 1)
    ata = F.conv2d(At, At, padding=(k1 - 1, k2 - 1)).flip(-2, -1)
    skew = B.transpose(0, 1).flip(-2, -1) - B
    return ata + F.pad(skew, (k2 // 2, k2 // 2, k1 // 2, k1 // 2))


def tier_spectrum(A: Tensor, B: Tensor, grid: tuple[int, int], onesided: bool) -> Tensor:
    """P(k) = A(k)^H A(k) - B(k) + B(k)^H per frequency: the circular part of I - W on one tier, less m I.

    Both V and W come from it: the per-frequency part of I + alpha (I - W) is D = (1 + alpha m) I + alpha P and
    that of W is M = (1 - m) I - P (so M = ((1 + alpha) I - D) / alpha, but forming M from P avoids the
    cancellation of that difference at small alpha). Computed as the spectrum of :func:`tier_kernel` (25 taps
    for 3x3 kernels), about ten times cheaper than a C x C product per frequency. Differentiable w.r.t. the
    kernels.

    Args:
        A, B: the tier's effective kernels [C, C, k, k].
        grid: the tier's grid.
        onesided: half spectrum (``rfft2``) instead of the full one.

    Returns:
        Contiguous complex [F1, F2, C, C].
    """
    return kernel_spectrum(tier_kernel(A, B), grid, onesided)


class TierInverse:
    """Inverse of one diagonal block of I + alpha (I - W) on a circular grid.

    The block is (1 + alpha m) I + alpha P [+ alpha A_n^T A_n], with P from :func:`tier_spectrum` and A_n the
    effective stride-2 kernel.

    Args:
        P: the tier's :func:`tier_spectrum`, half spectrum when ``An`` is None, full spectrum otherwise.
        An: stride-2 kernel [C_next, C, k, k] to the next tier, or None for the last tier.
        grid: the tier's grid (both sizes even when ``An`` is given).
        m: monotonicity parameter.
        alpha: splitting step.
    """

    def __init__(self, P: Tensor, An: Tensor | None, grid: tuple[int, int], m: float, alpha: float) -> None:
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        # contiguous: linalg.inv returns column-major matrices, on which the batched products run slower
        self.Dinv = torch.linalg.inv((1 + alpha * m) * eye + alpha * P).contiguous()
        self.Sinv: Tensor | None = None
        self.coupling: tuple[Tensor, Tensor] | None = None  # (C, C^H): the stride-2 spectra
        if An is not None:
            if grid[0] % 2 or grid[1] % 2:
                raise ValueError(f"a stride-2 coupling needs an even grid, got {grid}")
            Ch = kernel_spectrum(An, grid, onesided=False)
            self.coupling = (Ch, adjoint(Ch))
            eye_n = torch.eye(An.shape[0], dtype=P.dtype, device=P.device)
            # Woodbury capacitance per alias group: (4 / alpha) I + sum_a C(k+a) D(k+a)^-1 C(k+a)^H
            S = _group_sum(Ch @ self.Dinv @ self.coupling[1], dims=(0, 1)) + (4.0 / alpha) * eye_n
            self.Sinv = torch.linalg.inv(S).contiguous()
        self._adjoints: tuple[Tensor, Tensor | None] | None = None  # (Dinv^H, Sinv^H), made at the first V^T

    def _matrices(self, transpose: bool) -> tuple[Tensor, Tensor | None]:
        """(Dinv, Sinv), or their adjoints (kept for the next V^T)."""
        if not transpose:
            return self.Dinv, self.Sinv
        if self._adjoints is None:
            self._adjoints = (adjoint(self.Dinv), None if self.Sinv is None else adjoint(self.Sinv))
        return self._adjoints

    def apply(self, r: Tensor, transpose: bool = False) -> Tensor:
        """Block inverse (or its adjoint) applied to ``r`` [B, C, s1, s2]."""
        Dinv, Sinv = self._matrices(transpose)
        if self.coupling is None or Sinv is None:  # no coupling: half spectrum, one matrix per frequency
            return spectral_apply(Dinv, r)
        Ch, ChH = self.coupling
        w = freq_apply(Dinv, torch.fft.fft2(r))
        t = _group_sum(freq_apply(Ch, w), dims=(2, 3))
        s = freq_apply(Sinv, t).repeat(1, 1, 2, 2)  # back onto every member of its alias group
        w = w - freq_apply(Dinv, freq_apply(ChH, s))
        return torch.fft.ifft2(w).real


class ConvResolvent:
    """V (and V^T) for convolutional tiers, by substitution over tiers.

    Args:
        A, B: per-tier effective kernels.
        An: per-coupling stride-2 kernels (len(A) - 1 of them).
        grids: per-tier grids.
        m: monotonicity parameter.
        alpha: splitting step.
        spectra: per-tier :func:`tier_spectrum` already computed from the same kernels (half spectrum on the
            last tier, full on the others), e.g. by :class:`pcdeq.families.mondeq.operators.FrequencyW`; None: computed
            here.
    """

    def __init__(self, A: Sequence[Tensor], B: Sequence[Tensor], An: Sequence[Tensor],
                 grids: Sequence[tuple[int, int]], m: float, alpha: float,
                 spectra: Sequence[Tensor] | None = None) -> None:
        n = len(A)
        self.alpha = alpha
        self.A, self.An = list(A), list(An)
        if spectra is None:
            spectra = [tier_spectrum(A[i], B[i], grids[i], onesided=i == n - 1) for i in range(n)]
        self.blocks = [
            TierInverse(spectra[i], An[i] if i < n - 1 else None, grids[i], m, alpha) for i in range(n)
        ]

    def apply(self, r: Sequence[Tensor], transpose: bool = False) -> list[Tensor]:
        """V r (or V^T r) for a tiered state."""
        n = len(self.blocks)
        out: dict[int, Tensor] = {}
        # the sub-diagonal block of I + alpha (I - W) is -alpha W_(i+1,i) = 2 alpha A_(i+1)^T A_n(i)
        if not transpose:
            for i in range(n):
                rhs = r[i]
                if i > 0:
                    rhs = rhs - 2 * self.alpha * cconv_t(down(out[i - 1], self.An[i - 1]), self.A[i])
                out[i] = self.blocks[i].apply(rhs)
        else:
            for i in reversed(range(n)):
                rhs = r[i]
                if i < n - 1:
                    rhs = rhs - 2 * self.alpha * down_t(cconv(out[i + 1], self.A[i + 1]), self.An[i])
                out[i] = self.blocks[i].apply(rhs, transpose=True)
        return [out[i] for i in range(n)]
