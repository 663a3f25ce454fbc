"""`make bench`: step times of the paper architectures, against their compute floor, the plain path and the
authors' reference implementation; memory of the implicit vs the unrolled backward; Lightning's epoch overhead.

Every architecture runs at its paper batch size on one batch of the training stack's synthetic data (the
dataset's shape, normalised as its protocol says), with the optimizer of its protocol, in one process:

* training step: forward + cross-entropy + backward + optimizer step + constraint projection. Model and optimizer
  state are restored before every timed training step, so each repetition does the same work. Evaluation step:
  forward + cross-entropy under ``torch.inference_mode`` (the reference: with gradients enabled, as its scripts
  evaluate; its forward registers a tensor hook, which raises under ``no_grad``), weights fixed. Figures are
  medians; the variants of one architecture run interleaved, in an order that rotates every repetition.
* iterations: forward and backward solver iterations of the last timed training step (mean over the equilibrium
  blocks of a multi-block net), forward iterations of the last evaluation step.
* memory: the peak bytes autograd holds for backward during the first training step (each storage once, live
  ones only, via ``torch.autograd.graph.saved_tensors_hooks``); on CUDA also ``torch.cuda.max_memory_allocated``.
* compute floor: t_unit x (iterations + 1), summed over the equilibrium blocks, where t_unit is the measured time
  of one float32 application of the block's operator at its shape, without gradient: sigma(W z + x) for pcDEQ (in
  the model's memory format), one resolvent application V r for monDEQ (Peaceman-Rachford applies V once per
  iteration in both directions). Training counts forward + backward iterations, evaluation forward ones.
* ``--plain``: the same pcDEQ model with every performance switch at its plain value beside the default ("best")
  path; ratios plain/best (for monDEQ: W applied spatially instead of in the frequency domain).
* ``--switch KEY=VALUE`` (repeatable): the default path with these solver settings changed beside it, e.g.
  ``--switch skip_zero_product=false``: one optimisation's effect, interleaved; ratios switched/best.
* ``--reference PATH``: the authors' pcDEQ implementation, imported at runtime from a checkout at PATH (nothing
  is copied), with our weights copied into it; the fixed points and gradients of one training batch are
  compared first. Ratios ref/ours.
* ``--memory``: one training step with the iteration count forced (tol 0) for implicit and unrolled backward,
  each point in a fresh subprocess: peak saved-for-backward bytes, peak RSS growth (CPU) or peak CUDA memory.
* ``--epoch``: two epochs through the real training stack (Hydra config, Lightning Trainer, the project's
  module and callbacks) on synthetic data, and the same two epochs as a bare loop (same weights, batches and
  optimizer); the second epochs' wall times, interleaved, and Lightning's overhead as a percentage.

Usage:
    python scripts/bench.py [--archs all|pcdeq|mondeq|NAME,...] [--plain] [--switch KEY=VALUE] [--reference PATH]
        [--memory] [--epoch] [--device cpu|cuda] [--repeats N] [--warmup N] [--threads N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's pcdeq, whatever the environment has installed
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from pcdeq.activations import get_activation  # noqa: E402
from pcdeq.datasets import get_spec  # noqa: E402
from pcdeq.errors import ConfigError  # noqa: E402
from pcdeq.family import build_net, get_family  # noqa: E402
from pcdeq.layer import PcDEQLayer  # noqa: E402
from pcdeq.perf import plain_model_options, plain_solver  # noqa: E402
from pcdeq.solvers import SolverConfig  # noqa: E402
from pcdeq.training.config import datamodule_from_config, solver_config  # noqa: E402
from pcdeq.training.optim import build_optimizer  # noqa: E402

Tensor = torch.Tensor
CONF = ROOT / "conf"
DEFAULT_JSON = ROOT / "results" / "bench" / "bench.json"
MEMORY_ITERS = (10, 25, 50, 100)
MEMORY_ARCH = "pcdeq_multiconv_mnist"
EPOCH_ARCHS = ("pcdeq_linear_mnist", "pcdeq_multiconv_mnist", "mondeq_fc_mnist")
REF_MODULES = ("networks", "blocks", "layers", "solvers", "utils")  # the reference's top-level module names
REF_CHILDREN = {  # the reference's stateful modules, in the order of our networks' stateful modules
    "linear": ("linear1", "bn1", "block", "bn2", "classifier"),
    "conv": ("conv1", "bn1", "block", "bn2", "classifier"),
    "multiconv": ("conv1", "bn1", "block1", "bn2", "downsample1", "bn3", "block2", "bn4", "downsample2", "bn5",
                  "block3", "bn6", "classifier"),
}
FIXED_POINT_LIMIT, GRAD_LIMIT = 1e-4, 1e-3
ZERO_GRAD = 1e-4  # a parameter gradient below this fraction of the whole gradient's norm is 0 up to rounding


def progress(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- architectures


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


def build_ours(setup: Setup, plain: bool = False, **solver_changes: Any) -> nn.Module:
    """Our network as the training stack builds it from the config; ``plain``: every switch at its plain value."""
    model = setup.config["model"]
    family = get_family(model["family"])
    options = {k: model[k] for k in family.option_names() if k in model}
    solver = solver_config(setup.config["solver"])
    if plain:
        solver = plain_solver(solver)
        options.update({k: v for k, v in plain_model_options().items() if k in options})
    solver = replace(solver, **solver_changes)
    torch.manual_seed(0)
    return build_net(family.name, model["arch"], setup.config["dataset"]["name"], channels=model["channels"],
                     solver=solver, **options)


# ---------------------------------------------------------------- steps and timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call in seconds, synchronised around on CUDA."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median_ms(times: Sequence[float]) -> float:
    """Median of times in seconds, in milliseconds."""
    return statistics.median(times) * 1e3


def eq_modules(model: nn.Module) -> list[nn.Module]:
    """Our equilibrium modules (the ones keeping ``last_stats``), in module order."""
    return [m for m in model.modules() if isinstance(getattr(m, "last_stats", None), dict)]


def our_counts(model: nn.Module, direction: str) -> list[int]:
    """Iterations of the last solve in ``direction`` ("forward"/"backward") of each equilibrium module."""
    out = []
    for m in eq_modules(model):
        stats = m.last_stats.get(direction)
        if stats is not None:
            out.append(int(stats.iters))
    return out


def reference_counts(model: nn.Module, direction: str) -> list[int]:
    """The reference's iteration counts of its last solves, per block."""
    key = "iter_forward" if direction == "forward" else "iter_backward"
    return [int(getattr(b.deq, key)) for b in model.blocks]


