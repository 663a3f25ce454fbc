"""Monotone operator equilibrium networks (monDEQ, Winston & Kolter 2020), written anew for current PyTorch.

Modules:
    circular: circular convolutions on a grid and their DFT diagonalisation.
    operators: the monotone parameterisations of W (dense; convolutional tiers = single conv / multi-tier).
    resolvents: V = (I + alpha (I - W))^-1 (dense inverse; FFT per frequency, Woodbury for stride-2 coupling).
    splitting: Peaceman-Rachford and forward-backward solvers, implicit backward, alpha tuning.
    models: the :class:`MonDEQ` model and :func:`build_mondeq`.
"""

from .models import ARCHS, DEFAULT_CHANNELS, MonDEQ, build_mondeq, paper_channels
from .operators import ConvTiersMonotone, DenseMonotone
from .resolvents import ConvResolvent, DenseResolvent, TierInverse
from .splitting import (
    SPLITTING_SOLVERS,
    SplittingProblem,
    forward_backward,
    get_splitting_solver,
    peaceman_rachford,
    tune_alpha,
)

__all__ = [
    "ARCHS",
    "DEFAULT_CHANNELS",
    "MonDEQ",
    "build_mondeq",
    "paper_channels",
    "ConvTiersMonotone",
    "DenseMonotone",
    "ConvResolvent",
    "DenseResolvent",
    "TierInverse",
    "SPLITTING_SOLVERS",
    "SplittingProblem",
    "forward_backward",
    "get_splitting_solver",
    "peaceman_rachford",
    "tune_alpha",
]
