"""Launching what the tables need: ``python -m pcdeq.reproduce``.

``python -m pcdeq.reproduce --tables mnist,tolerance --launcher joblib`` reads the table specs and the profile
(:mod:`~pcdeq.reproduction.specs`), plans every job of the tables and skips those whose results are already
complete (:mod:`~pcdeq.reproduction.plan`), and launches the rest as Hydra multiruns of ``train.py`` /
``eval.py`` on the chosen launcher, one multirun per group of jobs that forms a Cartesian product. Jobs run with
``skip_if_done`` and ``auto_resume``: a re-run skips what finished meanwhile and resumes interrupted runs from
their last checkpoint; a worker started beside another skips the runs the other holds.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

from pcdeq.errors import ConfigError, PcdeqUserError
from pcdeq.reproduction.plan import (
    EvalJob,
    Job,
    check_jobs,
    eval_jobs,
    find_eval,
    index_runs,
    override_value,
    train_jobs,
)
from pcdeq.reproduction.specs import PROJECT_ROOT, Profile, list_specs, load_profile, load_spec
from pcdeq.results import EXECUTION_KEYS, run_key

log = logging.getLogger("pcdeq.reproduce")
LAUNCHERS = {"basic": "basic", "joblib": "joblib", "slurm": "slurm", "submitit_local": "submitit_local"}
WORKER_DIR = ".workers"  # under a profile's root: each running worker's job outcomes
# a worker's summary: train()'s outcomes (pcdeq.training.worklog) as counted at the end
SUMMARY = ("completed", "skipped as done", "held by another worker", "failed", "diverged", "interrupted",
           "not started")
SUMMARY_OF = {"completed": "completed", "done": "skipped as done", "in_use": "held by another worker",
              "failed": "failed", "diverged": "diverged", "interrupted": "interrupted"}




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
                values[f"solver.{k}"].append(override_value(v))
        if len(group) > 1 and len(values) > 1:  # keys swept together: one command per setting
            settings = [[f"solver.{k}={override_value(v)}" for k, v in job.solver] for job in group]
        else:
            settings = [[f"{k}={','.join(v)}" for k, v in values.items()]]
        for s in settings:
            out = profile.root / "eval" / source.parent.name / source.name
            cmds.append([sys.executable, str(PROJECT_ROOT / "eval.py"), "-m",
                         f"ckpt_path='{source / 'checkpoints' / 'last.ckpt'}'", *s, "skip_if_done=true",
                         f"num_threads={num_threads}",
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


def worker_summary(keys: Sequence[str], outcomes: dict[str, str], done_before: int, what: str = "") -> str:
    """This worker's one summary line: what became of each run it set out to train (or evaluate: ``what``).

    ``done_before``: the runs already complete when it planned (never launched).
    """
    counts = dict.fromkeys(SUMMARY, 0)
    counts["skipped as done"] = done_before
    for key in keys:
        counts[SUMMARY_OF.get(outcomes.get(key, ""), "not started")] += 1
    shown = ", ".join(f"{label} {n}" for label, n in counts.items() if n or label in SUMMARY[:4])
    held = (" (held runs are finished by the workers holding them; run make tables once all have ended)"
            if counts["held by another worker"] else "")
    return f"worker {platform.node()}:{os.getpid()}{', ' + what if what else ''}: {shown}{held}"


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
            failures += sum(_run(cmd, dry_run, env) != 0 for cmd in eval_commands(todo, profile, launcher,
                                                                                   num_threads, extra))
            if not dry_run:  # eval.py records its outcomes under the evaluation's own run_key ("eval:...")
                done = outcomes()
                log.info("%s", worker_summary([k for k in done if k.startswith("eval:")], done, 0,
                                              what="evaluations"))
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