@dataclass
class Variant:
    """One implementation of an architecture, with its optimizer and step functions.

    Attributes:
        name: "best", "plain" or "reference".
        counts: ``counts(direction)`` -> iterations per block of the last solve.
        project: restores the parameter constraints after the optimizer step.
        grad_eval: evaluate with gradients enabled (the reference, as-is) instead of under inference_mode.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    counts: Callable[[str], list[int]]
    project: Callable[[], None]
    grad_eval: bool = False
    state: tuple[dict, dict] | None = None
    train_times: list[float] = field(default_factory=list)
    eval_times: list[float] = field(default_factory=list)
    train_iters: dict[str, list[int]] = field(default_factory=dict)
    eval_iters: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def train_step(self) -> None:
        """Forward, loss, backward, optimizer step, projection."""
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.project()

    def eval_step(self) -> None:
        """Forward and loss without a backward (inference_mode, or gradients enabled for the reference)."""
        if self.grad_eval:
            F.cross_entropy(self.model(self.x), self.y)
            return
        with torch.inference_mode():
            F.cross_entropy(self.model(self.x), self.y)

    def snapshot(self) -> None:
        """Keep the model and optimizer state, restored before every timed training step."""
        self.state = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def restore(self) -> None:
        """Return to the snapshot."""
        assert self.state is not None
        self.model.load_state_dict(self.state[0])
        self.optimizer.load_state_dict(copy.deepcopy(self.state[1]))

    def record_train(self) -> None:
        """Iterations of the training step just run."""
        self.train_iters = {"forward": self.counts("forward"), "backward": self.counts("backward")}
        if hasattr(self.model, "solver_stats"):
            self.stats["solver_stats_train"] = self.model.solver_stats()

    def record_eval(self) -> None:
        """Iterations of the evaluation step just run."""
        self.eval_iters = self.counts("forward")
        if hasattr(self.model, "solver_stats"):
            self.stats["solver_stats_eval"] = self.model.solver_stats()


def our_variant(name: str, model: nn.Module, setup: Setup) -> Variant:
    """A variant of our network with the protocol's optimizer (torch's per-tensor loop for the plain path)."""
    optim = dict(setup.config["optim"], fused=bool(setup.config["optim"].get("fused", True)) and name != "plain")
    optimizer = build_optimizer(model.parameters(), optim)
    return Variant(name, model, optimizer, setup.x, setup.y, lambda d: our_counts(model, d), model.project_)


class _Saved:
    """A tensor autograd saved for backward, counted by a :class:`SavedTensorMeter` while it lives."""

    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, tensor: Tensor) -> None:
        self.meter, self.tensor = meter, tensor
        storage = tensor.untyped_storage()
        self.key = (tensor.device, storage.data_ptr())
        meter.add(self.key, storage.nbytes())

    def __del__(self) -> None:
        self.meter.drop(self.key)


class SavedTensorMeter:
    """Peak bytes of the tensors autograd keeps for backward: live ones only, each storage once."""

    def __init__(self) -> None:
        self.refs: dict[tuple, list[int]] = {}  # storage -> [references, bytes]
        self.current = self.peak = 0

    def add(self, key: tuple, nbytes: int) -> None:
        entry = self.refs.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1

    def drop(self, key: tuple) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.refs[key]

    @contextmanager
    def watch(self) -> Iterator[SavedTensorMeter]:
        """Count what autograd saves inside the block."""
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(self, t), lambda s: s.tensor):
            yield self


def instrumented_step(variant: Variant, device: torch.device) -> None:
    """The first training step, with the saved-for-backward meter and CUDA's peak memory counter."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = SavedTensorMeter()
    with meter.watch():
        variant.train_step()
    variant.stats["saved_for_backward_mb"] = meter.peak / 2**20
    variant.stats["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def rotated(items: list, r: int) -> list:
    """``items`` starting at position r (mod len): the interleaving order of repetition r."""
    k = r % len(items)
    return items[k:] + items[:k]


def time_training(variants: list[Variant], floor_ops: list[Callable[[], Any]], repeats: int, warmup: int,
                  device: torch.device) -> list[list[float]]:
    """Warm up, then time training steps interleaved (state restored before each); returns the floor-op times."""
    for v in variants:
        v.model.train()
        instrumented_step(v, device)
        v.snapshot()
        for _ in range(warmup - 1):
            v.restore()
            v.train_step()
    for op in floor_ops:
        op()
    floor_times: list[list[float]] = [[] for _ in floor_ops]
    for r in range(repeats):
        for v in rotated(variants, r):
            v.restore()
            v.train_times.append(timed(v.train_step, device))
            v.record_train()
        for i, op in enumerate(floor_ops):
            floor_times[i].append(timed(op, device))
    return floor_times


def time_evaluation(variants: list[Variant], repeats: int, warmup: int, device: torch.device) -> None:
    """Time evaluation steps interleaved, every variant from the same post-warm-up weights."""
    for v in variants:
        v.restore()
        v.model.eval()
        for _ in range(warmup):
            v.eval_step()
    for r in range(repeats):
        for v in rotated(variants, r):
            v.eval_times.append(timed(v.eval_step, device))
            v.record_eval()
    for v in variants:
        v.model.train()


# ---------------------------------------------------------------- compute floor


def pcdeq_layer_inputs(model: nn.Module, step: Callable[[], None]) -> list[tuple[PcDEQLayer, Tensor]]:
    """Each pcDEQ layer with (a detached copy of) the input it received during ``step``."""
    seen: list[tuple[PcDEQLayer, Tensor]] = []
    layers = [m for m in model.modules() if isinstance(m, PcDEQLayer)]
    run_hooked([m.register_forward_pre_hook(lambda mod, a: seen.append((mod, a[0].detach().clone())))
                for m in layers], step)
    return seen


def run_hooked(hooks: list[Any], step: Callable[[], None]) -> None:
    """Run ``step`` with the given hook handles registered, removing them afterwards whatever happens."""
    try:
        step()
    finally:
        for h in hooks:
            h.remove()


def floor_ops(variant: Variant) -> tuple[str, list[Callable[[], Any]]]:
    """One float32 application of each equilibrium block's operator at its shape, without gradient."""
    model = variant.model
    if hasattr(model, "operator"):  # monDEQ: one resolvent application per iteration, forward and backward
        with torch.no_grad():
            resolvent = model.operator.resolvent(model.alpha)
        g = torch.Generator().manual_seed(0)
        shapes = model.operator.state_shapes(variant.x.shape[0])
        r = [torch.rand(s, generator=g).to(variant.x.device) for s in shapes]
        return "V r (one resolvent application)", [_no_grad(lambda: resolvent.apply(r))]
    model.eval()
    try:
        inputs = pcdeq_layer_inputs(model, variant.eval_step)
    finally:
        model.train()
    ops = []
    for layer, x in inputs:
        z, xi = torch.rand_like(x), torch.rand_like(x)  # in x's memory format
        with torch.no_grad():
            w = layer.W.weight().detach().clone()
        ops.append(_no_grad(lambda layer=layer, z=z, xi=xi, w=w: layer.map(z, xi, w)))
    return "sigma(W z + x) (one application)", ops


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run under torch.no_grad."""

    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def floor_summary(unit: str, floor_times: list[list[float]], best: Variant) -> dict[str, Any]:
    """The floors t_unit x (iterations + 1), summed over blocks, and the best path's step / floor ratios."""
    unit_ms = [median_ms(t) for t in floor_times]
    fwd, bwd = best.train_iters["forward"], best.train_iters["backward"]
    train = sum(u * (f + b + 1) for u, f, b in zip(unit_ms, fwd, bwd, strict=True))
    evaluation = sum(u * (f + 1) for u, f in zip(unit_ms, best.eval_iters, strict=True))
    return {"unit": unit, "unit_ms_per_block": unit_ms, "train_floor_ms": train, "eval_floor_ms": evaluation,
            "train_ratio": median_ms(best.train_times) / train, "eval_ratio": median_ms(best.eval_times) / evaluation}


# ---------------------------------------------------------------- the reference implementation


def import_reference(path: Path) -> ModuleType:
    """The authors' ``networks`` module from their checkout at ``path``, imported at runtime.

    Its modules have generic top-level names (``solvers``, ``utils``, ...): any module of those names already
    imported is set aside during the import and put back afterwards, and the reference's own are removed from
    ``sys.modules`` again (its classes keep working through the returned module).
    """
    if not (path / "networks.py").is_file():
        raise SystemExit(f"--reference {path}: no networks.py there (expected a checkout of the authors' code)")
    saved = {name: sys.modules.pop(name) for name in REF_MODULES if name in sys.modules}
    sys.path.insert(0, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("networks")
    finally:
        sys.path.remove(str(path))
        for name in REF_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def build_reference(networks: ModuleType, setup: Setup) -> nn.Module:
    """The reference's network for the same architecture, size, dataset shape and activation."""
    model = setup.config["model"]
    arch, channels, act = model["arch"], model["channels"], model["activation"]
    n = "1" if get_activation(act, model.get("variant")).variant == "pcdeq1" else "2"
    c_in, side, _ = get_spec(setup.config["dataset"]["name"]).shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's FutureWarning for the legacy weight_norm the reference uses
        if arch == "linear":
            if c_in * side * side != 784:
                raise SystemExit("the reference's linear network takes 28x28 single-channel inputs only")
            return getattr(networks, f"LinearPcDEQ{n}")(channels, act)
        if arch == "conv":
            return getattr(networks, f"SingleConvPcDEQ{n}")(side, c_in, channels, act)
        return getattr(networks, f"MultiConvPcDEQ{n}")(c_in, *channels, act)


def module_pairs(ours: nn.Module, ref: nn.Module, arch: str) -> list[tuple[nn.Module, nn.Module]]:
    """Our stateful modules (pcDEQ layers, and modules with parameters or buffers) paired with the reference's."""
    mine = [m for m in ours.children() if isinstance(m, PcDEQLayer)
            or any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]
    theirs = [getattr(ref, name) for name in REF_CHILDREN[arch]]
    if len(mine) != len(theirs):
        raise RuntimeError(f"{arch}: {len(mine)} stateful modules here, {len(theirs)} in the reference")
    return list(zip(mine, theirs, strict=True))


def parameter_pairs(ours: nn.Module, ref: nn.Module, arch: str) -> list[tuple[str, Tensor, Tensor]]:
    """(name, our parameter, the reference's) for every parameter; W's g and v map to weight_g and weight_v."""
    out = []
    for i, (o, r) in enumerate(module_pairs(ours, ref, arch)):
        if isinstance(o, PcDEQLayer):
            w = r.deq.f.W
            out += [(f"{i}.W.g", o.W.g, w.weight_g), (f"{i}.W.v", o.W.v, w.weight_v)]
        else:
            theirs = dict(r.named_parameters())
            out += [(f"{i}.{name}", p, theirs[name]) for name, p in o.named_parameters()]
    return out


@torch.no_grad()
def copy_to_reference(ours: nn.Module, ref: nn.Module, arch: str) -> None:
    """Our weights (and batch-norm statistics) into the reference, so that both compute the same thing."""
    for o, r in module_pairs(ours, ref, arch):
        if isinstance(o, PcDEQLayer):
            w = r.deq.f.W
            w.weight_v.copy_(o.W.v)
            w.weight_g.copy_(o.W.g.reshape_as(w.weight_g))
        else:
            r.load_state_dict(o.state_dict())


def block_outputs(model: nn.Module, blocks: list[nn.Module], step: Callable[[], None]) -> list[Tensor]:
    """The output of each module in ``blocks`` during ``step``."""
    seen: list[Tensor] = []
    run_hooked([b.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone())) for b in blocks], step)
    return seen


