"""The plan: the training and evaluation jobs a table needs, the runs that already exist, and checking both.

A job's identity is :func:`pcdeq.results.run_key` (experiment and overrides, never a timestamp), so a plan made
twice, by one worker or by several, names the same runs.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcdeq.errors import ConfigError, PcdeqUserError
from pcdeq.reproduction.specs import EXPERIMENT_DIR, PROJECT_ROOT, Profile, Row, TableSpec
from pcdeq.results import completed_run, read_results, run_key

# ---------------------------------------------------------------- jobs


def override_value(value: Any) -> str:
    """An override value as Hydra reads it back (floats in their shortest form, lists in brackets)."""
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def _model_of(experiment: str) -> str:
    """The model config an experiment selects (for profile channel sizes)."""
    raw = yaml.safe_load((EXPERIMENT_DIR / f"{experiment}.yaml").read_text())
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict):
            for k, v in entry.items():
                if k.replace("override ", "").strip("/ ") == "model":
                    return str(v)
    return ""


@dataclass(frozen=True)
class Job:
    """One training run: an experiment with its overrides (the seed included)."""

    experiment: str
    overrides: tuple[str, ...]

    @property
    def key(self) -> str:
        return run_key(self.experiment, list(self.overrides))


def train_jobs(spec: TableSpec, profile: Profile, tag: str | None = None, seeds: Sequence[int] | None = None,
               row: Row | None = None) -> list[tuple[Row, Job]]:
    """Every training job of a table under a profile, with the row it belongs to."""
    out = []
    for r in spec.rows if row is None else (row,):
        if tag and tag not in r.tags:
            continue
        base = list(r.overrides) + list(profile.overrides)
        model = _model_of(r.experiment)
        if model in profile.channels:
            base.append(f"model.channels={profile.channels[model]}")
        sweep = [[] if v == r.sweep_default else [f"{k}={override_value(v)}" for k in r.sweep_keys]
                 for v in r.sweep_values] or [[]]
        use_seeds = seeds if seeds is not None else spec.seeds
        if profile.seeds is not None:
            use_seeds = [s for s in use_seeds if s in profile.seeds] or list(profile.seeds[:1])
        for extra, seed in itertools.product(sweep, use_seeds):
            out.append((r, Job(r.experiment, tuple(base + extra + [f"seed={seed}"]))))
    return out


@dataclass(frozen=True)
class EvalJob:
    """Evaluate a trained run's checkpoint with other solver settings."""

    source: Path  # the training run directory
    source_key: str
    solver: tuple[tuple[str, Any], ...]  # (solver key, value)


def eval_jobs(spec: TableSpec, profile: Profile, index: RunIndex, tag: str | None = None
              ) -> tuple[list[tuple[Row, EvalJob]], list[str]]:
    """A tolerance table's evaluation jobs: the ``eval_seed`` model of each row at every sweep value.

    Returns:
        The jobs, and one line for every row whose source model is not trained yet.
    """
    if spec.kind != "tolerance" or spec.eval_seed is None:
        return [], []
    jobs, missing = [], []
    for r in spec.rows:
        if tag and tag not in r.tags:
            continue
        plain = Row(r.label, r.experiment, r.overrides)  # trained at the row's own (protocol) settings
        (_, source), = train_jobs(spec, profile, seeds=[spec.eval_seed], row=plain)
        found = index.completed.get(source.key)
        if found is None:
            missing.append(f"{r.label}: no completed run {source.key} to evaluate")
            continue
        for v in r.sweep_values:
            values = tuple((k.split(".", 1)[1], v) for k in r.sweep_keys)
            jobs.append((r, EvalJob(Path(found["run_dir"]), source.key, values)))
    return jobs, missing


# ---------------------------------------------------------------- what exists


@dataclass
class RunIndex:
    """Every results.json under a root: completed runs by key, evaluations, and the problems found."""

    completed: dict[str, dict] = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    problems: list[tuple[Path, str, str]] = field(default_factory=list)  # (dir, status, detail)
    superseded: list[tuple[Path, str, str]] = field(default_factory=list)  # problems whose run completed elsewhere


def _launch_key(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "launch.json").read_text()).get("run_key")
    except (OSError, ValueError, AttributeError):
        return None


def index_runs(root: Path) -> RunIndex:
    """Read every run directory under ``root`` (never fails on a bad file: it is listed as a problem).

    A failed, interrupted or partial attempt of a run that completed in another directory (an earlier layout,
    a copy) is kept apart as superseded, not reported as a problem.
    """
    index = RunIndex()
    if not root.is_dir():
        return index
    dirs = {p.parent for p in root.rglob("results.json")} | {p.parent for p in root.rglob("launch.json")}
    keyed: list[tuple[Path, str, str, str | None]] = []
    for d in sorted(dirs):
        try:
            res = read_results(d / "results.json")
        except FileNotFoundError:
            keyed.append((d, "partial", "launched, no results.json (still running, or killed)", _launch_key(d)))
            continue
        except (OSError, ValueError) as e:
            index.problems.append((d, "unreadable", str(e)))
            continue
        if res.get("task") == "eval":
            if res.get("status") == "completed":
                index.evals.append(res)
            else:
                index.problems.append((d, str(res.get("status")), str(res.get("error") or "")))
            continue
        key = run_key(res.get("experiment"), res.get("overrides") or [])
        if completed_run(d, key) is not None:
            index.completed[key] = res
        elif res.get("status") == "completed":
            keyed.append((d, "partial", "results.json older than the last launch, or moved", key))
        else:
            keyed.append((d, str(res.get("status")), str(res.get("error") or ""), key))
    for d, status, detail, attempt in keyed:
        target = index.superseded if attempt is not None and attempt in index.completed else index.problems
        target.append((d, status, detail))
    return index


def find_eval(index: RunIndex, job: EvalJob) -> dict | None:
    """The completed evaluation of ``job`` in ``index``, if any."""
    want = {k: v for k, v in job.solver}
    for res in index.evals:
        got = res.get("solver_overrides") or {}
        if res.get("source_run_key") == job.source_key and got.keys() == want.keys() and all(
                math.isclose(float(got[k]), float(want[k])) for k in want):
            return res
    return None


def check_jobs(jobs: Iterable[tuple[Row, Job]], spec_of: dict[str, TableSpec]) -> None:
    """Compose and build every distinct row before anything runs, so a bad spec fails in seconds.

    Raises:
        ConfigError: naming the spec file, the row and Hydra's or the builder's message.
    """
    # deferred: the training stack (Lightning, Hydra) is needed only here, not to plan or aggregate
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from pcdeq.training.config import net_from_config

    seen = set()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        for row, job in jobs:
            overrides = tuple(o for o in job.overrides if not o.startswith("seed="))
            if (job.experiment, overrides) in seen:
                continue
            seen.add((job.experiment, overrides))
            try:
                cfg = compose("train", overrides=[f"experiment={job.experiment}", *overrides])
                sub = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "dataset", "solver")}
                net_from_config(sub)
            except (HydraException, PcdeqUserError, ValueError) as e:
                where = spec_of.get(row.label)
                raise ConfigError(f"{where.path if where else 'table spec'}: row {row.label!r}: "
                                  f"{' '.join(str(e).split())}") from None
