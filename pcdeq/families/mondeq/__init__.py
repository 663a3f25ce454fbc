"""Monotone operator equilibrium networks (monDEQ, Winston & Kolter 2020), written anew for current PyTorch.

Modules:
    circular: circular convolutions on a grid and their DFT diagonalisation.
    operators: the monotone parameterisations of W (dense; convolutional tiers = single conv / multi-tier), and
        W of the convolutional ones applied per frequency (FrequencyW).
    resolvents: V = (I + alpha (I - W))^-1 (dense inverse; FFT per frequency, Woodbury for stride-2 coupling).
    splitting: Peaceman-Rachford and forward-backward solvers, implicit backward, alpha tuning.
    solver_config: monDEQ's solver keys (:class:`MondeqSolverConfig`: alpha, bwd_bias, mondeq_w).
    models: the :class:`MonDEQ` model, :func:`build_mondeq` and the family's registry entry (``MONDEQ``).
"""

from .models import MONDEQ, PAPER_SOLVER, MonDEQ, build_mondeq
from .operators import ConvTiersMonotone, DenseMonotone, FrequencyW
from .resolvents import ConvResolvent, DenseResolvent, TierInverse
from .solver_config import MondeqSolverConfig
from .splitting import SplittingProblem, forward_backward, peaceman_rachford, tune_alpha

__all__ = [
    "MONDEQ",
    "PAPER_SOLVER",
    "MonDEQ",
    "MondeqSolverConfig",
    "build_mondeq",
    "ConvTiersMonotone",
    "DenseMonotone",
    "FrequencyW",
    "ConvResolvent",
    "DenseResolvent",
    "TierInverse",
    "SplittingProblem",
    "forward_backward",
    "peaceman_rachford",
    "tune_alpha",
]
