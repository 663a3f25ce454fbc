"""Reproduction tables: their specs (``experiments/*.yaml``), the runs behind them, and launching what is missing.

A table spec names its rows (an experiment config plus overrides such as the activation), the seeds, the
columns and the published figure beside each row; a tolerance table also sweeps solver settings per row and
evaluates one trained model of another table at each setting. A *profile* (``experiments/profiles/``) says
where runs live and adds overrides to every job (``smoke``: synthetic data, tiny budgets).

``python -m pcdeq.reproduce --tables mnist,tolerance --launcher joblib`` plans every job of the tables, skips
those whose results are already complete (identity = :func:`pcdeq.results.run_key`, never a timestamp), and
launches the rest as Hydra multiruns of ``train.py`` / ``eval.py`` on the chosen launcher, one multirun per group
of jobs that forms a Cartesian product. Jobs run with ``skip_if_done`` and ``auto_resume``: a re-run skips what
finished meanwhile and resumes interrupted runs from their last checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcdeq.activations import ACTIVATIONS
from pcdeq.errors import ConfigError, PcdeqUserError
from pcdeq.results import EXECUTION_KEYS, completed_run, read_results, run_key

log = logging.getLogger("pcdeq.reproduce")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: experiments/, conf/ and results/
SPEC_DIR = PROJECT_ROOT / "experiments"
EXPERIMENT_DIR = PROJECT_ROOT / "conf" / "experiment"
LAUNCHERS = {"basic": "basic", "joblib": "joblib", "slurm": "slurm", "submitit_local": "submitit_local"}
COLUMNS = ("test_acc", "params", "fwd_iters", "bwd_iters", "epoch_time", "published", "test_fwd_iters")
TABLE_KINDS = ("rows", "tolerance")
WORKER_DIR = ".workers"  # under a profile's root: each running worker's job outcomes
# a worker's summary: train()'s outcomes (pcdeq.training.worklog) as counted at the end
SUMMARY = ("completed", "skipped as done", "held by another worker", "failed", "diverged", "interrupted",
           "not started")
SUMMARY_OF = {"completed": "completed", "done": "skipped as done", "in_use": "held by another worker",
              "failed": "failed", "diverged": "diverged", "interrupted": "interrupted"}


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class Row:
    """One table row: an experiment config and the overrides that make the row.

    Attributes:
        label: the row's name in the table.
        experiment: a config name in ``conf/experiment/``.
        overrides: Hydra overrides, e.g. ``["model.activation=sigmoid"]``.
        published: the ``model`` entry of ``results/published.csv`` shown beside the row, if any.
        tags: free labels to select rows (``--tag cpu``).
        sweep_keys / sweep_values / sweep_default: tolerance tables: the keys set together, their values, and
            the value the protocol uses anyway (its runs are the row's own runs, with no override).
    """

    label: str
    experiment: str
    overrides: tuple[str, ...] = ()
    published: str | None = None
    tags: tuple[str, ...] = ()
    sweep_keys: tuple[str, ...] = ()
    sweep_values: tuple[Any, ...] = ()
    sweep_default: Any = None


@dataclass(frozen=True)
class TableSpec:
    """A table: rows, seeds, columns and, for tolerance tables, the evaluation sweep."""

    name: str
    title: str
    kind: str
    dataset: str | None
    seeds: tuple[int, ...]
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    eval_seed: int | None = None  # tolerance tables: evaluate this seed's model (trained at the row's defaults)
    also_published: tuple[str, ...] = ()  # published.csv models shown below the rows (not trained here)
    path: Path = field(default=SPEC_DIR)


def _fail(path: Path, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def load_spec(name_or_path: str | Path) -> TableSpec:
    """Read and check a table spec (``experiments/<name>.yaml``).

    Raises:
        ConfigError: unreadable file, unknown experiment, column or kind, or a malformed row; the message
            names the file and the problem.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SPEC_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_specs()) or "none"
        raise ConfigError(f"no table spec {path} (known tables: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise _fail(path, f"cannot be read as YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise _fail(path, "expected a mapping with name, rows, seeds, columns")
    kind = raw.get("kind", "rows")
    if kind not in TABLE_KINDS:
        raise _fail(path, f"unknown kind {kind!r}; valid choices: {', '.join(TABLE_KINDS)}")
    columns = tuple(raw.get("columns") or COLUMNS[:6])
    bad = [c for c in columns if c not in COLUMNS]
    if bad:
        raise _fail(path, f"unknown column(s) {', '.join(bad)}; valid columns: {', '.join(COLUMNS)}")
    seeds = raw.get("seeds") or [0]
    if not all(isinstance(s, int) for s in seeds):
        raise _fail(path, f"seeds must be integers, got {seeds!r}")
    rows = []
    for i, r in enumerate(raw.get("rows") or []):
        if not isinstance(r, dict) or "experiment" not in r:
            raise _fail(path, f"row {i + 1} needs at least an experiment: {r!r}")
        if not (EXPERIMENT_DIR / f"{r['experiment']}.yaml").is_file():
            valid = ", ".join(sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml")))
            raise _fail(path, f"row {i + 1}: unknown experiment {r['experiment']!r}; valid: {valid}")
        overrides = tuple(str(o) for o in r.get("overrides") or ())
        if any("=" not in o for o in overrides):
            raise _fail(path, f"row {i + 1}: overrides must be key=value, got {list(overrides)}")
        for o in overrides:
            if o.startswith("model.activation=") and o.split("=", 1)[1] not in ACTIVATIONS:
                raise _fail(path, f"row {i + 1}: unknown activation {o.split('=', 1)[1]!r}; valid choices: "
                                  f"{', '.join(ACTIVATIONS)}")
        sweep = r.get("sweep") or {}
        if kind == "tolerance" and not (sweep.get("keys") and sweep.get("values")):
            raise _fail(path, f"row {i + 1}: a tolerance table needs sweep: {{keys: [...], values: [...]}}")
        rows.append(Row(
            label=str(r.get("label") or f"{r['experiment']} {' '.join(overrides)}".strip()),
            experiment=r["experiment"], overrides=overrides, published=r.get("published"),
            tags=tuple(r.get("tags") or ()), sweep_keys=tuple(sweep.get("keys") or ()),
            sweep_values=tuple(sweep.get("values") or ()), sweep_default=sweep.get("default"),
        ))
    if not rows:
        raise _fail(path, "has no rows")
    return TableSpec(name=str(raw.get("name") or path.stem), title=str(raw.get("title") or path.stem), kind=kind,
                     dataset=raw.get("dataset"), seeds=tuple(seeds), columns=columns, rows=tuple(rows),
                     eval_seed=raw.get("eval_seed"), also_published=tuple(raw.get("also_published") or ()),
                     path=path)


def list_specs() -> list[str]:
    """Names of the table specs in ``experiments/``."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class Profile:
    """Where runs live and what every job adds (``experiments/profiles/<name>.yaml``)."""

    name: str
    root: Path
    out: Path
    overrides: tuple[str, ...] = ()
    channels: dict[str, str] = field(default_factory=dict)  # model name -> model.channels override
    seeds: tuple[int, ...] | None = None  # at most these seeds of each table


def load_profile(name: str) -> Profile:
    """Read ``experiments/profiles/<name>.yaml`` (or a profile file's path); relative paths in it are relative to
    the project root."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SPEC_DIR / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (SPEC_DIR / "profiles").glob("*.yaml")))
        raise ConfigError(f"unknown profile {name!r} (no {path}); valid: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    root, out = Path(raw.get("root", "results/runs")), Path(raw.get("out", "results/tables"))
    return Profile(name=path.stem, root=root if root.is_absolute() else PROJECT_ROOT / root,
                   out=out if out.is_absolute() else PROJECT_ROOT / out,
                   overrides=tuple(str(o) for o in raw.get("overrides") or ()),
                   channels={str(k): str(v) for k, v in (raw.get("channels") or {}).items()},
                   seeds=tuple(raw["seeds"]) if raw.get("seeds") else None)


# ---------------------------------------------------------------- jobs


def _fmt(value: Any) -> str:
    """An override value as Hydra reads it back (floats in their shortest form, lists in brackets)."""
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
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
        sweep = [[] if v == r.sweep_default else [f"{k}={_fmt(v)}" for k in r.sweep_keys]
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


# ---------------------------------------------------------------- launching


def _products(jobs: list[Job]) -> list[tuple[str, dict[str, list[str]]]]:
    """Group jobs into Cartesian products: (experiment, {key: [values]}) with one multirun each."""
    by_keys: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for job in jobs:
        kv = dict(o.split("=", 1) for o in job.overrides)
        by_keys[(job.experiment, tuple(sorted(kv)))].append(kv)
    out = []
    for (experiment, keys), combos in by_keys.items():
        out += [(experiment, g) for g in _split_products(list(keys), combos)]
    return out


def _split_products(keys: list[str], combos: list[dict[str, str]]) -> list[dict[str, list[str]]]:
    values = {k: list(dict.fromkeys(c[k] for c in combos)) for k in keys}
    if math.prod(len(v) for v in values.values()) == len({tuple(c[k] for k in keys) for c in combos}):
        return [values]
    # not a full product: split on the key with the most values and try again within each part
    split = max(keys, key=lambda k: len(values[k]))
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for c in combos:
        groups[c[split]].append(c)
    return [g for part in groups.values() for g in _split_products(keys, part)]


def _hydra_args(launcher: str, sweep_dir: Path) -> list[str]:
    excluded = "[" + ",".join(EXECUTION_KEYS) + "]"
    args = [f"hydra.sweep.dir='{sweep_dir}'", "hydra.sweep.subdir='${run_slug:${hydra.job.override_dirname}}'",
            f"hydra.job.config.override_dirname.exclude_keys={excluded}"]
    if launcher != "basic":
        args.insert(0, f"hydra/launcher={LAUNCHERS[launcher]}")
    return args


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


def train_commands(jobs: list[Job], profile: Profile, launcher: str, num_threads: int,
                   extra: Sequence[str] = ()) -> list[list[str]]:
    """One ``train.py -m`` command per group of jobs that forms a Cartesian product."""
    cmds = []
    for experiment, values in _products(jobs):
        sweep = [f"{k}={','.join(v)}" for k, v in values.items()]
        cmds.append([sys.executable, str(PROJECT_ROOT / "train.py"), "-m", f"experiment={experiment}", *sweep,
                     "skip_if_done=true", "auto_resume=true", f"num_threads={num_threads}", *extra,
                     *_hydra_args(launcher, profile.root / experiment)])
    return cmds


def eval_commands(jobs: list[EvalJob], profile: Profile, launcher: str, num_threads: int,
                  extra: Sequence[str] = ()) -> list[list[str]]:
    """One ``eval.py -m`` command per source model, sweeping its solver settings."""
    by_source: dict[Path, list[EvalJob]] = defaultdict(list)
    for job in jobs:
        by_source[job.source].append(job)
    cmds = []
    for source, group in by_source.items():
        values: dict[str, list[str]] = defaultdict(list)
        for job in group:
            for k, v in job.solver:
                values[f"solver.{k}"].append(_fmt(v))
        if len(group) > 1 and len(values) > 1:  # keys swept together: one command per setting
            settings = [[f"solver.{k}={_fmt(v)}" for k, v in job.solver] for job in group]
        else:
            settings = [[f"{k}={','.join(v)}" for k, v in values.items()]]
        for s in settings:
            out = profile.root / "eval" / source.parent.name / source.name
            cmds.append([sys.executable, str(PROJECT_ROOT / "eval.py"), "-m",
                         f"ckpt_path='{source / 'checkpoints' / 'last.ckpt'}'", *s, f"num_threads={num_threads}",
                         *[e for e in extra if e.startswith(("trainer", "hydra"))], *_hydra_args(launcher, out)])
    return cmds


def _run(cmd: list[str], dry_run: bool, env: dict[str, str] | None = None) -> int:
    shown = " ".join(cmd[1:])
    log.info("%s %s", "would run:" if dry_run else "running:", shown)
    if dry_run:
        return 0
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env).returncode
    log.info("exit %d after %.0f s", code, time.perf_counter() - t0)
    return code


@contextmanager
def worker_log(root: Path, dry_run: bool) -> Iterator[tuple[dict[str, str] | None, Callable[[], dict[str, str]]]]:
    """The environment that makes this worker's ``train.py`` jobs log their outcomes, and the reader of that log.

    The log lives under ``root`` (shared with Slurm jobs on other nodes) and is removed when the block ends.
    """
    from pcdeq.training.worklog import ENV, read_outcomes  # light; the rest of the training stack is not loaded

    if dry_run:
        yield None, dict
        return
    (root / WORKER_DIR).mkdir(parents=True, exist_ok=True)
    path = root / WORKER_DIR / f"{platform.node()}-{os.getpid()}-{time.time_ns()}.jsonl"
    try:
        yield {**os.environ, ENV: str(path)}, lambda: read_outcomes(path)
    finally:
        path.unlink(missing_ok=True)


def worker_summary(keys: Sequence[str], outcomes: dict[str, str], done_before: int) -> str:
    """This worker's one summary line: what became of each run it set out to train.

    ``done_before``: the runs already complete when it planned (never launched).
    """
    counts = dict.fromkeys(SUMMARY, 0)
    counts["skipped as done"] = done_before
    for key in keys:
        counts[SUMMARY_OF.get(outcomes.get(key, ""), "not started")] += 1
    shown = ", ".join(f"{label} {n}" for label, n in counts.items() if n or label in SUMMARY[:4])
    held = (" (held runs are finished by the workers holding them; run make tables once all have ended)"
            if counts["held by another worker"] else "")
    return f"worker {platform.node()}:{os.getpid()}: {shown}{held}"


def reproduce(tables: Iterable[str], profile: Profile, launcher: str = "basic", tag: str | None = None,
              num_threads: int = 1, dry_run: bool = False, extra: Sequence[str] = ()) -> int:
    """Run every missing job of ``tables`` (training first, then the evaluations that need its models).

    Args:
        tables: table spec names.
        profile: where runs live and what every job adds.
        launcher: basic (sequential), joblib (local processes), slurm, submitit_local.
        tag: only rows with this tag.
        num_threads: torch threads per job.
        dry_run: print the commands only.
        extra: overrides added to every job that do not change what it computes (e.g. ``trainer=gpu``).

    Returns:
        The number of launched commands that failed (0 when all went through).
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; valid choices: {', '.join(LAUNCHERS)}")
    specs = [load_spec(t) for t in tables]
    bad = [e for e in extra if run_key("x", [e]) != "x/"]
    if bad:
        raise ConfigError(f"--extra takes only execution settings (trainer, paths, num_workers, ...), not "
                          f"{', '.join(bad)}: put what changes results in a table spec")
    jobs = [(row, job, spec) for spec in specs for row, job in train_jobs(spec, profile, tag)]
    check_jobs([(row, job) for row, job, _ in jobs], {row.label: spec for row, _, spec in jobs})
    index = index_runs(profile.root)
    wanted = {job.key: job for _, job, _ in jobs}  # a run shared by several tables runs once
    pending = [job for key, job in wanted.items() if key not in index.completed]
    log.info("training: %d runs for %s, %d done, %d to run (profile %s, runs in %s)", len(wanted),
             ", ".join(s.name for s in specs), len(wanted) - len(pending), len(pending), profile.name, profile.root)
    with worker_log(profile.root, dry_run) as (env, outcomes):
        failures = sum(_run(cmd, dry_run, env) != 0 for cmd in train_commands(pending, profile, launcher,
                                                                               num_threads, extra))
        if not dry_run:
            log.info("%s", worker_summary([job.key for job in pending], outcomes(), len(wanted) - len(pending)))
    index = index_runs(profile.root)
    todo: list[EvalJob] = []
    for spec in specs:
        evals, missing = eval_jobs(spec, profile, index, tag)
        for line in missing:
            log.warning("%s: %s", spec.name, line)
        todo += [job for _, job in evals if find_eval(index, job) is None]
    if todo:
        log.info("evaluation: %d jobs to run", len(todo))
        failures += sum(_run(cmd, dry_run) != 0 for cmd in eval_commands(todo, profile, launcher, num_threads,
                                                                          extra))
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcdeq.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="all", help="comma-separated table names, or all (default)")
    parser.add_argument("--profile", default="full", help="experiments/profiles/<name>.yaml (full, smoke)")
    parser.add_argument("--launcher", default="basic", help=f"one of {', '.join(LAUNCHERS)}")
    parser.add_argument("--tag", default=None, help="only the rows carrying this tag (e.g. cpu)")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads per job (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    parser.add_argument("--extra", default="", help="execution overrides for every job, e.g. 'trainer=gpu'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[reproduce] %(message)s")
    try:
        tables = list_specs() if args.tables == "all" else [t for t in args.tables.split(",") if t]
        return 1 if reproduce(tables, load_profile(args.profile), args.launcher, args.tag or None,
                              args.num_threads, args.dry_run, args.extra.split()) else 0
    except PcdeqUserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

