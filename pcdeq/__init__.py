"""pcdeq: positive concave deep equilibrium models (pcDEQ) and the implicit models they are compared with.

Public API::

    import pcdeq
    net = pcdeq.build_model("conv", "cifar10", activation="tanh")   # the paper's CIFAR-10 single-conv pcDEQ-1
"""

from pcdeq.activations import ACTIVATIONS, get_activation, register_activation
from pcdeq.certificate import collatz_wielandt_bound, convergence_certificate
from pcdeq.layer import NonnegWeight, PcDEQLayer
from pcdeq.models import PAPER_SIZES, PcDEQNet, build_model, build_network
from pcdeq.solvers import SOLVERS, SolverConfig, SolverStats, collect_stats, get_solver, register_solver

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "PAPER_SIZES",
    "SOLVERS",
    "NonnegWeight",
    "PcDEQLayer",
    "PcDEQNet",
    "SolverConfig",
    "SolverStats",
    "build_model",
    "build_network",
    "collatz_wielandt_bound",
    "collect_stats",
    "convergence_certificate",
    "get_activation",
    "get_solver",
    "register_activation",
    "register_solver",
]
