"""Startup checks of a run: every declared range and choice, the rules between keys, the output directory.

The valid values live beside the schema fields (``metadata=valid(...)`` in :mod:`pcdeq.training.schema`; the
solver group's in :func:`~pcdeq.training.schema.solver_schema`; the Trainer arguments in
:class:`~pcdeq.training.schema.TrainerKeys`). This module only reads those declarations, so declaring a range
is all it takes to get a new key checked. A failure is a :class:`~pcdeq.errors.ConfigError` (an unwritable output:
:class:`~pcdeq.errors.OutputError`) whose one-line message names the key, the value, the valid values and an
example, e.g. ``optim.lr=-0.1: out of range; valid: a number > 0, e.g. optim.lr=5e-4``.

Three places call it, in this order:

* :func:`check_command_line` (``train.py`` / ``eval.py``, before Hydra composes): the values typed on the command
  line, every value of a sweep included (``-m optim.lr=1e-3,-1`` fails before the first job starts), and nothing
  on disk is created;
* :class:`OutputDirCheck` (a Hydra callback, ``conf/hydra/default.yaml``): the run or sweep directory can be
  created and written, before Hydra creates it;
* :func:`validate_train` / :func:`validate_eval` (the first line of ``train()`` / ``evaluate()``): the composed
  config, values set in config files included, the rules between keys (a milestone past the last epoch, a
  validation split larger than the data), the model, the solver and a resumed checkpoint; before any data is read
  or any file is written.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pcdeq.dataset_specs import get_spec
from pcdeq.disk import NO_ROOM, free_space
from pcdeq.errors import ConfigError, OutputError, PcdeqUserError
from pcdeq.training.checkpoint import check_resume_checkpoint
from pcdeq.training.config import net_from_config
from pcdeq.training.device import check_devices
from pcdeq.training.schema import (
    DatasetConfig,
    EvalConfig,
    OptimConfig,
    SchedulerConfig,
    TrainConfig,
    TrainerKeys,
    solver_schema,
)

log = logging.getLogger("pcdeq")

# Where each schema sits in a composed config ("" is the top level).
TRAIN_GROUPS: dict[str, type] = {"": TrainConfig, "dataset": DatasetConfig, "optim": OptimConfig,
                                 "optim.scheduler": SchedulerConfig, "solver": solver_schema(), "trainer": TrainerKeys}
EVAL_GROUPS: dict[str, type] = {"": EvalConfig, "trainer": TrainerKeys}


def train_groups() -> dict[str, type]:
    """:data:`TRAIN_GROUPS` with the solver keys of every family registered by now (one registered later too)."""
    return {**TRAIN_GROUPS, "solver": solver_schema()}


# The keys each schedule needs (optim.scheduler.<key>).
SCHEDULE_KEYS = {"multistep": ("milestones",), "step": ("step_size",),
                 "onecycle": ("max_lr", "up_epochs", "down_epochs")}


# ---------------------------------------------------------------- declared rules


@dataclass(frozen=True)
class Interval:
    """A numeric interval parsed from its written form, e.g. "(0, inf)" or "[0, 1)"."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        text = text.strip()
        low, high = (float(part) for part in text[1:-1].split(","))
        return cls(low, high, text[0] == "[", text[-1] == "]")

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def describe(self) -> str:
        """"> 0", ">= 1", "in [0, 1)"."""
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else repr(v)

        if math.isinf(self.high) and not math.isinf(self.low):
            return f"{'>=' if self.low_closed else '>'} {num(self.low)}"
        left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
        return f"in {left}{num(self.low)}, {num(self.high)}{right}"


