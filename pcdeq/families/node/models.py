"""Neural ODE (NODE) and Augmented Neural ODE (ANODE) image classifiers and the family's registry entry.

The convolutional models of Dupont, Doucet & Teh (NeurIPS 2019): the image (with ``augment_dim`` zero channels
appended, ANODE) is the initial state, :class:`~.odefunc.ConvODEFunc` is integrated from t = 0 to 1, and one
linear layer on the flattened final state gives the logits. No pooling, no other layer.

Sizes (filters F, augmented channels A) and parameter counts (checked in tests/test_node.py):

============  =======================  ==========================
dataset       conv (NODE): F           aug_conv (ANODE): F, A
============  =======================  ==========================
mnist         92 -> 85,316             64, 5 -> 85,462
svhn/cifar10  125 -> 173,611           64, 10 -> 172,452
digits        16 (ours)                8, 2 (ours)
============  =======================  ==========================

MNIST: the authors' config (config_img.json). 32x32: the widths that give the published 172K with this
architecture (an inference: the authors' config file does not list them); cifar10_aug takes them too (ours: the
published augmented runs used about 1M parameters, architecture unpublished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pcdeq.dataset_specs import get_spec
from pcdeq.errors import ConfigError
from pcdeq.family import Family, register_family
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.stats import SolverStats, collect_stats

from .odefunc import ConvODEFunc
from .solve import solve_ode
from .solver_config import NodeSolverConfig

Tensor = torch.Tensor

ARCHS = ("conv", "aug_conv")
PAPER_SIZES: dict[str, dict[str, int | tuple[int, ...]]] = {
    "conv": {"digits": 16, "mnist": 92, "svhn": 125, "cifar10": 125, "cifar10_aug": 125},
    "aug_conv": {"digits": 8, "mnist": 64, "svhn": 64, "cifar10": 64, "cifar10_aug": 64},
}
PAPER_AUGMENT = {"digits": 2, "mnist": 5, "svhn": 10, "cifar10": 10, "cifar10_aug": 10}

# The ANODE paper's solver: dopri5, rtol = atol = 1e-3, at most 1000 steps, gradients by the adjoint method.
PAPER_SOLVER = NodeSolverConfig(fwd_solver="torchdiffeq", bwd_solver="torchdiffeq", ode_method="dopri5",
                                ode_rtol=1e-3, ode_atol=1e-3, ode_adjoint=True, ode_max_num_steps=1000)


@dataclass
class NodeOptions:
    """Neural ODE model options (``model.*`` besides family, arch, name and channels).

    Attributes:
        augment_dim: zero channels appended to the image (ANODE); None: the paper's for the dataset with
            ``arch=aug_conv`` (MNIST 5, 32x32 images 10), 0 with ``arch=conv``.
    """

    augment_dim: int | None = None


class NeuralODE(nn.Module):
    """logits = Linear(flatten(y(1))), dy/dt = f(t, y), y(0) = [x, 0_A]. Implements
    :class:`pcdeq.family.EquilibriumNet` for a model without a fixed point.

    Solver statistics: ``last_stats["forward"]`` / ``["backward"]`` hold the last forward solve and the last
    adjoint solve (:mod:`.solve`); their ``iters`` is the number of function evaluations, so the training loop's
    ``fwd_iters`` / ``bwd_iters`` figures are NFE and BNFE. Without the adjoint (``solver.ode_adjoint=false``) the
    backward evaluates no f and has no statistics.

    Args:
        input_shape: (C, H, W) of the images.
        num_classes: outputs of the linear head.
        filters: hidden channels F of the ODE function.
        augment_dim: appended zero channels A (0: NODE).
        solver: the ``ode_*`` settings (a plain :class:`~pcdeq.solver.config.SolverConfig` takes their defaults).
    """

    family = "node"

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, filters: int, augment_dim: int,
                 solver: SolverConfig = PAPER_SOLVER) -> None:
        super().__init__()
        NODE.check_solver(solver)
        c, h, w = input_shape
        self.input_shape = tuple(input_shape)
        self.augment_dim = augment_dim
        self.func = ConvODEFunc(c + augment_dim, filters)
        self.head = nn.Linear((c + augment_dim) * h * w, num_classes)
        self.solver = NodeSolverConfig.of(solver)
        self.last_stats: dict[str, SolverStats | None] = {"forward": None, "backward": None}

    def _record(self, direction: str, stats: SolverStats) -> None:
        self.last_stats[direction] = stats

    def initial_state(self, x: Tensor) -> Tensor:
        """y(0): the images with ``augment_dim`` zero channels appended."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected input of shape [B, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(x.shape)}")
        if not self.augment_dim:
            return x
        zeros = x.new_zeros(x.shape[0], self.augment_dim, *x.shape[2:])
        return torch.cat([x, zeros], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images ``x`` [B, C, H, W]."""
        y1 = solve_ode(self.func, self.initial_state(x), self.solver, self._record)
        return self.head(y1.flatten(1))

    def solver_stats(self) -> dict[str, dict[str, float]]:
        """NFE of the last forward and adjoint solves (``iters``), failures in ``n_not_converged``."""
        return collect_stats(self)

    def project_(self) -> None:
        """Nothing to project: the parameters are unconstrained."""

    def on_train_batch_start(self, x: Tensor, batch_idx: int, num_batches: int) -> None:
        """Nothing to do per batch."""

    def epoch_metrics(self) -> dict[str, float]:
        """None besides the common figures."""
        return {}

    def residual_history(self) -> list[list[float]]:
        """Empty: an ODE solve has no fixed-point residual."""
        return []

    def certificate(self) -> dict[str, float]:
        """None: there is no fixed point to certify."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Activation (relu), variant (node / anode) and the ODE method, for results.json."""
        return {"activation": "relu", "variant": "anode" if self.augment_dim else "node",
                "solver": self.solver.ode_method}


def _augment(arch: str, dataset: str, augment_dim: Any) -> int:
    if arch == "conv":
        if augment_dim not in (None, 0):
            raise ConfigError(f"model.augment_dim={augment_dim}: the plain Neural ODE has no augmented channels; "
                              "use model=node_aug_conv for an augmented one")
        return 0
    if augment_dim is None:
        return PAPER_AUGMENT.get(dataset, PAPER_AUGMENT["mnist"])
    if isinstance(augment_dim, bool) or not isinstance(augment_dim, int) or augment_dim < 1:
        raise ConfigError(f"model.augment_dim={augment_dim}: out of range; valid: an integer >= 1 (or null for "
                          f"the paper's), e.g. model.augment_dim={PAPER_AUGMENT.get(dataset, 5)}")
    return augment_dim


def build_node(arch: str, dataset: str, *, channels: Any = None, augment_dim: int | None = None,
               solver: SolverConfig | None = None) -> NeuralODE:
    """Build a NODE (``arch="conv"``) or ANODE (``"aug_conv"``) with the paper's sizes for ``dataset``.

    Args:
        arch: "conv" or "aug_conv".
        dataset: a name from :data:`pcdeq.dataset_specs.DATASET_SPECS` (gives input shape and classes).
        channels: filters F of the ODE function; None for the sizes above.
        augment_dim: appended zero channels (aug_conv; None: the paper's for the dataset).
        solver: the ODE settings (default :data:`PAPER_SOLVER`).

    Returns:
        A :class:`NeuralODE` mapping images [B, C, H, W] to logits [B, classes].
    """
    NODE.check_arch(arch)
    spec = get_spec(dataset)
    filters = NODE.paper_size(arch, dataset) if channels is None else channels
    if isinstance(filters, (list, tuple)) and len(filters) == 1:
        filters = filters[0]
    if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
        raise ConfigError(f"model.channels={filters}: the Neural ODE takes one filter count, an integer >= 1 "
                          f"(e.g. model.channels={PAPER_SIZES[arch]['mnist']})")
    return NeuralODE(spec.shape, spec.num_classes, filters, _augment(arch, dataset, augment_dim),
                     solver=solver if solver is not None else PAPER_SOLVER)


NODE = register_family(Family(
    name="node",
    archs=ARCHS,
    sizes=PAPER_SIZES,
    default_sizes={arch: sizes["mnist"] for arch, sizes in PAPER_SIZES.items()},
    build=build_node,
    solver_kind="ode",
    default_solver=PAPER_SOLVER,
    protocols={arch: "node" for arch in ARCHS},
    options=NodeOptions,
))
