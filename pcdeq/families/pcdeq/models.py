"""The pcDEQ family: one builder for the reference's networks (linear, single conv, multi conv) and its registry entry.

Layer order (P = the variant's injection, applied inside each :class:`PcDEQLayer`; BN = batch norm):

* linear:    flatten -> Linear(d, ch) -> BN1d -> [P -> block(dense ch)] -> BN1d -> Linear(ch, classes)
* conv:      Conv3x3(in, ch, pad 1) -> BN -> [P -> block(conv ch)] -> MaxPool(3, 1, 1) -> BN -> AvgPool(k)
             -> flatten -> Linear(ch * (side // k)^2, classes), k = min(8, side)
* multiconv: three stages, stage i = Conv3x3(prev, c_i; stride 1 pad 1 for i = 1, stride 2 no pad after)
             -> BN -> [P -> block(conv c_i)] -> MaxPool(3, 1, 1) -> BN; then AvgPool(k), k = min(4, side)
             -> flatten -> Linear, i.e. three separate fixed points in sequence.

The pooling sizes are the reference's (8 and 4) whenever the feature map is at least that large, so the paper's
networks come out exactly; smaller inputs (digits, 8x8) pool over the whole map instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pcdeq.activations import get_activation
from pcdeq.dataset_specs import get_spec
from pcdeq.errors import ConfigError
from pcdeq.families.pcdeq.certificate import convergence_certificate
from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.family import Family, register_family
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.stats import collect_stats, residual_histories

from .solver_config import PcdeqSolverConfig

ARCHS = ("linear", "conv", "multiconv")

# The paper's sizes (reference implementation); "digits" and the pairs marked "ours" are this project's choices
# for datasets the paper does not pair with that architecture.
PAPER_SIZES: dict[str, dict[str, int | tuple[int, ...]]] = {
    "linear": {"mnist": 80, "digits": 64},
    "conv": {"mnist": 82, "svhn": 125, "cifar10": 125, "digits": 32},
    "multiconv": {
        "mnist": (12, 24, 48),
        "svhn": (20, 50, 80),
        "cifar10": (20, 50, 80),
        "cifar10_aug": (100, 120, 140),
        "digits": (16, 32, 48),
    },
}
DEFAULT_SIZES: dict[str, int | tuple[int, ...]] = {"linear": 80, "conv": 125, "multiconv": (20, 50, 80)}  # ours


@dataclass
class PcdeqOptions:
    """pcDEQ model options (``model.*`` besides family, arch, name and channels).

    Attributes:
        activation: "tanh", "softsign", "relu6" (pcDEQ-1), "sigmoid" (pcDEQ-2) or a registered one.
        variant: optional check that the activation belongs to "pcdeq1" or "pcdeq2".
        channels_last: store the convolutional networks' weights, and so their activations, channels-last
            (NHWC): on CPUs oneDNN's 3x3 convolutions run about 1.3x faster that way. No effect on linear nets.
    """

    activation: str = "tanh"
    variant: str | None = None
    channels_last: bool = True


class PcDEQNet(nn.Sequential):
    """A feed-forward stack holding one or more pcDEQ layers; implements :class:`pcdeq.family.EquilibriumNet`."""

    family = "pcdeq"

    def deq_layers(self) -> list[PcDEQLayer]:
        """The pcDEQ layers, in order."""
        return [m for m in self.modules() if isinstance(m, PcDEQLayer)]

    def project_(self) -> None:
        """Project every pcDEQ weight onto the nonnegative orthant (after each optimizer step)."""
        for layer in self.deq_layers():
            layer.project_()

    def solver_stats(self) -> dict[str, dict[str, float]]:
        """Forward/backward statistics of the last solves, summarised over the layers."""
        return collect_stats(self)

    def on_train_batch_start(self, x: torch.Tensor, batch_idx: int, num_batches: int) -> None:
        """Nothing to do before a pcDEQ training step."""

    def epoch_metrics(self) -> dict[str, float]:
        """No per-epoch state beyond the solver statistics."""
        return {}

    def residual_history(self) -> list[list[float]]:
        """Forward residual history of each pcDEQ layer's last solve."""
        return residual_histories(self)

    def certificate(self) -> dict[str, float]:
        """The Collatz-Wielandt certificate of the last forward pass (see :mod:`pcdeq.families.pcdeq.certificate`)."""
        return convergence_certificate(self)

    def describe(self) -> dict[str, Any]:
        """Activation, variant and forward solver, for results.json."""
        layer = self.deq_layers()[0]
        return {"activation": layer.act.name, "variant": layer.act.variant, "solver": layer.solver.fwd_solver}


