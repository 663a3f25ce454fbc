"""Structured-config schemas: the types and defaults of every config group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` start from these schemas (``defaults: [schema, _self_]``), so a mistyped key
(``optim.lrr=1``) or a value of the wrong type (``seed=abc``) fails at composition with Hydra's own message,
before anything runs. The schemas of the ``model`` group are built from each registered family's options
dataclass (:attr:`pcdeq.family.Family.options`); the schema of the ``solver`` group holds the shared keys of
:class:`pcdeq.solver.config.SolverConfig` and every registered family's solver keys, flat (:func:`solver_schema`),
so each is ``solver.<key>`` on the command line whichever family reads it.

The valid range of every numeric key (and the names of every choice key) is declared beside its field,
``field(default=..., metadata=valid("(0, inf)", "5e-4"))``; :mod:`pcdeq.training.validate` reads these
declarations and checks a run's values before anything runs. The ``trainer`` group is Lightning's Trainer
(about fifty arguments, so it has no schema and takes any of them); :class:`TrainerKeys` declares the ranges of
the ones this project uses, and is used only for that check.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pcdeq.family import FAMILIES, Family, solver_fields
from pcdeq.training.optim import OPTIMIZERS, SCHEDULES

UINT32_MAX = 2**32 - 1  # seeds are 32-bit
BOOL_CHOICES = ("true", "false")  # a switch: its rule takes true or false only (yes, on, 1 and the like are errors)
PRECISION_CHOICES = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")  # Lightning's names


def valid(interval: str = "", example: str = "", *, choices: tuple[str, ...] = (), special: tuple[Any, ...] = (),
          fraction: str = "", length: int | None = None) -> dict[str, Any]:
    """Field metadata declaring a key's valid values (read by :mod:`pcdeq.training.validate`).

    Args:
        interval: the valid numbers, e.g. "(0, inf)", "[1, inf)", "[0, 1)"; for a list, each element's.
        example: a valid value, shown in the message of a bad one.
        choices: the valid names of a string key.
        special: values accepted besides the interval (e.g. -1, "no limit").
        fraction: for keys that take an integer count or a float fraction (limit_*_batches), the fraction's
            interval; the integer interval is ``interval``.
        length: the required length of a list.
    """
    return {"valid": interval, "example": example, "choices": tuple(choices), "special": tuple(special),
            "fraction": fraction, "length": length}


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
    synthetic_size: list[int] = field(default_factory=lambda: [1024, 256],  # (train, test)
                                      metadata=valid("[1, inf)", "[1024,256]", length=2))
    # > 0 holds out a validation split (fixed generator) for model selection
    val_size: int = field(default=0, metadata=valid("[0, inf)", "5000"))
    # null: 0 on a CPU (in-memory data: workers only compete with the solver for cores), 4 on a GPU
    num_workers: int | None = field(default=None, metadata=valid("[0, inf)", "4"))
    batch_size: int = field(default=64, metadata=valid("[1, inf)", "64"))  # training batch (the protocol sets it)
    # validation/test batch; null: batch_size
    eval_batch_size: int | None = field(default=None, metadata=valid("[1, inf)", "256"))
    pin_memory: bool | None = None  # DataLoader pin_memory; null: on for GPU runs (pcdeq.training.device)
    normalize: bool = True        # Normalize(mean, std) after scaling to [0, 1] (the protocol sets it)


@dataclass
class SchedulerConfig:
    """A learning-rate schedule (see :mod:`pcdeq.training.optim`); keys of other schedules are ignored."""

    name: str = field(default="constant", metadata=valid(example="multistep", choices=SCHEDULES))
    # multistep: epochs of each x gamma (increasing, before the last epoch)
    milestones: list[int] = field(default_factory=list, metadata=valid("[1, inf)", "[30]"))
    gamma: float = field(default=0.1, metadata=valid("(0, 1]", "0.1"))  # multistep, step
    step_size: int | None = field(default=None, metadata=valid("[1, inf)", "10"))  # step: x gamma every n epochs
    max_lr: float | None = field(default=None, metadata=valid("(0, inf)", "1e-2"))  # onecycle: peak lr
    up_epochs: int | None = field(default=None, metadata=valid("[1, inf)", "30"))  # onecycle: epochs of the rise
    down_epochs: int | None = field(default=None, metadata=valid("[1, inf)", "30"))  # onecycle: epochs of the fall
    # onecycle: Adam beta1 at base / peak lr
    beta1: list[float] = field(default_factory=lambda: [0.95, 0.85],
                               metadata=valid("[0, 1)", "[0.95,0.85]", length=2))


@dataclass
class OptimConfig:
    """The ``optim`` group: optimiser and schedule."""

    name: str = field(default=MISSING, metadata=valid(example="adamw", choices=tuple(OPTIMIZERS)))
    lr: float = field(default=1e-3, metadata=valid("(0, inf)", "5e-4"))
    weight_decay: float = field(default=0.0, metadata=valid("[0, inf)", "1e-2"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999],  # adam, adamw
                               metadata=valid("[0, 1)", "[0.9,0.999]", length=2))
    fused: bool = True  # adam, adamw: the fused update (false: torch's per-tensor loop; same update up to rounding)
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
    seed: int = field(default=0, metadata=valid(f"[0, {UINT32_MAX}]", "0"))
    ckpt_path: str | None = None
    test_every_epoch: bool = True
    num_threads: int | None = field(default=None, metadata=valid("[1, inf)", "1"))
    certificate_every_n_steps: int = field(default=20, metadata=valid("[0, inf)", "20"))  # 0: never
    # reproduction runs: do not train again what already completed (same run_key), skip what another process runs
    skip_if_done: bool = field(default=False, metadata=valid(example="true", choices=BOOL_CHOICES))
    auto_resume: bool = False     # reproduction runs: resume an interrupted run from its last.ckpt
    tf32: bool = False            # TensorFloat-32 matrix products and convolutions on a GPU (pcdeq.training.device)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    paths: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    solver: Any = MISSING
    optim: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    callbacks: Any = MISSING


def solver_schema() -> type:
    """The ``solver`` group's schema: the shared solver keys and every registered family's, with their ranges.

    Named SolverConfig, as the shared class is, so Hydra's messages about a solver key name the same schema.
    """
    entries = [(name, typing.get_type_hints(owner)[name], field(default=f.default, metadata=f.metadata))
               for name, (owner, f) in solver_fields().items()]
    return make_dataclass("SolverConfig", entries)


def solver_overrides() -> type:
    """Every solver key of :func:`solver_schema`, optional: eval.py applies the ones given over the checkpoint's."""
    return make_dataclass("SolverOverrides", [(name, hint | None, field(default=None))
                                              for name, hint in typing.get_type_hints(solver_schema()).items()])


