"""Circular convolutions on a fixed grid: spatial application and their DFT diagonalisation.

All convolutions inside a convolutional monDEQ operator are circular on the hidden-state grid, so that the
2-D DFT diagonalises them (one small channel matrix per frequency). The image is zero-padded by one pixel and
the nonlinearity zeroes a one-pixel border of the state, which makes the circular wrap-around harmless.

Conventions: ``cconv(z, K)`` is PyTorch's cross-correlation
``y[o, p] = sum_{c, d} K[o, c, d + r] z[c, p + d]`` (indices mod the grid, ``r`` the kernel radius).
The stride-2 operator ``down`` keeps the even positions of a circular convolution on an even grid of size
``s`` and appends one zero row and column, giving the next tier's grid ``s / 2 + 1`` (that tier's zero
border sits at index 0 and at the appended index).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _circ_pad(z: Tensor, K: Tensor) -> Tensor:
    r1, r2 = K.shape[-2] // 2, K.shape[-1] // 2
    return F.pad(z, (r2, r2, r1, r1), mode="circular")


def cconv(z: Tensor, K: Tensor) -> Tensor:
    """Circular 'same' convolution (cross-correlation) of ``z`` with an odd-sized kernel.

    Args:
        z: input [B, C_in, H, W].
        K: kernel [C_out, C_in, k, k], k odd.

    Returns:
        [B, C_out, H, W].
    """
    return F.conv2d(_circ_pad(z, K), K)


def cconv_t(y: Tensor, K: Tensor) -> Tensor:
    """Adjoint of :func:`cconv`: circular convolution with the flipped, channel-transposed kernel.

    Args:
        y: input [B, C_out, H, W].
        K: the kernel of the forward convolution [C_out, C_in, k, k].

    Returns:
        [B, C_in, H, W].
    """
    return F.conv2d(_circ_pad(y, K), K.transpose(0, 1).flip(-2, -1))


def down(z: Tensor, K: Tensor) -> Tensor:
    """Stride-2 circular convolution onto the next tier's grid.

    Args:
        z: input on an even grid [B, C_in, s1, s2].
        K: kernel [C_out, C_in, k, k].

    Returns:
        [B, C_out, s1 / 2 + 1, s2 / 2 + 1]: the circular convolution sampled at even positions, followed by
        one zero row and column (the next tier's border).
    """
    y = F.conv2d(_circ_pad(z, K), K, stride=2)
    return F.pad(y, (0, 1, 0, 1))


def down_t(y: Tensor, K: Tensor) -> Tensor:
    """Adjoint of :func:`down`.

    Args:
        y: input on the coarse grid [B, C_out, h1 + 1, h2 + 1].
        K: the kernel of the forward operator [C_out, C_in, k, k].

    Returns:
        [B, C_in, 2 h1, 2 h2].
    """
    h1, h2 = y.shape[-2] - 1, y.shape[-1] - 1
    # drop the appended row/column, then re-insert the samples at even positions (zeros elsewhere)
    up = y.new_zeros(*y.shape[:2], 2 * h1, 2 * h2)
    up[..., ::2, ::2] = y[..., :h1, :h2]
    return cconv_t(up, K)


def _tap_phases(n_freq: int, size: int, taps: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """exp(+2 pi i k d / size) for frequencies k < n_freq and offsets d = -r..r of a ``taps``-tap kernel.

    Angles are formed in float64 (k d taken mod ``size`` first), then cast to ``dtype``; [n_freq, taps].
    """
    r = taps // 2
    k = torch.arange(n_freq, dtype=torch.float64, device=device)[:, None]
    d = torch.arange(-r, r + 1, dtype=torch.float64, device=device)[None, :]
    return torch.exp(1j * torch.remainder(k * d, size) * (2 * math.pi / size)).to(dtype)


def kernel_spectrum(K: Tensor, grid: tuple[int, int], onesided: bool) -> Tensor:
    """Per-frequency channel matrices of the circular convolution ``cconv(., K)`` on ``grid``.

    ``cconv`` multiplies the (unnormalised) DFT of its input by ``sum_d K[:, :, d + r] exp(+2 pi i k.d / s)``
    (conv2d is a cross-correlation). That sum is evaluated directly over the k x k taps (a separable DFT of the
    small kernel), not by an FFT of the kernel zero-padded to the grid: with 3x3 kernels it costs a few
    multiply-adds per matrix entry and frequency instead of a grid-sized FFT per channel pair.

    Args:
        K: kernel [C_out, C_in, k1, k2], k1 and k2 odd (a kernel wider than the grid wraps around it, as the
            composition of circular convolutions does).
        grid: spatial size (s1, s2).
        onesided: half spectrum (``rfft2``, s2 // 2 + 1 columns) instead of the full one.

    Returns:
        Complex tensor [F1, F2, C_out, C_in] (complex dtype follows K's real dtype), contiguous: batched
        matrix products over the frequencies run several times slower on a permuted view. Differentiable
        w.r.t. ``K``.
    """
    k1, k2 = K.shape[-2:]
    if not (k1 % 2 and k2 % 2):
        raise ValueError(f"kernel {k1}x{k2} must have odd sizes")
    cdtype = (K.new_zeros(()) * 1j).dtype  # the complex dtype of K's precision
    f2 = grid[1] // 2 + 1 if onesided else grid[1]
    E1 = _tap_phases(grid[0], grid[0], k1, cdtype, K.device)  # [F1, k1]
    E2 = _tap_phases(f2, grid[1], k2, cdtype, K.device)  # [F2, k2]
    return torch.einsum("xa,yb,ocab->xyoc", E1, E2, K.to(cdtype)).contiguous()


def freq_apply(M: Tensor, zhat: Tensor) -> Tensor:
    """Multiply every frequency of a spectrum by its own channel matrix.

    One batched matrix product over the frequencies ([F, C_out, C_in] @ [F, C_in, B]). A spectrum laid out
    [B, C_in, F] (an FFT's output) is first moved to [F, B, C_in] by one 2-D transpose of [B C_in, F], which
    PyTorch copies blockwise: on the strided view of a permute, CPU ``bmm`` falls back to one small copy per
    frequency, and a strided copy to [F, C_in, B] is about twice as slow. A spectrum already laid out
    [F, C_in, B] (the output of this function) is used as it is.

    Args:
        M: [F1, F2, C_out, C_in] matrices (contiguous, and not a conjugate view, to spare a copy per call; see
            :func:`adjoint`).
        zhat: spectrum [B, C_in, F1, F2].

    Returns:
        [B, C_out, F1, F2].
    """
    f1, f2, c_out, c_in = M.shape
    b = zhat.shape[0]
    zf = zhat.permute(2, 3, 1, 0).reshape(f1 * f2, c_in, b)
    if not zf.is_contiguous():
        zf = zhat.reshape(b * c_in, f1 * f2).t().contiguous().view(f1 * f2, b, c_in).transpose(1, 2)
    out = torch.bmm(M.reshape(f1 * f2, c_out, c_in), zf)
    return out.reshape(f1, f2, c_out, b).permute(3, 2, 0, 1)


def adjoint(M: Tensor) -> Tensor:
    """M(k)^H for every frequency of [F1, F2, C_out, C_in] matrices, contiguous and conjugated in memory.

    Applying the adjoint of a circular operator multiplies by these; keep the result when it is applied more
    than once (a conjugate-transposed view is copied again by every batched product).
    """
    return M.mH.contiguous()


def spectral_apply(M: Tensor, z: Tensor) -> Tensor:
    """Apply a circular operator given by its half-spectrum channel matrices: ``irfft2(M(k) rfft2(z)(k))``.

    Args:
        M: [F1, F2, C_out, C_in] matrices on the half spectrum of ``z``'s grid (``onesided=True``); for the
            adjoint pass :func:`adjoint` of them.
        z: real input [B, C_in, s1, s2].

    Returns:
        Real [B, C_out, s1, s2].
    """
    return torch.fft.irfft2(freq_apply(M, torch.fft.rfft2(z)), s=z.shape[-2:])
