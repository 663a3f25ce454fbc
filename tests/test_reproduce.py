"""The reproduction pipeline: table specs, run identity and skip-if-done, the aggregator and its outputs."""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pcdeq.errors import ConfigError
from pcdeq.reproduction.aggregate import aggregate
from pcdeq.reproduction.plan import EvalJob, check_jobs, train_jobs
from pcdeq.reproduction.reproduce import eval_commands
from pcdeq.reproduction.specs import Profile, load_profile, load_spec
from pcdeq.results import completed_run, run_key, write_results
from tests.helpers import held_by_another_process

ROOT = Path(__file__).resolve().parents[1]

SPEC = """name: fixture
title: "Fixture table"
dataset: mnist
seeds: [0, 1, 2]
columns: [test_acc, params, fwd_iters, bwd_iters, epoch_time, published]
also_published: ["Neural ODE"]
rows:
  - {label: "pcDEQ-1 linear, tanh", experiment: pcdeq_linear_mnist, overrides: [model.activation=tanh],
     published: "pcDEQ-1 linear tanh (reference implementation, one run)"}
  - {label: "pcDEQ-2 linear, sigmoid", experiment: pcdeq_linear_mnist, overrides: [model.activation=sigmoid]}
  - {label: "monDEQ fully connected", experiment: mondeq_fc_mnist, published: "monDEQ fully connected"}
"""


def _run(root: Path, experiment: str, overrides: list[str], status: str = "completed", **figures) -> Path:
    """A run directory as train.py leaves it (results.json written by the project's own writer)."""
    d = root / experiment / "_".join(o.replace("=", "-") for o in overrides)
    d.mkdir(parents=True)
    started = "2026-01-01T00:00:00.000000+00:00"
    (d / "launch.json").write_text(json.dumps({"started_at": started}))
    write_results(d / "results.json", {
        "status": status, "task": "train", "experiment": experiment, "overrides": overrides, "run_dir": str(d),
        "run_key": run_key(experiment, overrides), "started_at": started, "dataset": "mnist", "family": "pcdeq",
        "num_params": 70410, **figures})
    return d