def check_reference(ours: nn.Module, ref: nn.Module, arch: str, x: Tensor, y: Tensor) -> dict[str, Any]:
    """One training batch through both (train mode, no optimizer step): fixed points and gradients compared.

    The fixed point is each block's output g(z*) (one application at the solver's last iterate, in both). The
    gradient error is the largest ||dL/dp - dL/dp_ref|| / ||dL/dp_ref|| over the parameters, leaving out those
    whose reference gradient is below :data:`ZERO_GRAD` of the whole gradient's norm: parameters followed by batch
    norm up to a constant shift or scale (a bias before batch norm) have gradient 0 in exact arithmetic, so both
    sides hold rounding noise there (about 1e-6 of the norm, against 1e-2 or more for the others).
    ``grad_rel_err_overall`` is the relative error of all parameters' gradients at once.
    """
    ours.train()
    ref.train()

    def backward(model: nn.Module) -> Callable[[], None]:
        return lambda: F.cross_entropy(model(x), y).backward()

    z_ours = block_outputs(ours, [m for m in ours.modules() if isinstance(m, PcDEQLayer)], backward(ours))
    z_ref = block_outputs(ref, [b.deq for b in ref.blocks], backward(ref))
    dz = max(float((a - b).abs().max()) for a, b in zip(z_ours, z_ref, strict=True))
    pairs = [(name, p.grad.reshape_as(q.grad), q.grad) for name, p, q in parameter_pairs(ours, ref, arch)]
    total = float(torch.sqrt(sum((q.double() ** 2).sum() for _, _, q in pairs)))
    overall = float(torch.sqrt(sum(((p - q).double() ** 2).sum() for _, p, q in pairs))) / total
    per_param = {name: float((p - q).norm() / q.norm()) for name, p, q in pairs
                 if float(q.norm()) > ZERO_GRAD * total}
    worst = max(per_param, key=per_param.__getitem__)
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    return {"max_fixed_point_diff": dz, "grad_rel_err": per_param[worst], "grad_rel_err_param": worst,
            "grad_rel_err_overall": overall, "zero_grad_params": [n for n, _, _ in pairs if n not in per_param],
            "passed": dz <= FIXED_POINT_LIMIT and per_param[worst] <= GRAD_LIMIT,
            "limits": {"fixed_point": FIXED_POINT_LIMIT, "grad_rel_err": GRAD_LIMIT}}