@dataclass(frozen=True)
class Rule:
    """The declared valid values of one dotted config key (built from a schema field and its metadata)."""

    key: str
    kinds: frozenset          # the scalar types the annotation allows (int, float, bool, str; object for Any)
    optional: bool            # None allowed
    is_list: bool
    interval: Interval | None
    fraction: Interval | None
    choices: tuple[str, ...]
    special: tuple[Any, ...]
    length: int | None
    example: str

    def describe(self) -> str:
        """What a valid value looks like, in words."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        integer = (int in self.kinds and float not in self.kinds) or object in self.kinds  # open types: int counts
        what = "an integer" if integer or self.fraction else "a number"
        text = f"{what} {self.interval.describe()}" if self.interval else what
        if self.fraction:
            text += f" or a fraction {self.fraction.describe()}"
        if self.special:
            text += "".join(f" or {s}" for s in self.special)
        if bool in self.kinds:
            text = f"true, false or {text}"
        if self.is_list:
            count = f"{self.length} " if self.length else ""
            text = f"a list of {count}values, each {text}"
        return text


def _annotation_kinds(annotation: Any) -> tuple[frozenset, bool, bool]:
    """(scalar types, optional, is_list) of a field annotation such as ``int | None`` or ``list[float]``."""
    if annotation is Any:
        return frozenset({object}), True, False
    origin = typing.get_origin(annotation)
    if origin is list:
        return frozenset(typing.get_args(annotation)), False, True
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return frozenset(a for a in args if a is not type(None)), type(None) in args, False
    return frozenset({annotation}), False, False


def schema_rules(groups: Mapping[str, type]) -> dict[str, Rule]:
    """Every declared rule of the given schemas, keyed by dotted config key."""
    rules: dict[str, Rule] = {}
    for prefix, schema in groups.items():
        hints = typing.get_type_hints(schema)
        for f in fields(schema):
            meta = f.metadata
            if not (meta.get("valid") or meta.get("choices")):
                continue
            kinds, optional, is_list = _annotation_kinds(hints[f.name])
            key = f"{prefix}.{f.name}" if prefix else f.name
            rules[key] = Rule(
                key=key, kinds=kinds, optional=optional, is_list=is_list,
                interval=Interval.parse(meta["valid"]) if meta.get("valid") else None,
                fraction=Interval.parse(meta["fraction"]) if meta.get("fraction") else None,
                choices=tuple(meta.get("choices") or ()), special=tuple(meta.get("special") or ()),
                length=meta.get("length"), example=str(meta.get("example", "")))
    return rules


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _bad(rule: Rule, value: Any, problem: str) -> ConfigError:
    return ConfigError(f"{rule.key}={_shown(value)}: {problem}; valid: {rule.describe()}, "
                       f"e.g. {rule.key}={rule.example}")


def _number(rule: Rule, value: Any) -> tuple[float, bool] | None:
    """(value, is_integer) of a number the key's type accepts (a numeric string as OmegaConf converts it)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        for convert in (int, float):
            try:
                value = convert(value.strip())
                break
            except ValueError:
                continue
        else:
            return None
    if isinstance(value, int):
        return float(value), True
    if isinstance(value, float):
        # an int key takes a float only as a fraction (limit_*_batches) or when the type is open (Any)
        if float in rule.kinds or object in rule.kinds or rule.fraction:
            return value, False
        return None
    return None


def _check_scalar(rule: Rule, value: Any) -> None:
    if rule.choices:
        if bool in rule.kinds:  # a switch (choices true, false): a real boolean, as Hydra parses true / false
            if not isinstance(value, bool):
                raise _bad(rule, value, "not true or false")
        elif not (isinstance(value, str) and value in rule.choices):
            raise _bad(rule, value, "unknown choice")
        return
    if value in rule.special and not isinstance(value, bool):
        return
    if isinstance(value, bool):
        if bool in rule.kinds or object in rule.kinds:
            return
        raise _bad(rule, value, "not a number")
    if object in rule.kinds and not isinstance(value, (int, float)):
        return  # an open type (devices: "auto", [0, 1]): only numbers are checked
    parsed = _number(rule, value)
    if parsed is None:
        integer = int in rule.kinds and float not in rule.kinds and not rule.fraction
        raise _bad(rule, value, "not an integer" if integer else "not a number")
    number, is_int = parsed
    interval = rule.interval if is_int or not rule.fraction else rule.fraction
    if interval is not None and number not in interval:
        raise _bad(rule, value, "out of range")


