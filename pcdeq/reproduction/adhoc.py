"""Ad-hoc comparison tables: completed runs that no table spec claims, grouped by what differs between them.

A run's *configuration* is its resolved config (``config_resolved.yaml`` in the run directory, flattened to
dotted keys) overlaid with the identity overrides it was launched with; an evaluation's is the configuration of
the training run it evaluated, overlaid with its ``solver.*`` settings. Runs are first separated by task,
family, dataset and model (never averaged together), then, within each such group:

* the *varying keys* are the configuration keys whose value is not the same in every run, except the seed and
  the keys that say where or how a run executes (``paths.*``, ``trainer.accelerator``, ...);
* a key that only restates another (``model.variant`` follows ``model.activation``) is dropped: keys are taken
  in order, keys the user overrode first, and each must split the runs further than the keys before it;
* one row per distinct combination of the varying keys, sorted by them (numerically where every value is a
  number); the runs of a row differ only by seed and are the sample its statistics are taken over.

``group_by`` replaces the inferred keys by the caller's (any dotted configuration key).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pcdeq.errors import ConfigError
from pcdeq.results import EXECUTION_KEYS, canonical_value, identity_overrides

SEPARATE_BY = ("task", "family", "dataset", "model")
# keys that never make two runs different configurations (where and how a run executed, its bookkeeping)
NOT_CONFIGURATION = ("seed", "experiment_name", "task_name", "tags")
NOT_CONFIGURATION_GROUPS = ("paths", "hydra", "logger", "callbacks")
MISSING = "-"


@dataclass
class AdhocTable:
    """One ad-hoc table: the runs of one (task, family, dataset, model) and their rows.

    Attributes:
        group: the separating values, e.g. ``{"task": "train", "model": "pcdeq_linear", ...}``.
        keys: the varying (or requested) configuration keys, one column each.
        rows: (the row's value of every key, the row's runs), sorted by the values.
    """

    group: dict[str, str]
    keys: list[str]
    rows: list[tuple[tuple[str, ...], list[dict]]] = field(default_factory=list)


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list):
        return {prefix[:-1]: canonical_value("[" + ",".join(str(v) for v in value) + "]")}
    return {prefix[:-1]: MISSING if value is None else canonical_value(str(value))}


def _resolved_config(run_dir: Path) -> dict[str, str]:
    try:
        raw = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return _flatten(raw) if isinstance(raw, dict) else {}


def _overridden(res: dict) -> dict[str, str]:
    return dict(o.split("=", 1) for o in identity_overrides(res.get("overrides") or []) if "=" in o)


def run_configuration(res: dict) -> dict[str, str]:
    """The flattened configuration of a completed run or evaluation (values canonical strings)."""
    if res.get("task") == "eval":
        source = Path(str(res.get("checkpoint") or "")).parent.parent
        source_res: dict = {"overrides": []}
        try:
            source_res = json.loads((source / "results.json").read_text())
        except (OSError, ValueError):
            pass
        config = {**_resolved_config(source), **_overridden(source_res), **_overridden(res)}
        config.update({f"solver.{k}": canonical_value(str(v)) for k, v in (res.get("solver_overrides") or {}).items()})
        return config
    return {**_resolved_config(Path(str(res.get("run_dir") or ""))), **_overridden(res)}


def _is_configuration(key: str) -> bool:
    return (key not in NOT_CONFIGURATION and key not in EXECUTION_KEYS
            and key.split(".", 1)[0] not in NOT_CONFIGURATION_GROUPS)


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def is_numeric(values: Sequence[str]) -> bool:
    """Whether every value (missing ones aside) reads as a finite number, and at least one does."""
    present = [v for v in values if v != MISSING]
    return bool(present) and all(_number(v) is not None for v in present)


def sort_key(column: Sequence[str]) -> pd.Series:
    """Numeric order for a numeric column, text order otherwise (missing values last)."""
    numeric = is_numeric(column)
    return pd.Series([(1, 0.0, "") if v == MISSING else (0, _number(v) or 0.0, "") if numeric else (0, 0.0, v)
                      for v in column], index=getattr(column, "index", None))


def _is_location(column: pd.Series) -> bool:
    """Whether every value is an absolute path: where a run wrote (its directory), not what it computed."""
    present = [v for v in column if v != MISSING]
    return bool(present) and all(v.startswith("/") for v in present)


def infer_keys(config: pd.DataFrame, overridden: Sequence[str]) -> list[str]:
    """The keys that vary between the rows of ``config`` (one run per row), redundant ones dropped.

    A key the config derives from the run's own directory (every value an absolute path, e.g.
    ``trainer.default_root_dir``) is not a configuration unless the user set it. ``overridden``: the keys the
    user set on the command line, in their order; they come first.
    """
    varying = [k for k in config.columns if _is_configuration(k) and config[k].nunique(dropna=False) > 1
               and (k in overridden or not _is_location(config[k]))]
    # the user's own keys first, in the order they wrote them; then the ones the config groups imply
    ordered = [k for k in overridden if k in varying] + sorted(k for k in varying if k not in overridden)
    kept: list[str] = []
    groups = 1
    for key in ordered:
        n = config.groupby([*kept, key], dropna=False).ngroups
        if n > groups:
            kept.append(key)
            groups = n
    return kept


def configuration_frame(runs: Sequence[dict]) -> pd.DataFrame:
    """One row per run, one column per configuration key (missing keys :data:`MISSING`)."""
    return pd.DataFrame([run_configuration(r) for r in runs]).fillna(MISSING)


def check_keys(config: pd.DataFrame, keys: Sequence[str]) -> None:
    """Raise a ConfigError naming the keys that exist when one of ``keys`` is in no run's configuration."""
    absent = [k for k in keys if k not in config.columns or (config[k] == MISSING).all()]
    if absent:
        varying = [k for k in config.columns if _is_configuration(k) and config[k].nunique() > 1
                   and not _is_location(config[k])]
        close = {c for k in absent for c in difflib.get_close_matches(k, list(config.columns), n=1, cutoff=0.85)}
        hint = f"; did you mean {', '.join(sorted(close))}?" if close else ""
        raise ConfigError(
            f"--group-by {','.join(absent)}: no run has this key. Keys that vary between the runs: "
            f"{', '.join(sorted(varying)) or 'none'}; any of the {len(config.columns)} keys of a run's "
            f"config_resolved.yaml can be grouped by{hint}")