def reference_variant(networks: ModuleType, setup: Setup, best: Variant) -> tuple[Variant, dict[str, Any]]:
    """The reference with our weights, checked against ours on the batch; both are left at the same weights."""
    arch = setup.config["model"]["arch"]
    ref = build_reference(networks, setup).to(setup.x.device)
    initial = copy.deepcopy(best.model.state_dict())
    copy_to_reference(best.model, ref, arch)
    check = check_reference(best.model, ref, arch, setup.x, setup.y)
    best.model.load_state_dict(initial)  # the check's batch-norm updates undone
    copy_to_reference(best.model, ref, arch)
    # the reference script's optimizer: torch's AdamW with its default (per-tensor) implementation
    optimizer = build_optimizer(ref.parameters(), dict(setup.config["optim"], fused=False))
    variant = Variant("reference", ref, optimizer, setup.x, setup.y, lambda d: reference_counts(ref, d), ref.clamp,
                      grad_eval=True)
    return variant, check


# ---------------------------------------------------------------- one architecture


def variant_summary(v: Variant, batch: int) -> dict[str, Any]:
    """Times, iterations, throughput and memory of one variant."""
    train_ms, eval_ms = median_ms(v.train_times), median_ms(v.eval_times)
    fwd, bwd = v.train_iters.get("forward", []), v.train_iters.get("backward", [])
    return {
        "train_ms": train_ms, "eval_ms": eval_ms, "train_ms_all": [t * 1e3 for t in v.train_times],
        "eval_ms_all": [t * 1e3 for t in v.eval_times],
        "train_samples_per_s": batch / train_ms * 1e3, "eval_samples_per_s": batch / eval_ms * 1e3,
        "fwd_iters": statistics.mean(fwd) if fwd else None, "bwd_iters": statistics.mean(bwd) if bwd else None,
        "eval_fwd_iters": statistics.mean(v.eval_iters) if v.eval_iters else None,
        "fwd_iters_per_block": fwd, "bwd_iters_per_block": bwd, "eval_fwd_iters_per_block": v.eval_iters,
        **v.stats,
    }


def ratios(num: Variant, den: Variant) -> dict[str, float]:
    """num/den for training and evaluation: ratio of the medians, and the median of per-repetition ratios."""
    out = {}
    for phase in ("train", "eval"):
        a, b = getattr(num, f"{phase}_times"), getattr(den, f"{phase}_times")
        out[f"{phase}_ratio"] = statistics.median(a) / statistics.median(b)
        out[f"{phase}_ratio_paired"] = statistics.median(x / y for x, y in zip(a, b, strict=True))
    return out