def check_value(rule: Rule, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is valid for ``rule``."""
    if value is None:
        if rule.optional:
            return
        raise _bad(rule, value, "must be set")
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: checked once composed and resolved
    if rule.is_list:
        if not isinstance(value, (list, tuple)):
            raise _bad(rule, value, "not a list")
        if rule.length is not None and len(value) != rule.length:
            raise _bad(rule, value, f"needs {rule.length} values")
        for item in value:
            try:
                _check_scalar(rule, item)
            except ConfigError:
                raise _bad(rule, value, f"{_shown(item)} is not valid") from None
        return
    _check_scalar(rule, value)


# ---------------------------------------------------------------- the command line


def _override_key(text: str) -> str:
    return text.split("=", 1)[0].lstrip("+~")


def _check_group_choice(conf_dir: Path, group: str, value: Any) -> None:
    """A config group choice (``model=pcdeq_linear``) names a file of ``conf/<group>/``."""
    options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    if not isinstance(value, str) or value not in options:
        example = "pcdeq_conv" if "pcdeq_conv" in options else options[0]
        raise ConfigError(f"{group}={_shown(value)}: unknown choice (no conf/{group}/{_shown(value)}.yaml); "
                          f"valid: one of {', '.join(options)}, e.g. {group}={example}")


def validate_overrides(argv: Sequence[str], task: str = "train", conf_dir: str | os.PathLike[str] | None = None
                       ) -> None:
    """Check the command-line overrides that have a declared rule (each value of a sweep), and group choices.

    Arguments that are not ``key=value`` overrides (``-m``, ``--config-name``, ...) and keys without a rule are
    left to Hydra. With ``conf_dir``, a choice of one of its config groups (``model=...``, ``dataset=...``) must
    name one of the group's files (Hydra's own groups, ``hydra/...``, and runs that extend ``hydra.searchpath``
    are left to Hydra). Raises :class:`ConfigError` on the first bad value.
    """
    rules = schema_rules(train_groups() if task == "train" else EVAL_GROUPS)
    groups: set[str] = set()
    if conf_dir is not None and not any(_override_key(a) == "hydra.searchpath" for a in argv):
        groups = {p.name for p in Path(conf_dir).iterdir() if p.is_dir() and p.name != "hydra"}
    parser = OverridesParser.create()
    for arg in argv:
        key = _override_key(arg)
        if arg.startswith("-") or "=" not in arg or (key not in rules and key not in groups):
            continue
        try:
            override = parser.parse_overrides([arg])[0]
        except HydraException:
            continue  # Hydra reports its own syntax errors
        if override.package is not None or override.is_delete() or override.is_interval_sweep():
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if key in groups:
                _check_group_choice(Path(str(conf_dir)), key, value)
            else:
                check_value(rules[override.key_or_group], value)


def check_command_line(argv: Sequence[str], task: str = "train", conf_dir: str | os.PathLike[str] | None = None
                       ) -> None:
    """:func:`validate_overrides` for an entry point: a bad value prints one line and exits with status 2."""
    try:
        validate_overrides(argv, task, conf_dir)
    except PcdeqUserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- the composed config


def _select(config: Mapping, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_declared(config: Mapping, groups: Mapping[str, type]) -> None:
    """Check every key of ``config`` that has a declared rule."""
    for key, rule in schema_rules(groups).items():
        present, value = _select(config, key)
        if present:
            check_value(rule, value)


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of the running Hydra job (None outside one: library use)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return None


def _schedule_may_be_cut(overrides: Sequence[str] | None) -> bool:
    """Whether a schedule reaching past the last epoch is a deliberately shortened run, not a mistake.

    True when the command line shortened ``trainer.max_epochs`` without touching the schedule (a smoke run of a
    protocol), or when the provenance is unknown (library use, ``overrides=None``).
    """
    if overrides is None:
        return True
    keys = {_override_key(o) for o in overrides}
    return "trainer.max_epochs" in keys and not any(k.startswith("optim.scheduler") for k in keys)


def check_schedule(config: Mapping, overrides: Sequence[str] | None) -> None:
    """The active schedule has its parameters and fits in ``trainer.max_epochs``."""
    rules = schema_rules({"optim.scheduler": SchedulerConfig})
    sched = config.get("optim", {}).get("scheduler") or {}
    name = sched.get("name", "constant")
    for key in SCHEDULE_KEYS.get(name, ()):
        if sched.get(key) is None:
            rule = rules[f"optim.scheduler.{key}"]
            raise ConfigError(f"{rule.key}=null: required by optim.scheduler.name={name}; valid: "
                              f"{rule.describe()}, e.g. {rule.key}={rule.example}")
    epochs = config.get("trainer", {}).get("max_epochs")
    if not isinstance(epochs, int) or config["trainer"].get("fast_dev_run"):
        return
    if name == "multistep":
        key, value, late = "milestones", sched["milestones"], [m for m in sched["milestones"] if m >= epochs]
    elif name == "step":
        key, value, late = "step_size", sched["step_size"], [sched["step_size"]] if sched["step_size"] >= epochs else []
    elif name == "onecycle":
        total = sched["up_epochs"] + sched["down_epochs"]
        key, value, late = "up_epochs", sched["up_epochs"], [total] if total > epochs else []
    else:
        return
    if not late:
        return
    what = (f"optim.scheduler.{key}={_shown(value)}" if name != "onecycle" else
            f"optim.scheduler.up_epochs + down_epochs = {sched['up_epochs'] + sched['down_epochs']}")
    if _schedule_may_be_cut(overrides):
        log.info("%s reaches past the last epoch (trainer.max_epochs=%s): the schedule is cut short", what, epochs)
        return
    if epochs < 2:
        valid, example = "none (a one-epoch run has no room for a schedule)", "optim.scheduler.name=constant"
    elif name == "multistep":
        valid, example = f"epochs in [1, {epochs - 1}]", f"optim.scheduler.milestones=[{epochs * 3 // 4}]"
    elif name == "step":
        valid, example = f"an integer in [1, {epochs - 1}]", f"optim.scheduler.step_size={max(1, epochs // 3)}"
    else:
        valid = f"up_epochs + down_epochs <= {epochs}"
        example = f"optim.scheduler.up_epochs={epochs // 2} optim.scheduler.down_epochs={epochs - epochs // 2}"
    raise ConfigError(f"{what}: past the last epoch (trainer.max_epochs={epochs}); valid: {valid}, e.g. {example}")


def check_val_size(config: Mapping) -> None:
    """The validation split leaves training data (checked from the known dataset sizes, before loading)."""
    d = config["dataset"]
    spec = get_spec(d["name"])  # ConfigError listing the valid names
    n = int(d["synthetic_size"][0]) if d.get("synthetic") else spec.train_size
    if n is not None and int(d.get("val_size") or 0) >= n:
        source = "synthetic training images" if d.get("synthetic") else "training images"
        raise ConfigError(f"dataset.val_size={d['val_size']}: leaves no training data ({d['name']} has {n} "
                          f"{source}); valid: an integer in [0, {n - 1}], e.g. dataset.val_size={n // 10}")


PROBE_BYTES = 16 * 1024  # Hydra's config.yaml, hydra.yaml and overrides.yaml of a run, with room to spare


def check_writable_dir(path: str | os.PathLike[str], what: str, fix: str) -> None:
    """Raise :class:`OutputError` unless ``path`` is, or can be created as, a writable directory.

    Creates nothing: the nearest existing ancestor must be a directory in which a file can be written (a probe
    file is created and removed; permission bits alone say nothing for root or on read-only mounts). The probe
    holds ``PROBE_BYTES``, what Hydra writes into a new run directory before the run starts (its configs), so a
    full disk is this one line rather than a failure inside Hydra.
    """
    target = Path(path).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create the {what} {target}: {existing} is a file, not a directory; fix: {fix}")
    probe = None
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".pcdeq-write-test-")
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        room = f" ({NO_ROOM[e.errno]}; {free_space(existing)})" if e.errno in NO_ROOM else ""
        first = "free space, or " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OutputError(f"cannot write the {what} {target}: {e.strerror} in {existing}{room}; "
                          f"fix: {first}{fix}") from None
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)


RUN_DIR_FIX = "pass hydra.run.dir=<a writable directory>, or set paths.log_dir=... (or the env var PCDEQ_LOG_DIR)"


def validate_train(config: Mapping, overrides: Sequence[str] | None = None) -> None:
    """All startup checks of a training run, on the resolved config; reads no data and writes nothing.

    Args:
        config: the resolved config (plain dict).
        overrides: the command-line overrides, when known: they tell a protocol shortened on purpose
            (``trainer.max_epochs=3``) from a schedule set past the end by mistake.
    """
    check_declared(config, train_groups())
    check_schedule(config, overrides)
    check_val_size(config)
    check_devices(config)
    net_from_config(config)  # the family's own checks: architecture, activation, channels, solver names
    check_writable_dir(config["paths"]["output_dir"], "run directory", RUN_DIR_FIX)
    if config.get("ckpt_path"):
        check_resume_checkpoint(config)


def validate_eval(config: Mapping) -> None:
    """All startup checks of an evaluation, on the resolved eval config (the checkpoint is read by evaluate)."""
    check_declared(config, EVAL_GROUPS)
    check_devices(config)
    check_writable_dir(config["paths"]["output_dir"], "run directory", RUN_DIR_FIX)


# ---------------------------------------------------------------- Hydra's output directories


class OutputDirCheck(Callback):
    """Hydra callback: the run (or sweep) directory can be created and written, checked before Hydra creates it.

    Without it an unwritable ``hydra.run.dir`` or ``paths.log_dir`` ends in Hydra's traceback. A failure prints
    one line and exits with status 2, like every user error.
    """

    def _check(self, config: DictConfig, key: str) -> None:
        try:
            path = str(config.hydra[key].dir)
        except Exception:  # an unresolvable directory: Hydra reports it itself
            return
        try:
            check_writable_dir(path, "run directory" if key == "run" else "sweep directory", RUN_DIR_FIX.replace(
                "hydra.run.dir", f"hydra.{key}.dir"))
        except OutputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep")
