"""Model builders, projection after optimiser steps, and bad-input messages.

Oracles: the parameter counts and layer order of the reference implementation (shared/reference/pcdeq.md),
spatial sizes from the convolution arithmetic, and the activations' definitions (monotone, concave).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pcdeq.activations import ACTIVATIONS, get_activation, register_activation
from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.families.pcdeq.models import PAPER_SIZES, build_model, build_network
from pcdeq.family import get_family

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the paper's architectures


PAPER_COUNTS = [
    ("linear", "mnist", 70_410),
    ("conv", "mnist", 69_136),
    ("multiconv", "mnist", 41_278),
    ("conv", "svhn", 164_760),
    ("conv", "cifar10", 164_760),
    ("multiconv", "svhn", 130_950),
    ("multiconv", "cifar10", 130_950),
    ("multiconv", "cifar10_aug", 661_470),
]


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])  # pcDEQ-1 and pcDEQ-2
@pytest.mark.parametrize("arch,dataset,expected", PAPER_COUNTS)
def test_paper_parameter_counts(arch: str, dataset: str, expected: int, activation: str) -> None:
    assert _n_params(build_model(arch, dataset, activation)) == expected


def test_linear_parameter_count_by_hand() -> None:
    # independent arithmetic for linear MNIST (ch 80), including the weight-norm g vector
    ch = 80
    expected = (784 * ch + ch) + 2 * ch + (ch * ch + ch) + 2 * ch + (ch * 10 + 10)
    assert expected == 70_410
    assert _n_params(build_model("linear", "mnist")) == expected


def _types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.children()]


def test_linear_layer_order() -> None:
    net = build_model("linear", "mnist", "sigmoid")
    assert _types(net) == [nn.Flatten, nn.Linear, nn.BatchNorm1d, PcDEQLayer, nn.BatchNorm1d, nn.Linear]
    assert (net[1].in_features, net[1].out_features) == (784, 80)
    assert net[3].W.kind == "dense" and net[3].act.name == "sigmoid" and net[3].act.variant == "pcdeq2"
    assert (net[5].in_features, net[5].out_features) == (80, 10)


def test_single_conv_layer_order() -> None:
    net = build_model("conv", "cifar10")
    assert _types(net) == [
        nn.Conv2d, nn.BatchNorm2d, PcDEQLayer, nn.MaxPool2d, nn.BatchNorm2d,
        nn.AvgPool2d, nn.Flatten, nn.Linear,
    ]
    conv, pool, avg, fc = net[0], net[3], net[5], net[7]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
        3, 125, (3, 3), (1, 1), (1, 1),
    )
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 1)
    assert avg.kernel_size == 8
    assert net[2].W.kind == "conv" and net[2].W.v.shape == (125, 125, 3, 3)
    assert fc.in_features == 125 * (32 // 8) ** 2


def test_multiconv_layer_order() -> None:
    net = build_model("multiconv", "cifar10")
    stage = [nn.Conv2d, nn.BatchNorm2d, PcDEQLayer, nn.MaxPool2d, nn.BatchNorm2d]
    assert _types(net) == stage * 3 + [nn.AvgPool2d, nn.Flatten, nn.Linear]
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 20), (20, 50), (50, 80)]
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (2, 2)]
    assert [c.padding for c in convs] == [(1, 1), (0, 0), (0, 0)]
    assert [len(m.W.g) for m in net.deq_layers()] == [20, 50, 80]  # three separate fixed points
    assert net[15].kernel_size == 4 and net[17].in_features == 80


@pytest.mark.parametrize("dataset,sides", [("cifar10", [32, 15, 7]), ("mnist", [28, 13, 6])])
def test_multiconv_spatial_sizes(dataset: str, sides: list[int]) -> None:
    net = build_model("multiconv", dataset).eval()
    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for m in net.deq_layers()]
    shape = (2, 3, 32, 32) if dataset == "cifar10" else (2, 1, 28, 28)
    with torch.no_grad():
        out = net(torch.rand(shape))
    for h in hooks:
        h.remove()
    assert seen == sides
    assert out.shape == (2, 10)


ALL_PAIRS = [(arch, ds) for arch, sizes in PAPER_SIZES.items() for ds in sizes]


@pytest.mark.parametrize("arch,dataset", ALL_PAIRS)
def test_output_shape_every_pair(arch: str, dataset: str) -> None:
    shapes = {"digits": (1, 8, 8), "mnist": (1, 28, 28)}
    net = build_model(arch, dataset).eval()
    with torch.no_grad():
        out = net(torch.rand(2, *shapes.get(dataset, (3, 32, 32))))
    assert out.shape == (2, 10)
    assert bool(torch.isfinite(out).all())
    assert all(m.last_stats["forward"].converged for m in net.deq_layers())


def test_digits_included() -> None:
    # the project's small dataset must be available for every architecture
    assert {arch for arch, ds in ALL_PAIRS if ds == "digits"} == {"linear", "conv", "multiconv"}
    assert get_family("pcdeq").paper_size("multiconv", "digits") == (16, 32, 48)


# --------------------------------------------------------------------------- projection after training steps


@pytest.mark.parametrize("arch,lr", [("linear", 100.0), ("multiconv", 30.0)])
def test_projection_after_large_sgd_steps(arch: str, lr: float) -> None:
    # Cross-entropy keeps the logit gradients bounded, so the explicit layers survive lr 100 (an MSE loss on
    # random targets makes them overflow by itself, which says nothing about pcDEQ). W still ends up with
    # entries up to ~1e10, far outside any contraction region.
    net = build_model(arch, "digits")
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    x = torch.rand(16, 1, 8, 8)
    went_negative = False
    for _ in range(5):
        labels = torch.randint(0, 10, (16,))  # random targets: arbitrary, large steps
        loss = nn.functional.cross_entropy(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        went_negative |= any(
            float(p.detach().min()) < 0 for layer in net.deq_layers() for p in (layer.W.g, layer.W.v)
        )
        net.project_()
        for layer in net.deq_layers():
            w = layer.W.weight()
            for t in (layer.W.g.detach(), layer.W.v.detach(), w.detach()):
                assert bool(torch.isfinite(t).all()) and float(t.min()) >= 0
    assert went_negative  # the steps did leave the orthant, so the projection was exercised
    with torch.no_grad():
        out = net(x)
    assert bool(torch.isfinite(out).all())
    assert all(m.last_stats["forward"].converged for m in net.deq_layers())


# --------------------------------------------------------------------------- bad input


def test_unknown_activation_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown activation 'gelu'") as err:
        build_model("linear", "mnist", "gelu")
    for name in ("tanh", "softsign", "relu6", "sigmoid"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    "activation,variant", [("sigmoid", "pcdeq1"), ("tanh", "pcdeq2"), ("relu6", "pcdeq2")]
)
def test_activation_with_wrong_variant(activation: str, variant: str) -> None:
    with pytest.raises(ValueError, match=f"'{activation}'.*not '{variant}'") as err:
        build_model("linear", "mnist", activation, variant=variant)
    valid = ["sigmoid"] if variant == "pcdeq2" else ["tanh", "softsign", "relu6"]
    for name in valid:
        assert name in str(err.value)


def test_activation_with_right_variant_accepted() -> None:
    assert get_activation("sigmoid", "pcdeq2").name == "sigmoid"
    net = build_model("linear", "digits", "softsign", variant="pcdeq1")
    assert net.deq_layers()[0].act.name == "softsign"


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_model("transformer", "mnist"),
        lambda: build_network("transformer", (1, 8, 8), 10, 16),
        lambda: get_family("pcdeq").paper_size("transformer", "mnist"),
    ],
)
def test_unknown_arch_lists_choices(build) -> None:
    with pytest.raises(ValueError, match="transformer") as err:
        build()
    assert all(a in str(err.value) for a in ("linear", "conv", "multiconv"))


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ValueError, match="imagenet") as err:
        build_model("conv", "imagenet")
    assert all(d in str(err.value) for d in ("mnist", "svhn", "cifar10", "digits"))


@pytest.mark.parametrize("channels", [(20, 50), (20, 50, 80, 100), 20])
def test_multiconv_needs_three_channel_counts(channels) -> None:
    with pytest.raises(ValueError, match="three channel counts"):
        build_model("multiconv", "cifar10", channels=channels)


def test_single_arch_rejects_channel_tuple() -> None:
    with pytest.raises(ValueError, match="one channel count"):
        build_model("conv", "cifar10", channels=(20, 50))


@pytest.mark.parametrize(
    "fn,pattern",
    [
        (lambda t: t**2, "not concave"),
        (torch.exp, "not concave"),
        (lambda t: -t, "not nondecreasing"),  # linear: concave, but decreasing
        (lambda t: 1 / (1 + t), "not nondecreasing"),  # positive and bounded, but decreasing (and convex)
        (lambda t: torch.log(t), "not finite"),  # -inf at 0
    ],
)
def test_register_rejects_invalid_activation(fn, pattern: str) -> None:
    before = dict(ACTIVATIONS)
    with pytest.raises(ValueError, match=pattern):
        register_activation("test_invalid", fn, "pcdeq1")
    assert ACTIVATIONS == before  # a rejected function never enters the registry


def test_register_rejects_unknown_variant() -> None:
    with pytest.raises(ValueError, match=r"unknown variant 'pcdeq3'.*pcdeq1.*pcdeq2"):
        register_activation("test_invalid", torch.tanh, "pcdeq3")
    assert "test_invalid" not in ACTIVATIONS
