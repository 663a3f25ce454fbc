"""Positive concave deep equilibrium models (pcDEQ): the family the project is named after.

Modules:
    layer: the equilibrium layer :class:`PcDEQLayer` (nonnegative W, concave activation) and its implicit backward.
    certificate: the Collatz-Wielandt convergence certificate of a layer's fixed point.
    models: the :class:`PcDEQNet` networks, :func:`build_model` and the family's registry entry (``PCDEQ``).
"""

from .certificate import collatz_wielandt_bound, convergence_certificate
from .layer import NonnegWeight, PcDEQLayer
from .models import PAPER_SIZES, PCDEQ, PcDEQNet, PcdeqOptions, build_model, build_network

__all__ = [
    "PAPER_SIZES",
    "PCDEQ",
    "NonnegWeight",
    "PcDEQLayer",
    "PcDEQNet",
    "PcdeqOptions",
    "build_model",
    "build_network",
    "collatz_wielandt_bound",
    "convergence_certificate",
]