def bench_arch(arch: Arch, args: argparse.Namespace, device: torch.device,
               networks: ModuleType | None) -> dict[str, Any]:
    """Every measurement of one architecture (see the module docstring)."""
    repeats = args.repeats or arch.repeats
    warmup = args.warmup or arch.warmup
    setup = make_setup(arch, args, device)
    best = our_variant("best", build_ours(setup).to(device), setup)
    variants, notes = [best], []
    if args.plain:
        plain = our_variant("plain", build_ours(setup, plain=True).to(device), setup)
        plain.model.load_state_dict(best.model.state_dict())
        variants.append(plain)
    if args.switch:
        switched = our_variant("switched", build_ours(setup, **args.switch).to(device), setup)
        switched.model.load_state_dict(best.model.state_dict())
        variants.append(switched)
    check = None
    if networks is not None and arch.family == "pcdeq":
        ref, check = reference_variant(networks, setup, best)
        variants.append(ref)
        progress(f"{arch.name}: reference check |dz| {check['max_fixed_point_diff']:.2e}, "
                 f"grad rel err {check['grad_rel_err']:.2e} ({'ok' if check['passed'] else 'FAILED'})")
    elif networks is not None:
        notes.append("reference: the authors' implementation has pcDEQ networks only")
    progress(f"{arch.name}: batch {setup.batch}, channels {setup.config['model']['channels']}, "
             f"{warmup} warm-up + {repeats} timed repetitions of {', '.join(v.name for v in variants)}")
    unit, ops = floor_ops(best)
    floor_times = time_training(variants, ops, repeats, warmup, device)
    time_evaluation(variants, repeats, warmup, device)
    by_name = {v.name: v for v in variants}
    result: dict[str, Any] = {
        "family": arch.family, "arch": arch.arch, "dataset": arch.dataset, "batch": setup.batch,
        "channels": setup.config["model"]["channels"], "repeats": repeats, "warmup": warmup,
        "variants": {v.name: variant_summary(v, setup.batch) for v in variants},
        "floor": floor_summary(unit, floor_times, best), "notes": notes,
        "plain_vs_best": ratios(by_name["plain"], best) if "plain" in by_name else None,
        "switch": dict(args.switch) or None,
        "switched_vs_best": ratios(by_name["switched"], best) if "switched" in by_name else None,
        "reference": None,
    }
    if "reference" in by_name:
        result["reference"] = {**ratios(by_name["reference"], best), **(check or {}),
                               "eval_mode": "reference: gradients enabled (as its scripts); ours: inference_mode"}
    return result


# ---------------------------------------------------------------- --memory


def proc_status_bytes(key: str) -> int | None:
    """A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM"; Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0; a no-op where not possible)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The process's peak RSS since :func:`reset_peak_rss`.

    Not ``ru_maxrss`` where /proc has it: Linux carries ru_maxrss across execve, so a subprocess would start with
    its parent's peak.
    """
    hwm = proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_point(arch: Arch, backward: str, iters: int, args: argparse.Namespace, device: torch.device) -> dict:
    """One training step with exactly ``iters`` forward (and implicit backward) iterations: its memory.

    Meant for a fresh process (``--memory-point``), so that the peak RSS belongs to this step alone.
    """
    setup = make_setup(arch, args, device)
    model = build_ours(setup, backward=backward, fwd_tol=0.0, bwd_tol=0.0, fwd_max_iter=iters,
                       bwd_max_iter=iters).to(device)
    variant = our_variant(backward, model, setup)
    gc.collect()
    reset_peak_rss()
    rss_before = proc_status_bytes("VmRSS") or peak_rss_bytes()
    instrumented_step(variant, device)
    variant.record_train()
    return {"backward": backward, "iters": iters, "fwd_iters": variant.train_iters["forward"],
            "bwd_iters": variant.train_iters["backward"],
            "saved_for_backward_mb": variant.stats["saved_for_backward_mb"],
            "peak_rss_growth_mb": max(0, peak_rss_bytes() - rss_before) / 2**20,
            "peak_cuda_mb": variant.stats["peak_cuda_mb"]}


def run_memory_point(arch: Arch, backward: str, iters: int, args: argparse.Namespace) -> dict:
    """:func:`memory_point` in a fresh subprocess of this script."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-point", backward, str(iters),
           "--archs", arch.name, "--device", args.device, "--threads", str(args.threads),
           "--width-scale", str(args.width_scale)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_POINT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory point {backward} {iters} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("MEMORY_POINT "):])


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Implicit vs unrolled backward at forced iteration counts, one fresh process per point."""
    arch = ARCHS[args.memory_arch]
    iters = (2, 4) if args.quick else MEMORY_ITERS
    series: dict[str, list[dict]] = {"implicit": [], "unrolled": []}
    for n in iters:
        for backward in series:
            progress(f"memory: {arch.name}, {backward} backward, {n} iterations")
            series[backward].append(run_memory_point(arch, backward, n, args))
    return {"arch": arch.name, "iters": list(iters), **series,
            "measures": "saved_for_backward_mb: peak live bytes autograd saved (saved_tensors_hooks); "
                        "peak_rss_growth_mb: peak RSS during the step (VmHWM, reset before it) minus RSS "
                        "before it, in a fresh process; "
                        "peak_cuda_mb: torch.cuda.max_memory_allocated (CUDA only)"}


# ---------------------------------------------------------------- --epoch


