"""Positive concave deep equilibrium models (pcDEQ): the family the project is named after.

Modules:
    layer: the equilibrium layer :class:`PcDEQLayer` (nonnegative W, concave activation) and its implicit backward.
    certificate: the Collatz-Wielandt convergence certificate of a layer's fixed point.
    solver_config: pcDEQ's solver keys, the layer's speed switches (:class:`PcdeqSolverConfig`).
    models: the :class:`PcDEQNet` networks, :func:`build_model` and the family's registry entry (``PCDEQ``).
"""

from .certificate import collatz_wielandt_bound, convergence_certificate
from .layer import NonnegWeight, PcDEQLayer
from .models import PAPER_SIZES, PCDEQ, PcDEQNet, PcdeqOptions, build_model, build_network
from .solver_config import PcdeqSolverConfig

__all__ = [
    "PAPER_SIZES",
    "PCDEQ",
    "NonnegWeight",
    "PcDEQLayer",
    "PcDEQNet",
    "PcdeqOptions",
    "PcdeqSolverConfig",
    "build_model",
    "build_network",
    "collatz_wielandt_bound",
    "convergence_certificate",
]
