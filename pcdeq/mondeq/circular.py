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


def kernel_spectrum(K: Tensor, grid: tuple[int, int], onesided: bool) -> Tensor:
    """Per-frequency channel matrices of the circular convolution ``cconv(., K)`` on ``grid``.

    ``cconv`` multiplies the (unnormalised) DFT of its input by ``sum_d K[:, :, d + r] exp(+2 pi i k.d / s)``,
    which is the DFT of the kernel flipped (conv2d is a cross-correlation), zero-padded to the grid and rolled
    so that its centre tap sits at index 0.

    Args:
        K: kernel [C_out, C_in, k, k] with k odd and k <= grid.
        grid: spatial size (s1, s2).
        onesided: half spectrum (``rfft2``, s2 // 2 + 1 columns) instead of the full one.

    Returns:
        Complex tensor [F1, F2, C_out, C_in] (complex dtype follows K's real dtype).
    """
    k1, k2 = K.shape[-2:]
    if k1 > grid[0] or k2 > grid[1]:
        raise ValueError(f"kernel {k1}x{k2} does not fit the grid {grid}")
    img = K.new_zeros(*K.shape[:2], *grid)
    img[..., :k1, :k2] = K.flip(-2, -1)
    img = torch.roll(img, shifts=(-(k1 // 2), -(k2 // 2)), dims=(-2, -1))
    spec = torch.fft.rfft2(img) if onesided else torch.fft.fft2(img)
    return spec.permute(2, 3, 0, 1)


def freq_apply(M: Tensor, zhat: Tensor) -> Tensor:
    """Multiply every frequency of a spectrum by its own channel matrix.

    Args:
        M: [F1, F2, C_out, C_in] matrices.
        zhat: spectrum [B, C_in, F1, F2].

    Returns:
        [B, C_out, F1, F2].
    """
    return torch.einsum("xyoc,bcxy->boxy", M, zhat)