class EpochClock(Callback):
    """Lightning callback: start times of the epochs, the end of training, and time spent inside batches."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch_starts: list[float] = []
        self.batch_time: list[float] = []
        self.end = 0.0
        self._batch_start = 0.0

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self.epoch_starts.append(time.perf_counter())
        self.batch_time.append(0.0)

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batch_time[-1] += time.perf_counter() - self._batch_start

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.end = time.perf_counter()


@contextmanager
def quiet_logging() -> Iterator[None]:
    """Lightning's and the project's info lines off (warnings stay)."""
    loggers = [logging.getLogger(n) for n in ("pcdeq", "lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _epoch_config(arch: Arch, args: argparse.Namespace, n: int, tmp: str) -> DictConfig:
    """The architecture's training config for two epochs of ``n`` synthetic batches, no logger, no test."""
    probe = compose_config(arch, config_overrides(arch, args), tmp)
    batch = int(probe.dataset.batch_size)
    overrides = [*config_overrides(arch, args), f"dataset.synthetic_size=[{n * batch},{batch}]",
                 "trainer.max_epochs=2", f"trainer.limit_train_batches={n}", "test_every_epoch=false",
                 "logger=none", f"num_threads={args.threads}", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false"]
    if args.device == "cuda":
        overrides.append("trainer=gpu")
    return compose_config(arch, overrides, tmp)


def lightning_epochs(cfg: DictConfig) -> tuple[EpochClock, dict[str, float]]:
    """Two epochs through the training stack (``build_run``: Trainer, module, callbacks, checkpoints)."""
    from pcdeq.training.pipeline import build_run

    run = build_run(cfg)
    clock = EpochClock()
    run.trainer.callbacks.append(clock)
    run.trainer.fit(run.module, train_dataloaders=run.datamodule.train_dataloader())
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.endswith("_iters")}
    return clock, metrics


def bare_epochs(cfg: DictConfig, device: torch.device) -> list[float]:
    """The same two epochs as a plain loop: the same network, seed, data order, optimizer and the family's per-batch
    hook (monDEQ's alpha tuning), nothing else.

    Returns:
        The wall time of each epoch (s).
    """
    from pcdeq.training.pipeline import build_run

    run = build_run(cfg)  # the same seeding, so the same initial weights and batches as the Lightning run
    net = run.module.net.to(device)
    optimizer = build_optimizer(net.parameters(), run.module.config["optim"])
    loader = run.datamodule.train_dataloader()
    net.train()
    times = []
    for _ in range(2):
        synchronize(device)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            x = x.to(device)
            net.on_train_batch_start(x, i, len(loader))  # e.g. monDEQ's alpha tuning, as in the other two
            loss = F.cross_entropy(net(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            net.project_()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


class MinimalModule(L.LightningModule):
    """The least a LightningModule does per batch: the family's batch hook, forward, loss, backward, optimizer step,
    projection.

    Its epoch against the bare loop is Lightning's own per-batch cost; the training module's epoch against its
    epoch is what the training module adds (figures, certificate, checkpoints, scheduler).
    """

    def __init__(self, net: Any, optim_cfg: Any) -> None:  # net: an EquilibriumNet (an nn.Module)
        super().__init__()
        self.net: Any = net
        self.optim_cfg = optim_cfg

    def on_train_batch_start(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # the family's per-batch hook is part of its training algorithm (monDEQ retunes alpha), not overhead
        self.net.on_train_batch_start(batch[0], batch_idx, int(self.trainer.num_training_batches))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.net.project_()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.net.parameters(), self.optim_cfg)


def minimal_lightning_epochs(cfg: DictConfig, device: torch.device) -> EpochClock:
    """The same two epochs through a bare Trainer (no callbacks, logger or checkpoints) and :class:`MinimalModule`."""
    from pcdeq.training.pipeline import build_run

    run = build_run(cfg)  # the same seeding, weights and batches as the other two
    clock = EpochClock()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=2,
                        limit_train_batches=cfg.trainer.limit_train_batches, logger=False, callbacks=[clock],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MinimalModule(run.module.net, run.module.config["optim"]),
                train_dataloaders=run.datamodule.train_dataloader())
    return clock


def bench_epoch(arch: Arch, args: argparse.Namespace, bare_step_ms: float, device: torch.device) -> dict[str, Any]:
    """Lightning's per-epoch overhead: the second of two epochs through the training stack against the second of
    the same two epochs as a bare loop and through a minimal LightningModule (same weights, batches, optimizer and
    batch hook, so the iteration counts grow alike), interleaved, medians over the repetitions."""
    n = 2 if args.quick else arch.epoch_batches
    reps = 1 if args.quick else args.epoch_repeats
    lightning_s, in_batch_s, bare_s, minimal_s = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, quiet_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = _epoch_config(arch, args, n, tmp)
        for _ in range(reps):
            clock, metrics = lightning_epochs(cfg)
            lightning_s.append(clock.end - clock.epoch_starts[-1])
            in_batch_s.append(clock.batch_time[-1])
            bare_s.append(bare_epochs(cfg, device)[-1])
            minimal = minimal_lightning_epochs(cfg, device)
            minimal_s.append(minimal.end - minimal.epoch_starts[-1])
    epoch_s, bare, floor = statistics.median(lightning_s), statistics.median(bare_s), statistics.median(minimal_s)
    return {"batches": n, "repeats": reps, "epoch_s": epoch_s, "bare_epoch_s": bare,
            "in_batch_s": statistics.median(in_batch_s), "overhead_pct": (epoch_s / bare - 1) * 100,
            "minimal_epoch_s": floor, "lightning_floor_pct": (floor / bare - 1) * 100,
            "module_pct": (epoch_s / floor - 1) * 100,
            "steps_s": n * bare_step_ms / 1e3, "bare_step_ms": bare_step_ms,
            "train_fwd_iters": metrics.get("train/fwd_iters"), "train_bwd_iters": metrics.get("train/bwd_iters"),
            "measures": "the second of two epochs through Lightning (callback: epoch start to the end of training, "
                        "checkpoint included) against the second of the same two epochs as a bare loop; "
                        "minimal_epoch_s: the same epoch through a bare Trainer and a minimal LightningModule "
                        "(lightning_floor_pct: Lightning's own cost over the bare loop; module_pct: what the "
                        "training stack adds over that); "
                        "steps_s: batches x the fixed-batch step's median (iterations do not grow there)"}


# ---------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant figures, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with a title line."""
    cells = [list(headers)] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines) + "\n"