@pytest.fixture
def fixture_runs(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Three tanh seeds, two sigmoid seeds plus a failed and a diverged one, and every kind of broken run."""
    spec = tmp_path / "fixture.yaml"
    spec.write_text(SPEC)
    root = tmp_path / "runs"
    accs = {"tanh": [0.9801, 0.9795, 0.9812], "sigmoid": [0.9788, 0.9791]}
    for act, values in accs.items():
        for seed, acc in enumerate(values):
            _run(root, "pcdeq_linear_mnist", [f"model.activation={act}", f"seed={seed}"], **{
                "test/acc": acc, "fwd_iters": 10.0 + seed, "bwd_iters": 8.0, "epoch_time_s": 7.0 + seed})
    _run(root, "pcdeq_linear_mnist", ["model.activation=sigmoid", "seed=2"], status="failed", error="OOM")
    _run(root, "mondeq_fc_mnist", ["seed=0"], status="diverged")
    partial = root / "mondeq_fc_mnist" / "killed"
    partial.mkdir(parents=True)
    (partial / "launch.json").write_text("{}")
    corrupt = root / "mondeq_fc_mnist" / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.json").write_text('{"status": "compl')
    future = root / "mondeq_fc_mnist" / "future"
    future.mkdir()
    (future / "results.json").write_text(json.dumps({"schema_version": 99, "status": "completed"}))
    stale = _run(root, "mondeq_fc_mnist", ["seed=1"], **{"test/acc": 0.5})
    (stale / "launch.json").write_text(json.dumps({"started_at": "2026-02-01T00:00:00.000000+00:00"}))
    return spec, root, accs


def test_aggregator_tables_match_hand_computed_statistics(fixture_runs, tmp_path: Path) -> None:
    spec, root, accs = fixture_runs
    out = tmp_path / "tables"
    profile = Profile("fixture", root, out)
    aggregate([str(spec)], profile, command="test")

    # CSV, parsed back: mean, sample std and n per row; failed/diverged/stale runs are not averaged in
    table = pd.read_csv(out / "fixture.csv")
    tanh, sigmoid, mondeq = (table[table["model"] == m].iloc[0] for m in (
        "pcDEQ-1 linear, tanh", "pcDEQ-2 linear, sigmoid", "monDEQ fully connected"))
    assert tanh["test_acc mean"] == pytest.approx(100 * statistics.fmean(accs["tanh"]), abs=1e-4)
    assert tanh["test_acc std"] == pytest.approx(100 * statistics.stdev(accs["tanh"]), abs=1e-4)
    assert tanh["test_acc n"] == 3 and tanh["fwd_iters mean"] == pytest.approx(11.0)
    assert sigmoid["test_acc n"] == 2 and "2 of 3 runs" in sigmoid["notes"]
    assert mondeq["test_acc n"] == 0 and "not run" in mondeq["notes"]
    assert "Neural ODE" in set(table["model"])

    # Markdown: one line per row, the formatted cell and the published figure beside
    md = (out / "fixture.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| pcDEQ-1 linear, tanh"))
    mean, std = 100 * statistics.fmean(accs["tanh"]), 100 * statistics.stdev(accs["tanh"])
    assert f"{mean:.2f} ± {std:.2f} (3)" in line and "98.02 (1)" in line and "70,410" in line
    assert "98.10 ± 0.1 (3)" in next(ln for ln in md.splitlines() if ln.startswith("| monDEQ fully"))

    # LaTeX: booktabs rules, escaped percent and plus-minus, one row per line
    tex = (out / "fixture.tex").read_text()
    assert all(rule in tex for rule in ("\\toprule", "\\midrule", "\\bottomrule"))
    assert f"pcDEQ-1 linear, tanh & {mean:.2f} $\\pm$ {std:.2f} (3) & 70{{,}}410 & " in tex
    assert "96.40 $\\pm$ 0.5" in tex and "±" not in tex
    assert "test acc. \\% (n)" in tex

    # The report lists every run that was not averaged in, by status.
    report = (out / "report.md").read_text()
    for status, where in [("failed", "seed-2"), ("diverged", "mondeq_fc_mnist"), ("partial", "killed"),
                          ("unreadable", "corrupt"), ("unreadable", "future"), ("partial", "seed-1")]:
        assert re.search(rf"\| {status} \| `[^`]*{where}", report), (status, where)
    assert "schema_version 99" in report
    assert (out / "plots" / "fixture_accuracy_vs_epoch.png").exists() is False  # no CSV logs in the fixture


def test_the_report_during_a_sweep_lists_runs_in_progress_and_counts_finished_results_only(fixture_runs,
                                                                                           tmp_path: Path) -> None:
    spec, root, accs = fixture_runs
    out = tmp_path / "tables"
    killed = root / "mondeq_fc_mnist" / "killed"  # launch.json, no results.json
    loading = root / "mondeq_fc_mnist" / "loading"  # locked, nothing written yet
    with held_by_another_process(killed) as one, held_by_another_process(loading) as two:
        aggregate([str(spec)], Profile("fixture", root, out), command="test", plots=False)
    report = (out / "report.md").read_text()
    host = platform.node()
    assert f"| running ({host}, pid {one.pid}) | `mondeq_fc_mnist/killed` | none, not averaged in" in report
    assert f"| running ({host}, pid {two.pid}) | `mondeq_fc_mnist/loading` | none, not averaged in" in report
    assert "running: 1" in report  # the killed run's row among the runs not averaged in
    table = pd.read_csv(out / "fixture.csv")
    assert table[table["model"] == "monDEQ fully connected"].iloc[0]["test_acc n"] == 0  # in progress: no result
    assert table[table["model"] == "pcDEQ-1 linear, tanh"].iloc[0]["test_acc n"] == len(accs["tanh"])
    # once the holders are gone (SIGKILLed above) the same run is reported as partial again, not running
    aggregate([str(spec)], Profile("fixture", root, out), command="test", plots=False)
    report = (out / "report.md").read_text()
    assert "running (" not in report and re.search(r"\| partial \| `mondeq_fc_mnist/killed`", report)


def test_stale_write_is_never_taken_for_the_current_run(tmp_path: Path) -> None:
    d = _run(tmp_path, "pcdeq_linear_mnist", ["seed=0"], **{"test/acc": 0.9})
    key = run_key("pcdeq_linear_mnist", ["seed=0"])
    assert completed_run(d, key) is not None
    assert completed_run(d, run_key("pcdeq_linear_mnist", ["seed=1"])) is None  # another identity
    # a newer launch in the same directory: the old process's completed results are stale
    (d / "launch.json").write_text(json.dumps({"started_at": "2026-06-01T00:00:00.000000+00:00"}))
    assert completed_run(d, key) is None
    # results that name another directory (copied or moved) are not this run's either
    (d / "launch.json").unlink()
    moved = tmp_path / "elsewhere"
    d.rename(moved)
    assert completed_run(moved, key) is None


def test_run_identity_is_canonical_and_ignores_execution_settings() -> None:
    a = run_key("e", ["solver.fwd_tol=1e-2", "dataset.synthetic=True", "seed=0", "num_threads=1",
                      "paths.data_dir=/data", "trainer=gpu"])
    b = run_key("e", ["seed=0", "dataset.synthetic=true", "solver.fwd_tol=0.01"])
    assert a == b == "e/dataset.synthetic=true,seed=0,solver.fwd_tol=0.01"
    assert run_key("e", ["seed=1"]) != run_key("e", ["seed=0"]) != run_key("f", ["seed=0"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("rows:\n  - {experiment: pcdeq_transformer_mnist}\n", "unknown experiment 'pcdeq_transformer_mnist'"),
        ("rows:\n  - {experiment: pcdeq_linear_mnist, overrides: [model.activation=relu]}\n",
         "unknown activation 'relu'"),
        ("columns: [test_acc, flops]\nrows:\n  - {experiment: pcdeq_linear_mnist}\n", "unknown column(s) flops"),
        ("kind: tolerance\nrows:\n  - {experiment: pcdeq_linear_mnist}\n", "needs sweep"),
        ("rows: [\n", "cannot be read as YAML"),
    ],
)
def test_bad_table_specs_name_the_file_and_the_problem(tmp_path: Path, body: str, message: str) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_spec(spec)
    assert str(spec) in str(err.value)


def test_driver_composes_every_row_before_running(tmp_path: Path) -> None:
    spec = tmp_path / "typo.yaml"
    spec.write_text("rows:\n  - {experiment: pcdeq_linear_mnist, overrides: [model.activaton=tanh]}\n")
    loaded = load_spec(spec)
    with pytest.raises(ConfigError, match="typo.yaml: row .*model.activaton"):
        check_jobs(train_jobs(loaded, Profile("t", tmp_path, tmp_path)), {r.label: loaded for r in loaded.rows})


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_aggregate_cli_refuses_missing_and_empty_roots(tmp_path: Path) -> None:
    for root in (tmp_path / "nowhere", tmp_path):
        proc = _cli("pcdeq.aggregate", "--root", str(root), "--out", str(tmp_path / "out"), "--tables", "mnist")
        assert proc.returncode == 2 and str(root) in proc.stderr and "Traceback" not in proc.stderr


SMOKE_SPEC = """name: smoketab
dataset: digits
seeds: [0, 1]
columns: [test_acc, params, fwd_iters, bwd_iters, epoch_time]
rows:
  - {label: "pcDEQ-1 linear, tanh", experiment: pcdeq_linear_mnist, overrides: [model.activation=tanh]}
  - {label: "pcDEQ-2 linear, sigmoid", experiment: pcdeq_linear_mnist, overrides: [model.activation=sigmoid]}
"""


def _smoke_files(tmp_path: Path) -> tuple[Path, Path]:
    spec, profile = tmp_path / "smoketab.yaml", tmp_path / "tiny.yaml"
    spec.write_text(SMOKE_SPEC)
    profile.write_text(f"root: {tmp_path / 'runs'}\nout: {tmp_path / 'out'}\noverrides: [dataset.synthetic=true, "
                       "'dataset.synthetic_size=[96,64]', trainer.max_epochs=2, optim.lr=0.01]\n"
                       "channels: {pcdeq_linear: '8'}\n")
    return spec, profile


TOLERANCE_SPEC = """name: toltab
kind: tolerance
dataset: digits
seeds: [0]
eval_seed: 0
columns: [test_acc, fwd_iters, test_fwd_iters]
rows:
  - {label: "pcDEQ-1 linear, tanh", experiment: pcdeq_linear_mnist, overrides: [model.activation=tanh],
     sweep: {keys: [solver.fwd_tol], values: [1.0e-2, 1.0e-3], default: 1.0e-3}}
"""


def test_eval_commands_skip_done_and_held_evaluations(tmp_path: Path) -> None:
    _, profile_file = _smoke_files(tmp_path)
    profile = load_profile(str(profile_file))
    jobs = [EvalJob(tmp_path / "runs" / "exp" / "run", "exp/seed=0", (("fwd_tol", v),)) for v in (1e-2, 1e-3)]
    (cmd,) = eval_commands(jobs, profile, "basic", 1)
    assert cmd[1].endswith("eval.py") and "skip_if_done=true" in cmd and "solver.fwd_tol=0.01,0.001" in cmd


@pytest.mark.slow  # about a minute on 2 loaded cores: two trainings and two evaluations through the launcher
def test_tolerance_table_evaluations_are_skipped_when_done_and_summarised(tmp_path: Path) -> None:
    _, profile = _smoke_files(tmp_path)
    spec = tmp_path / "toltab.yaml"
    spec.write_text(TOLERANCE_SPEC)
    args = ["--tables", str(spec), "--profile", str(profile)]
    first = _cli("pcdeq.reproduce", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "evaluation: 2 jobs to run" in first.stderr
    # the evaluations' own summary line, from the outcomes eval.py recorded
    assert re.search(r"worker \S+, evaluations: completed 2, skipped as done 0, held by another worker 0, failed 0",
                     first.stderr), first.stderr[-2000:]
    evals = sorted((tmp_path / "runs" / "eval").rglob("results.json"))
    assert len(evals) == 2 and all(json.loads(p.read_text())["status"] == "completed" for p in evals)
    before = {p: p.read_bytes() for p in evals}
    again = _cli("pcdeq.reproduce", *args)
    assert again.returncode == 0 and "evaluation:" not in again.stderr  # planned as done: nothing launched
    assert {p: p.read_bytes() for p in evals} == before


@pytest.mark.parametrize("launcher", ["joblib", pytest.param("submitit_local", marks=pytest.mark.slow)])
def test_smoke_table_through_a_launcher_skip_and_resume(tmp_path: Path, launcher: str) -> None:
    spec, profile = _smoke_files(tmp_path)
    args = ["--tables", str(spec), "--profile", str(profile)]
    first = _cli("pcdeq.reproduce", *args, "--launcher", launcher)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "4 to run" in first.stderr
    results = sorted((tmp_path / "runs").rglob("results.json"))
    done = {p.parent: json.loads(p.read_text()) for p in results}
    assert len(done) == 4 and all(r["status"] == "completed" for r in done.values())
    before = {p: p.stat().st_mtime_ns for p in results}

    # The aggregator: every row with its two seeds, plots drawn from the runs' CSV logs and results.
    agg = _cli("pcdeq.aggregate", *args)
    assert agg.returncode == 0, agg.stderr[-2000:]
    with (tmp_path / "out" / "smoketab.csv").open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert rows["pcDEQ-1 linear, tanh"]["test_acc n"] == "2" and rows["pcDEQ-2 linear, sigmoid"]["test_acc n"] == "2"
    assert float(rows["pcDEQ-1 linear, tanh"]["test_acc mean"]) > 10  # learnable synthetic classes
    assert (tmp_path / "out" / "plots" / "smoketab_accuracy_vs_epoch.png").stat().st_size > 0
    assert (tmp_path / "out" / "plots" / "smoketab_residual_vs_iteration.png").stat().st_size > 0
    if launcher != "joblib":
        return

    # Nothing left to do: nothing is trained or rewritten.
    again = _cli("pcdeq.reproduce", *args)
    assert again.returncode == 0 and "4 done, 0 to run" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in results} == before

    # An interrupted run resumes from its checkpoint; a run killed before writing results.json too.
    interrupted, lost = sorted(done)[:2]
    write_results(interrupted / "results.json", {**done[interrupted], "status": "interrupted"})
    (lost / "results.json").unlink()
    resumed = _cli("pcdeq.reproduce", *args)
    assert resumed.returncode == 0 and "2 done, 2 to run" in resumed.stderr
    assert (resumed.stdout + resumed.stderr).count("resuming from") == 2
    for d in (interrupted, lost):
        res = json.loads((d / "results.json").read_text())
        assert res["status"] == "completed" and res["test/acc"] == pytest.approx(done[d]["test/acc"])
    assert load_profile(str(profile)).root == tmp_path / "runs"


def test_an_attempt_superseded_by_a_completed_run_is_not_a_problem(tmp_path: Path) -> None:
    from pcdeq.reproduction.plan import index_runs

    done = _run(tmp_path, "pcdeq_linear_mnist", ["seed=0"], **{"test/acc": 0.9})
    old = tmp_path / "pcdeq_linear_mnist" / "old-layout"
    old.mkdir()
    write_results(old / "results.json", {**json.loads((done / "results.json").read_text()), "status": "interrupted",
                                         "run_dir": str(old)})
    index = index_runs(tmp_path)
    assert list(index.completed) == [run_key("pcdeq_linear_mnist", ["seed=0"])]
    assert index.problems == [] and [d for d, _, _ in index.superseded] == [old]


def test_a_worker_summary_counts_each_planned_run_by_what_its_job_logged(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from pcdeq.reproduction.reproduce import worker_summary
    from pcdeq.training.worklog import ENV, read_outcomes, record_outcome

    log = tmp_path / "worker.jsonl"
    assert read_outcomes(log) == {}
    monkeypatch.setenv(ENV, str(log))
    for key, outcome in [("a", "in_use"), ("b", "completed"), ("c", "done"), ("d", "failed"), ("a", "completed")]:
        record_outcome(key, tmp_path / key, outcome)
    with log.open("a") as f:
        f.write('{"run_key": "e", "outc')  # a line cut short by a killed job
    outcomes = read_outcomes(log)
    assert outcomes == {"a": "completed", "b": "completed", "c": "done", "d": "failed"}  # the last job of a run wins
    line = worker_summary(["a", "b", "c", "d", "e", "f"], {**outcomes, "f": "in_use"}, done_before=2)
    assert re.fullmatch(r"worker [^:]+:\d+: completed 2, skipped as done 3, held by another worker 1, failed 1, "
                        r"not started 1 \(held runs are finished by the workers holding them; run make tables once "
                        r"all have ended\)", line), line
