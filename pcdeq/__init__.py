"""pcdeq: positive concave deep equilibrium models (pcDEQ) and the implicit models they are compared with.

The model API imports with torch alone (no Lightning, Hydra or torchvision); the training stack lives in
:mod:`pcdeq.training`, which the entry points ``train.py`` and ``eval.py`` import.

Public API::

    import pcdeq
    net = pcdeq.build_model("conv", "cifar10", activation="tanh")   # the paper's CIFAR-10 single-conv pcDEQ-1
    base = pcdeq.build_net("mondeq", "conv", "cifar10")             # any registered family by name
"""

from pcdeq.activations import ACTIVATIONS, get_activation, register_activation
from pcdeq.dataset_specs import DATASET_SPECS, DatasetSpec, get_spec
from pcdeq.errors import CheckpointError, ConfigError, DataError, DataNotFoundError, OutputError, PcdeqUserError
from pcdeq.families.mondeq import MonDEQ, MondeqSolverConfig, build_mondeq
from pcdeq.families.node import NeuralODE, NodeSolverConfig, build_node
from pcdeq.families.pcdeq.certificate import collatz_wielandt_bound, convergence_certificate
from pcdeq.families.pcdeq.layer import NonnegWeight, PcDEQLayer
from pcdeq.families.pcdeq.models import PAPER_SIZES, PcDEQNet, build_model, build_network
from pcdeq.families.pcdeq.solver_config import PcdeqSolverConfig
from pcdeq.family import FAMILIES, EquilibriumNet, Family, build_net, get_family, register_family
from pcdeq.solver import SOLVERS, get_solver, register_solver
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.stats import SolverStats, collect_stats

__version__ = "0.2.0"

__all__ = [
    "ACTIVATIONS",
    "DATASET_SPECS",
    "FAMILIES",
    "PAPER_SIZES",
    "SOLVERS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "DatasetSpec",
    "EquilibriumNet",
    "Family",
    "MonDEQ",
    "MondeqSolverConfig",
    "NeuralODE",
    "NodeSolverConfig",
    "NonnegWeight",
    "OutputError",
    "PcDEQLayer",
    "PcDEQNet",
    "PcdeqSolverConfig",
    "PcdeqUserError",
    "SolverConfig",
    "SolverStats",
    "build_model",
    "build_mondeq",
    "build_node",
    "build_net",
    "build_network",
    "collatz_wielandt_bound",
    "collect_stats",
    "convergence_certificate",
    "get_activation",
    "get_family",
    "get_solver",
    "get_spec",
    "register_activation",
    "register_family",
    "register_solver",
]