def iters_cell(fwd: Any, bwd: Any) -> str:
    """Forward/backward iterations as "f/b"."""
    return f"{fmt(fwd)}/{fmt(bwd)}"


def steps_table(archs: dict[str, Any], device: str) -> str:
    """Times, iterations, throughput and memory of the default path."""
    rows = []
    for name, r in archs.items():
        b = r["variants"]["best"]
        mem = b["peak_cuda_mb"] if b.get("peak_cuda_mb") is not None else b["saved_for_backward_mb"]
        rows.append([name, r["batch"], r["repeats"], b["train_ms"], b["eval_ms"], iters_cell(b["fwd_iters"],
                     b["bwd_iters"]), b["eval_fwd_iters"], b["train_samples_per_s"], b["eval_samples_per_s"], mem])
    mem_label = "peak MB" if device.startswith("cuda") else "saved MB"
    return table("Steps (default path; medians; iterations f/b of the training step, f of evaluation)",
                 ["arch", "batch", "reps", "train ms", "eval ms", "iters f/b", "eval f", "train sps", "eval sps",
                  mem_label], rows)


def floor_table(archs: dict[str, Any]) -> str:
    """Compute floors and the default path's step / floor ratios."""
    rows = [[name, r["floor"]["unit"], "+".join(fmt(u) for u in r["floor"]["unit_ms_per_block"]),
             r["floor"]["train_floor_ms"], r["floor"]["train_ratio"], r["floor"]["eval_floor_ms"],
             r["floor"]["eval_ratio"]] for name, r in archs.items()]
    return table("Compute floor = t_unit x (iterations + 1), summed over blocks",
                 ["arch", "unit", "t_unit ms", "train floor ms", "train/floor", "eval floor ms", "eval/floor"], rows)