def _conv_out(side: int, stride: int, pad: int) -> int:
    return (side + 2 * pad - 3) // stride + 1


def build_network(
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    channels: int | Sequence[int],
    activation: str = "tanh",
    variant: str | None = None,
    solver: SolverConfig | None = None,
    channels_last: bool = True,
) -> PcDEQNet:
    """Build a pcDEQ network for any input shape and channel sizes.

    Args:
        arch: "linear", "conv" or "multiconv".
        input_shape: (C, H, W) of one input.
        num_classes: output size.
        channels: hidden width (int) for linear/conv, three channel counts for multiconv.
        activation: registered activation name.
        variant: optional "pcdeq1"/"pcdeq2"; checked against the activation.
        solver: solver settings shared by every pcDEQ layer.
        channels_last: convolutional networks keep their weights (and so activations) channels-last.

    Returns:
        The network (a :class:`PcDEQNet`).
    """
    act = get_activation(activation, variant)
    solver = PcdeqSolverConfig.of(solver or PcdeqSolverConfig())
    c_in, side = int(input_shape[0]), int(input_shape[-1])
    PCDEQ.check_arch(arch)
    if arch == "multiconv":
        chs = tuple(int(c) for c in (channels if isinstance(channels, Sequence) else [channels]))
        if len(chs) != 3:
            raise ConfigError(f"multiconv needs three channel counts, got {channels!r}")
    else:
        if isinstance(channels, Sequence):
            raise ConfigError(f"{arch} needs one channel count, got {channels!r}")
        chs = (int(channels),)
    if min(chs) < 1:
        raise ConfigError(f"channel counts must be >= 1, got {chs}")

    if arch == "linear":
        ch = chs[0]
        return PcDEQNet(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), ch),
            nn.BatchNorm1d(ch),
            PcDEQLayer(ch, "dense", act, solver=solver),
            nn.BatchNorm1d(ch),
            nn.Linear(ch, num_classes),
        )

    layers: list[nn.Module] = []
    prev = c_in
    for i, ch in enumerate(chs):
        stride, pad = (1, 1) if i == 0 else (2, 0)
        side = _conv_out(side, stride, pad)
        if side < 1:
            raise ConfigError(f"input side {input_shape[-1]} is too small for {arch}")
        layers += [
            nn.Conv2d(prev, ch, 3, stride=stride, padding=pad),
            nn.BatchNorm2d(ch),
            PcDEQLayer(ch, "conv", act, solver=solver),
            nn.MaxPool2d(3, stride=1, padding=1),
            nn.BatchNorm2d(ch),
        ]
        prev = ch
    pool = min(8 if arch == "conv" else 4, side)
    layers += [nn.AvgPool2d(pool), nn.Flatten(), nn.Linear(prev * (side // pool) ** 2, num_classes)]
    net = PcDEQNet(*layers)
    # a convolution with a channels-last weight gives a channels-last output, so the whole stack follows
    return net.to(memory_format=torch.channels_last) if channels_last else net


def build_model(
    arch: str,
    dataset: str,
    activation: str = "tanh",
    *,
    channels: int | Sequence[int] | None = None,
    variant: str | None = None,
    solver: SolverConfig | None = None,
    channels_last: bool = True,
) -> PcDEQNet:
    """The paper's pcDEQ network for a dataset by name.

    Args:
        arch: "linear", "conv" or "multiconv".
        dataset: "mnist", "svhn", "cifar10", "cifar10_aug" or "digits".
        activation: "tanh", "softsign", "relu6" (pcDEQ-1), "sigmoid" (pcDEQ-2) or a registered one.
        channels: override the paper's size.
        variant: optional check of the activation's variant.
        solver: solver settings (default: plain iteration, tol 1e-4, 200 iterations, whole-batch residual).
        channels_last: convolutional networks run channels-last (see :class:`PcdeqOptions`).

    Returns:
        The network; e.g. ``build_model("linear", "mnist")`` has 70,410 parameters.
    """
    spec = get_spec(dataset)
    size = PCDEQ.paper_size(arch, dataset) if channels is None else channels
    return build_network(arch, spec.shape, spec.num_classes, size, activation, variant, solver, channels_last)


PCDEQ = register_family(Family(
    name="pcdeq",
    archs=ARCHS,
    sizes=PAPER_SIZES,
    default_sizes=DEFAULT_SIZES,
    build=build_model,
    solver_kind="map",
    default_solver=PcdeqSolverConfig(),
    protocols={arch: "pcdeq" for arch in ARCHS},
    options=PcdeqOptions,
))