def build_adhoc(runs: Sequence[dict], group_by: Sequence[str] | None = None) -> list[AdhocTable]:
    """Separate ``runs`` by task, family, dataset and model, then group each part into rows (module docstring).

    Raises:
        ConfigError: a ``group_by`` key that no run has.
    """
    if not runs:
        return []
    config = configuration_frame(runs)
    if group_by:
        check_keys(config, group_by)
    separating = pd.DataFrame([{k: str(r.get(k) or MISSING) for k in SEPARATE_BY} for r in runs])
    overridden = list(dict.fromkeys([*(k for r in runs for k in _overridden(r)),
                                     *(f"solver.{k}" for r in runs for k in r.get("solver_overrides") or {})]))
    tables = []
    for values, part in separating.groupby(list(SEPARATE_BY), sort=True):
        idx = list(part.index)
        sub = config.loc[idx].reset_index(drop=True)
        keys = list(group_by) if group_by else infer_keys(sub, overridden)
        table = AdhocTable(dict(zip(SEPARATE_BY, values, strict=True)), keys)
        if keys:
            sub = sub.reindex(columns=sorted(set(sub.columns) | set(keys)), fill_value=MISSING)
            order = sub.sort_values(keys, key=sort_key, kind="stable").groupby(keys, sort=False, dropna=False)
            for key_values, rows in order:
                vals = key_values if isinstance(key_values, tuple) else (key_values,)
                table.rows.append((tuple(str(v) for v in vals), [runs[idx[i]] for i in rows.index]))
        else:
            table.rows.append(((), [runs[i] for i in idx]))
        tables.append(table)
    return tables


# ---------------------------------------------------------------- metrics


def metric_value(res: dict, key: str) -> float | None:
    """A final figure of a run: a top-level number of results.json, else an entry of its ``metrics``."""
    value = res.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        value = (res.get("metrics") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metric_names(runs: Sequence[dict]) -> list[str]:
    """Every numeric final figure some run has (for error messages)."""
    names = {k for r in runs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    names |= {k for r in runs for k, v in (r.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return sorted(names - {"schema_version", "seed"})


def check_metrics(runs: Sequence[dict], metrics: Sequence[str]) -> None:
    """Raise a ConfigError naming the metrics that exist when one of ``metrics`` is in no run."""
    absent = [m for m in metrics if all(metric_value(r, m) is None for r in runs)]
    if absent:
        raise ConfigError(f"--metric {','.join(absent)}: no run has this figure. Figures the runs have: "
                          f"{', '.join(metric_names(runs))}")
