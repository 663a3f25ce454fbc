"""The convolutional ODE function of the Augmented Neural ODEs image experiments (Dupont et al., 2019).

f(t, x) = conv3([t, relu(conv2([t, relu(conv1([t, x]))]))]): three convolutions (1x1, 3x3, 1x1), each seeing the
time t as one extra input channel in front of its input (the paper's ``time_dependent`` convolutions).
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def with_time(t: Tensor, x: Tensor) -> Tensor:
    """``x`` [B, C, H, W] with a constant plane of value ``t`` concatenated in front: [B, C + 1, H, W]."""
    plane = torch.ones_like(x[:, :1]) * t.to(x.dtype)
    return torch.cat([plane, x], dim=1)


class ConvODEFunc(nn.Module):
    """dx/dt = f(t, x) on states of ``state_channels`` channels, with ``filters`` hidden channels.

    ``evaluations`` counts the calls (the number of function evaluations, NFE); the model reads it around each
    solve. Parameters: (C+1)F + F, (F+1)9F + F, (F+1)C + C for C = ``state_channels``, F = ``filters``.
    """

    def __init__(self, state_channels: int, filters: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(state_channels + 1, filters, kernel_size=1)
        self.conv2 = nn.Conv2d(filters + 1, filters, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(filters + 1, state_channels, kernel_size=1)
        self.evaluations = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.evaluations += 1
        h = torch.relu(self.conv1(with_time(t, x)))
        h = torch.relu(self.conv2(with_time(t, h)))
        return self.conv3(with_time(t, h))
