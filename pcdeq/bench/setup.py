"""Setup of a benchmark: the paper architectures, their training configs and one batch of their data.

Every architecture runs at its paper batch size on one batch of the training stack's synthetic data (the dataset's
shape, normalised as its protocol says), built exactly as ``train.py`` builds it from the experiment config.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pcdeq.family import build_net, get_family
from pcdeq.perf import plain_model_options, plain_solver
from pcdeq.training.config import datamodule_from_config, solver_config

Tensor = torch.Tensor
ROOT = Path(__file__).resolve().parents[2]  # the checkout: conf/ and results/ live there
CONF = ROOT / "conf"


def progress(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)



@dataclass(frozen=True)
class Arch:
    """One benchmarked network: a model family, an architecture and the dataset that fixes its shape and size.

    Attributes:
        repeats: default timed repetitions (few for the slow ones).
        warmup: default untimed steps before timing (one at least: the check schedule learns its counts there).
        epoch_batches: batches per epoch of the ``--epoch`` run (a whole real epoch where that is cheap).
    """

    family: str
    arch: str
    dataset: str
    repeats: int
    warmup: int
    epoch_batches: int

    @property
    def name(self) -> str:
        """The architecture's key, also the name of its experiment config (``conf/experiment/<name>.yaml``)."""
        return f"{self.family}_{self.arch}_{self.dataset}"


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("pcdeq", "linear", "mnist", 30, 3, 938),
    Arch("pcdeq", "conv", "mnist", 5, 1, 4),
    Arch("pcdeq", "conv", "cifar10", 3, 1, 2),
    Arch("pcdeq", "multiconv", "mnist", 10, 2, 10),
    Arch("pcdeq", "multiconv", "cifar10", 5, 1, 4),
    Arch("mondeq", "fc", "mnist", 30, 3, 469),
    Arch("mondeq", "conv", "mnist", 2, 1, 2),
    Arch("mondeq", "conv", "cifar10", 2, 1, 2),
    Arch("mondeq", "multitier", "mnist", 2, 1, 2),
    Arch("mondeq", "multitier", "cifar10", 2, 1, 2),
)}


def select_archs(spec: str) -> list[Arch]:
    """Architectures from "all", "none" (e.g. for --memory alone), a family name, or a comma-separated list."""
    if spec in ("all", "none"):
        return list(ARCHS.values()) if spec == "all" else []
    if spec in ("pcdeq", "mondeq"):
        return [a for a in ARCHS.values() if a.family == spec]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        raise SystemExit(f"unknown architecture(s) {', '.join(unknown)}; valid: all, pcdeq, mondeq, "
                         + ", ".join(ARCHS))
    return [ARCHS[n] for n in names]


def scaled_channels(channels: Any, scale: float) -> Any:
    """The hidden size(s) times ``scale`` (at least 1 each)."""
    if isinstance(channels, (list, tuple)):
        return [max(1, round(c * scale)) for c in channels]
    return max(1, round(channels * scale))


def compose_config(arch: Arch, overrides: Sequence[str], output_dir: str) -> DictConfig:
    """The training config of the architecture's experiment (protocol, optimizer, batch size), on synthetic data."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment={arch.name}", "dataset.synthetic=true",
                                           "dataset.num_workers=0", "dataset.val_size=0",
                                           f"paths.output_dir={output_dir}", *overrides])


def config_overrides(arch: Arch, args: argparse.Namespace) -> list[str]:
    """Config overrides from the command line: batch size, width scale, forced tolerance and iteration cap."""
    out = []
    if args.batch:
        out.append(f"dataset.batch_size={args.batch}")
    if args.width_scale != 1.0:
        size = get_family(arch.family).paper_size(arch.arch, arch.dataset)
        out.append(f"model.channels={json.dumps(scaled_channels(size, args.width_scale)).replace(' ', '')}")
    for key, value in solver_overrides(args).items():
        out.append(f"solver.{key}={value}")
    return out


def solver_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--tol`` / ``--max-iter`` as solver settings (both directions)."""
    out: dict[str, Any] = {}
    if args.tol is not None:
        out.update(fwd_tol=args.tol, bwd_tol=args.tol)
    if args.max_iter is not None:
        out.update(fwd_max_iter=args.max_iter, bwd_max_iter=args.max_iter)
    return out


@dataclass
class Setup:
    """An architecture's resolved training config and its benchmark batch."""

    arch: Arch
    config: dict
    x: Tensor
    y: Tensor

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


def make_setup(arch: Arch, args: argparse.Namespace, device: torch.device) -> Setup:
    """Compose the architecture's config and draw one batch of its synthetic training data."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(arch, config_overrides(arch, args), tmp)
        config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    batch = int(config["dataset"]["batch_size"])
    config["dataset"]["synthetic_size"] = [batch, batch]
    dm = datamodule_from_config(config, seed=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    return Setup(arch, config, x.to(device), y.to(device))


def build_ours(setup: Setup, plain: bool = False, **changes: Any) -> Any:
    """Our network as the training stack builds it from the config; ``plain``: every switch at its plain value.

    ``changes``: solver settings, and model options as ``model.<option>`` (applied where the family has the option,
    e.g. ``model.channels_last`` for pcDEQ).

    Returns:
        An nn.Module that is an :class:`pcdeq.family.EquilibriumNet` (typed Any: both contracts are used).
    """
    model = setup.config["model"]
    family = get_family(model["family"])
    options = {k: model[k] for k in family.option_names() if k in model}
    solver = solver_config(setup.config["solver"], family)
    if plain:
        solver = plain_solver(solver)
        options.update({k: v for k, v in plain_model_options().items() if k in options})
    model_changes = {k.removeprefix("model."): v for k, v in changes.items() if k.startswith("model.")}
    options.update({k: v for k, v in model_changes.items() if k in options})
    own = {f.name for f in fields(solver)}  # a switch of another family's solver keys does not apply here
    solver = replace(solver, **{k: v for k, v in changes.items() if not k.startswith("model.") and k in own})
    torch.manual_seed(0)
    net = build_net(family.name, model["arch"], setup.config["dataset"]["name"], channels=model["channels"],
                    solver=solver, **options)
    assert isinstance(net, nn.Module)
    return net