def report(results: dict[str, Any]) -> str:
    """The printed tables."""
    archs = results["archs"]
    out = [steps_table(archs, results["meta"]["device"]), floor_table(archs)] if archs else []
    rows = [[name, r["variants"]["plain"]["train_ms"], r["variants"]["best"]["train_ms"], p["train_ratio"],
             p["train_ratio_paired"], r["variants"]["plain"]["eval_ms"], r["variants"]["best"]["eval_ms"],
             p["eval_ratio"], p["eval_ratio_paired"]]
            for name, r in archs.items() if (p := r["plain_vs_best"])]
    if rows:
        out.append(table("Plain switches vs best (ratio of medians; median of paired ratios)",
                         ["arch", "plain train ms", "best train ms", "plain/best", "paired", "plain eval ms",
                          "best eval ms", "plain/best", "paired"], rows))
    rows = [[name, r["variants"]["switched"]["train_ms"], r["variants"]["best"]["train_ms"], p["train_ratio"],
             p["train_ratio_paired"], r["variants"]["switched"]["eval_ms"], r["variants"]["best"]["eval_ms"],
             p["eval_ratio"], p["eval_ratio_paired"], iters_cell(r["variants"]["switched"]["fwd_iters"],
                                                                r["variants"]["switched"]["bwd_iters"])]
            for name, r in archs.items() if (p := r.get("switched_vs_best"))]
    if rows:
        changes = " ".join(f"{k}={v}" for k, v in next(r["switch"] for r in archs.values() if r.get("switch")).items())
        out.append(table(f"Switched ({changes}) vs best (ratio of medians; median of paired ratios)",
                         ["arch", "switched train ms", "best train ms", "switched/best", "paired",
                          "switched eval ms", "best eval ms", "switched/best", "paired", "iters f/b"], rows))
    rows = []
    for name, r in archs.items():
        if not (c := r["reference"]):
            continue
        ref, best = r["variants"]["reference"], r["variants"]["best"]
        rows.append([name, ref["train_ms"], best["train_ms"], c["train_ratio"], c["train_ratio_paired"],
                     ref["eval_ms"], best["eval_ms"], c["eval_ratio"], c["eval_ratio_paired"],
                     iters_cell(ref["fwd_iters"], ref["bwd_iters"]), f"{c['max_fixed_point_diff']:.1e}",
                     f"{c['grad_rel_err']:.1e}", "ok" if c["passed"] else "FAILED"])
    if rows:
        out.append(table("Reference implementation vs ours (reference evaluated with grad enabled, as-is)",
                         ["arch", "ref train ms", "ours", "ref/ours", "paired", "ref eval ms", "ours", "ref/ours",
                          "paired", "ref iters f/b", "max|dz|", "grad rel err", "check"], rows))
    if results.get("memory"):
        out.append(memory_table(results["memory"]))
    if results.get("epoch"):
        rows = [[name, e["batches"], e["epoch_s"], e["bare_epoch_s"], e["overhead_pct"], e["minimal_epoch_s"],
                 e["lightning_floor_pct"], e["module_pct"], e["in_batch_s"], e["steps_s"],
                 iters_cell(e["train_fwd_iters"], e["train_bwd_iters"])]
                for name, e in results["epoch"].items()]
        out.append(table("Lightning epoch vs the same epoch as a bare loop and through a minimal LightningModule "
                         "(second of two; medians)",
                         ["arch", "batches", "epoch s", "bare s", "overhead %", "minimal s", "Lightning %",
                          "module %", "in-batch s", "fixed-step sum s", "iters f/b"], rows))
    grouped: dict[str, list[str]] = {}
    for name, r in archs.items():
        for note in r["notes"]:
            grouped.setdefault(note, []).append(name)
    notes = [f"{note}: {', '.join(names)}" for note, names in grouped.items()] + results.get("skipped", [])
    if notes:
        out.append("Notes\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(out)


def memory_table(memory: dict[str, Any]) -> str:
    """The two memory series side by side."""
    cuda = memory["implicit"][0]["peak_cuda_mb"] is not None
    rows = []
    for imp, unr in zip(memory["implicit"], memory["unrolled"], strict=True):
        row = [imp["iters"], imp["saved_for_backward_mb"], unr["saved_for_backward_mb"]]
        row += [imp["peak_cuda_mb"], unr["peak_cuda_mb"]] if cuda else [imp["peak_rss_growth_mb"],
                                                                       unr["peak_rss_growth_mb"]]
        rows.append(row)
    kind = "peak CUDA MB" if cuda else "peak RSS growth MB"
    return table(f"Training-step memory, {memory['arch']}, iterations forced (tol 0): implicit vs unrolled backward",
                 ["iters", "saved MB implicit", "saved MB unrolled", f"{kind} implicit", f"{kind} unrolled"], rows)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def git_commit() -> str | None:
    """HEAD of the checkout (with "+dirty" for uncommitted changes to tracked files)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), or what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def meta(args: argparse.Namespace, argv: Sequence[str], device: torch.device) -> dict[str, Any]:
    """What ran where: command, versions, device, threads, load."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"command": "python scripts/bench.py " + shlex.join(argv), "git_commit": git_commit(),
            "torch": torch.__version__, "device": str(device), "device_name": name, "threads": args.threads,
            "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z")}


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="all", help="all, none, pcdeq, mondeq or comma-separated names: "
                                                   + ", ".join(ARCHS))
    p.add_argument("--plain", action="store_true", help="also time pcDEQ with every switch at its plain value")
    p.add_argument("--switch", action="append", default=[], metavar="KEY=VALUE",
                   help="also time the default path with this solver setting changed (repeatable), e.g. "
                        "skip_zero_product=false")
    p.add_argument("--reference", type=Path, help="checkout of the authors' pcDEQ code: time it beside ours")
    p.add_argument("--memory", action="store_true", help="implicit vs unrolled backward memory, forced iterations")
    p.add_argument("--memory-arch", default=MEMORY_ARCH, choices=[a for a in ARCHS if a.startswith("pcdeq")])
    p.add_argument("--epoch", action="store_true", help="Lightning epoch overhead")
    p.add_argument("--epoch-archs", default=",".join(EPOCH_ARCHS),
                   help="architectures of the --epoch run (those also benchmarked in this run)")
    p.add_argument("--epoch-repeats", type=int, default=3,
                   help="interleaved repetitions of the three --epoch runs (medians; --quick: 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, help="timed repetitions (default: per architecture)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps, at least 1 (default: per architecture)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 1 warm-up, tiny epoch/memory")
    p.add_argument("--batch", type=int, help="batch size instead of the paper's")
    p.add_argument("--width-scale", type=float, default=1.0, help="scale the hidden sizes (smoke tests)")
    p.add_argument("--tol", type=float, help="solver tolerance, both directions (0: exactly --max-iter)")
    p.add_argument("--max-iter", type=int, help="solver iteration cap, both directions")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--memory-point", nargs=2, metavar=("BACKWARD", "ITERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = args.repeats or 1, args.warmup or 1
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be at least 1")
    if args.epoch_repeats < 1:
        p.error("--epoch-repeats must be at least 1")
    try:
        args.switch = parse_switches(args.switch)
    except ValueError as err:
        p.error(str(err))
    return args


def parse_switches(items: Sequence[str]) -> dict[str, Any]:
    """``--switch KEY=VALUE`` items as SolverConfig changes (true/false, numbers, strings), checked against it.

    Raises:
        ValueError: an item without "=", a key that is not a solver setting, or a value it rejects.
    """
    fields = {f.name for f in dataclasses.fields(SolverConfig)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("solver.")
        if not sep or key not in fields:
            raise ValueError(f"--switch {item!r}: expected KEY=VALUE with KEY a solver setting "
                             f"(e.g. skip_zero_product=false); valid keys: {', '.join(sorted(fields))}")
        value: Any = {"true": True, "false": False}.get(raw.strip().lower(), raw.strip())
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
        changes[key] = value
    try:
        dataclasses.replace(SolverConfig(), **changes)
    except ConfigError as err:
        raise ValueError(f"--switch: {err}") from None
    return changes


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables, write the JSON and return the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":  # as our CPU runs do (pcdeq.training.pipeline.make_trainer) and the reference's script,
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # which never imports Lightning, does: no NVML probes
    if args.memory_point:
        point = memory_point(select_archs(args.archs)[0], args.memory_point[0], int(args.memory_point[1]), args,
                             device)
        print("MEMORY_POINT " + json.dumps(point), flush=True)
        return point
    archs = select_archs(args.archs)
    networks = import_reference(args.reference) if args.reference else None
    results: dict[str, Any] = {"meta": meta(args, argv, device), "archs": {}, "skipped": []}
    t0 = time.perf_counter()
    for arch in archs:
        results["archs"][arch.name] = bench_arch(arch, args, device, networks)
    if args.memory:
        results["memory"] = bench_memory(args)
    if args.epoch:
        results["epoch"] = {}
        for arch in select_archs(args.epoch_archs):
            if arch.name not in results["archs"]:
                results["skipped"].append(f"epoch: {arch.name} was not benchmarked in this run")
                continue
            progress(f"epoch: {arch.name}")
            bare = results["archs"][arch.name]["variants"]["best"]["train_ms"]
            results["epoch"][arch.name] = bench_epoch(arch, args, bare, device)
    results["meta"].update(wall_s=time.perf_counter() - t0, load_average_end=list(os.getloadavg()))
    print(report(results), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(finite(results), indent=1, allow_nan=False) + "\n")
    progress(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
