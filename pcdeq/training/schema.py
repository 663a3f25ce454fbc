"""Structured-config schemas: the types and defaults of every config group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` start from these schemas (``defaults: [schema, _self_]``), so a mistyped key
(``optim.lrr=1``) or a value of the wrong type (``seed=abc``) fails at composition with Hydra's own message,
before anything runs. The schemas of the ``model`` group are built from each registered family's options
dataclass (:attr:`pcdeq.family.Family.options`); the ``solver`` group uses :class:`pcdeq.solvers.SolverConfig`
itself, the one shape of solver settings.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pcdeq.family import FAMILIES, Family
from pcdeq.solvers import SolverConfig


@dataclass
class ModelConfig:
    """Keys every model family has; each family adds its options (see :func:`model_schema`)."""

    family: str = MISSING
    arch: str = MISSING
    name: str = "${model.family}_${model.arch}"
    channels: Any = "${paper_channels:${model.family},${model.arch},${dataset.name}}"  # int or list of ints


@dataclass
class DatasetConfig:
    """The ``dataset`` group: what to load and how to batch it."""

    name: str = MISSING
    data_dir: str = "${paths.data_dir}"
    download: bool = True         # torchvision downloads when online; off: missing files give one clear error
    synthetic: bool = False       # random tensors of the dataset's shape (smoke runs, throughput); never silent
    synthetic_size: list[int] = field(default_factory=lambda: [1024, 256])  # (train, test)
    val_size: int = 0             # > 0 holds out a validation split (fixed generator) for model selection
    num_workers: int = 0          # in-memory data: workers only compete with the solver for CPU; try 4+ on GPU
    batch_size: int = 64          # training batch (the protocol sets it)
    eval_batch_size: int | None = None  # validation/test batch; null: batch_size
    pin_memory: bool = False      # DataLoader pin_memory (GPU runs)
    normalize: bool = True        # Normalize(mean, std) after scaling to [0, 1] (the protocol sets it)


@dataclass
class SchedulerConfig:
    """A learning-rate schedule (see :mod:`pcdeq.training.optim`); keys of other schedules are ignored."""

    name: str = "constant"        # multistep | step | onecycle | constant
    milestones: list[int] = field(default_factory=list)   # multistep: epochs of each x gamma
    gamma: float = 0.1            # multistep, step
    step_size: int | None = None  # step: x gamma every step_size epochs
    max_lr: float | None = None   # onecycle: peak lr
    up_epochs: int | None = None  # onecycle: epochs of the linear rise
    down_epochs: int | None = None  # onecycle: epochs of the linear fall
    beta1: list[float] = field(default_factory=lambda: [0.95, 0.85])  # onecycle: Adam beta1 at base / peak lr


@dataclass
class OptimConfig:
    """The ``optim`` group: optimiser and schedule."""

    name: str = MISSING           # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class ProtocolConfig:
    """Which training protocol the run follows (set by ``conf/protocol/``; recorded in results.json)."""

    name: str | None = None       # the protocol set, e.g. pcdeq or mondeq_conv
    source: str | None = None     # where its values come from
    dataset: str | None = None    # the dataset whose values were applied (null: none, group defaults)
    published: bool | None = None  # false: this project's choice or an assumption (see note)
    note: str | None = None


@dataclass
class TrainConfig:
    """Top-level keys of ``conf/train.yaml`` (the groups are typed by their own schemas)."""

    task_name: str = "train"
    experiment_name: str = "${model.name}_${dataset.name}"
    tags: list[str] = field(default_factory=list)
    seed: int = 0
    ckpt_path: str | None = None
    test_every_epoch: bool = True
    num_threads: int | None = None
    certificate_every_n_steps: int = 20
    skip_if_done: bool = False    # reproduction runs: do not train again what already completed (same run_key)
    auto_resume: bool = False     # reproduction runs: resume an interrupted run from its last.ckpt
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    paths: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    solver: Any = MISSING
    optim: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    callbacks: Any = MISSING


# Every SolverConfig key, optional: eval.py applies the ones given over the checkpoint's solver settings.
SolverOverrides = make_dataclass(
    "SolverOverrides",
    [(f.name, hint | None, field(default=None))
     for f, hint in ((f, typing.get_type_hints(SolverConfig)[f.name]) for f in fields(SolverConfig))],
)


@dataclass
class EvalConfig:
    """Top-level keys of ``conf/eval.yaml``: the model, data and solver come from the checkpoint."""

    task_name: str = "eval"
    ckpt_path: str = MISSING
    solver: Any = field(default_factory=SolverOverrides)  # e.g. solver.fwd_tol=1e-2: evaluate at another tolerance
    data_dir: str | None = None   # optional overrides of the checkpoint's dataset settings (null keeps them)
    synthetic: bool | None = None
    batch_size: int | None = None
    download: bool | None = None
    num_workers: int | None = None
    num_threads: int | None = None  # torch.set_num_threads(n); null keeps torch's default
    paths: Any = MISSING
    trainer: Any = MISSING


def model_schema(family: Family) -> type:
    """The schema of a family's model files: :class:`ModelConfig` plus the family's options dataclass."""
    extra = []
    if family.options is not None:
        hints = typing.get_type_hints(family.options)  # the real types (the module may use postponed annotations)
        extra = [(f.name, hints[f.name], field(default=f.default)) for f in fields(family.options)]
    return make_dataclass(f"{family.name.capitalize()}ModelConfig", extra, bases=(ModelConfig,))


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; families registered later can call it again)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(group="dataset", name="schema", node=DatasetConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="solver", name="schema", node=SolverConfig)
    for family in FAMILIES.values():
        cs.store(group="model", name=f"{family.name}_schema", node=model_schema(family))


register_schemas()