SolverOverrides = solver_overrides()  # the keys of the families registered when this module is imported


@dataclass
class EvalConfig:
    """Top-level keys of ``conf/eval.yaml``: the model, data and solver come from the checkpoint."""

    task_name: str = "eval"
    ckpt_path: str = MISSING
    solver: Any = field(default_factory=SolverOverrides)  # e.g. solver.fwd_tol=1e-2: evaluate at another tolerance
    data_dir: str | None = None   # optional overrides of the checkpoint's dataset settings (null keeps them)
    synthetic: bool | None = None
    batch_size: int | None = field(default=None, metadata=valid("[1, inf)", "256"))
    download: bool | None = None
    num_workers: int | None = field(default=None, metadata=valid("[0, inf)", "4"))
    num_threads: int | None = field(default=None, metadata=valid("[1, inf)", "1"))  # null: torch's default
    # reproduction sweeps: do not evaluate again what already completed (same run_key), skip what another runs
    skip_if_done: bool = field(default=False, metadata=valid(example="true", choices=BOOL_CHOICES))
    paths: Any = MISSING
    trainer: Any = MISSING


@dataclass
class TrainerKeys:
    """Ranges of the Lightning Trainer arguments this project sets (checked only; other arguments pass through).

    Not registered as a schema: the ``trainer`` group accepts any Trainer argument (``+trainer.<name>=...``).
    """

    max_epochs: int = field(default=40, metadata=valid("[1, inf)", "40"))
    max_steps: int = field(default=-1, metadata=valid("[1, inf)", "1000", special=(-1,)))  # -1: no limit
    # null: all batches; an integer: that many batches; a float: that fraction of them
    limit_train_batches: int | float | None = field(default=None, metadata=valid("[1, inf)", "10", fraction="(0, 1]"))
    limit_val_batches: int | float | None = field(default=None, metadata=valid("[0, inf)", "10", fraction="[0, 1]"))
    limit_test_batches: int | float | None = field(default=None, metadata=valid("[0, inf)", "10", fraction="[0, 1]"))
    devices: Any = field(default=1, metadata=valid("[1, inf)", "1", special=(-1,)))  # -1: all; also "auto", [0,1]
    # Lightning's precision plugin (bf16-mixed: autocast around the step); solver.precision is the fixed point's own
    precision: str = field(default="32-true", metadata=valid(example="bf16-mixed", choices=PRECISION_CHOICES))
    accumulate_grad_batches: int = field(default=1, metadata=valid("[1, inf)", "1"))
    check_val_every_n_epoch: int | None = field(default=1, metadata=valid("[1, inf)", "1"))
    log_every_n_steps: int = field(default=1, metadata=valid("[1, inf)", "1"))
    gradient_clip_val: float | None = field(default=None, metadata=valid("[0, inf)", "1.0"))  # 0: no clipping
    num_sanity_val_steps: int = field(default=0, metadata=valid("[0, inf)", "2", special=(-1,)))  # -1: all
    fast_dev_run: bool | int = field(default=False, metadata=valid("[0, inf)", "true"))  # true or a batch count


def model_schema(family: Family) -> type:
    """The schema of a family's model files: :class:`ModelConfig` plus the family's options dataclass."""
    extra = []
    if family.options is not None:
        hints = typing.get_type_hints(family.options)  # the real types (the module may use postponed annotations)
        extra = [(f.name, hints[f.name], field(default=f.default)) for f in fields(family.options)]
    return make_dataclass(f"{family.name.capitalize()}ModelConfig", extra, bases=(ModelConfig,))


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; families registered later call it again, so that
    their model options and solver keys compose)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig(solver=solver_overrides()()))
    cs.store(group="dataset", name="schema", node=DatasetConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="solver", name="schema", node=solver_schema())
    for family in FAMILIES.values():
        cs.store(group="model", name=f"{family.name}_schema", node=model_schema(family))


register_schemas()
