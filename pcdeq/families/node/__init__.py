"""Neural ODEs and Augmented Neural ODEs (Chen et al. 2018; Dupont, Doucet & Teh 2019) on torchdiffeq.

The third model family, and the one that is no equilibrium network: it has no fixed point and no certificate,
and its solver statistics count function evaluations (NFE forward, BNFE for the adjoint backward) where the
equilibrium families count iterations.

Modules:
    odefunc: the time-dependent convolutional ODE function (with its evaluation counter).
    solve: the torchdiffeq solve (registered as the "ode" solver ``torchdiffeq``), NFE and failure reporting.
    solver_config: the ODE solve's keys (:class:`NodeSolverConfig`, ``solver.ode_*``).
    models: the :class:`NeuralODE` classifier, :func:`build_node` and the family's registry entry (``NODE``).
"""

from .models import NODE, PAPER_SOLVER, NeuralODE, NodeOptions, build_node
from .odefunc import ConvODEFunc
from .solve import solve_ode
from .solver_config import NodeSolverConfig

__all__ = ["NODE", "PAPER_SOLVER", "ConvODEFunc", "NeuralODE", "NodeOptions", "NodeSolverConfig", "build_node",
           "solve_ode"]
