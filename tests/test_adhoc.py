"""Ad-hoc tables from the user's own sweeps: real tiny multiruns of train.py and eval.py, aggregated by the CLI
(all three run in process, through their own ``__main__`` blocks).

The oracle for every statistic is each run's own results.json, grouped here by hand from its overrides.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from pcdeq.reproduction.adhoc import configuration_frame, infer_keys, sort_key
from pcdeq.results import write_results
from tests.helpers import run_entry_point

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset=digits", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "num_threads=1",
        "dataset.num_workers=0"]


def _in_process(script: Path, *args: str) -> subprocess.CompletedProcess:
    """``python script args`` run inside this process (tests.helpers.run_entry_point: no Python start), with wandb
    off; the environment and torch's thread count are restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "PYTHONWARNINGS")}
    threads = torch.get_num_threads()
    os.environ.update(WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    try:
        status, stderr = run_entry_point(script, *args)
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([str(script), *args], status, "", stderr)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


def _override(res: dict, key: str) -> str:
    return next(o.split("=", 1)[1] for o in res["overrides"] if o.split("=", 1)[0] == key)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root: a pcDEQ sweep (activation x forward tolerance x 2 seeds), a monDEQ run, an eval sweep."""
    root = tmp_path_factory.mktemp("sweeps")
    _ok(_in_process(ROOT / "train.py", "-m", "model=pcdeq_linear", *TINY, "model.activation=tanh,sigmoid",
             "solver.fwd_tol=1e-2,1e-4", "seed=0,1", f"hydra.sweep.dir={root / 'pcdeq'}"))
    _ok(_in_process(ROOT / "train.py", "-m", "model=mondeq_fc", *TINY, "seed=0", f"hydra.sweep.dir={root / 'mondeq'}"))
    source = next(r for r in _results(root / "pcdeq") if _override(r, "model.activation") == "tanh"
                  and float(_override(r, "solver.fwd_tol")) == 1e-4 and r["seed"] == 0)
    _ok(_in_process(ROOT / "eval.py", "-m", f"ckpt_path={source['run_dir']}/checkpoints/last.ckpt",
                    "solver.fwd_tol=1e-1,1e-3", "num_threads=1", f"hydra.sweep.dir={root / 'eval'}"))
    return root


def _aggregate(root: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m pcdeq.aggregate --root root --out out args``, in process."""
    return _in_process(ROOT / "pcdeq" / "aggregate.py", "--root", str(root), "--out", str(out), *args)


def test_sweep_gives_one_row_per_configuration_with_the_runs_statistics(sweeps: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    _ok(_aggregate(sweeps, out))
    table = pd.read_csv(out / "adhoc_pcdeq_linear_digits.csv", dtype={"solver.fwd_tol": str})
    # the inferred columns: what the overrides vary (the seed not among them), nothing they imply
    assert list(table.columns[:3]) == ["model", "model.activation", "solver.fwd_tol"]
    assert "model.variant" not in table.columns and "seed" not in table.columns
    # rows sorted by activation, then numerically by tolerance
    assert list(zip(table["model.activation"], table["solver.fwd_tol"].astype(float), strict=True)) == [
        ("sigmoid", 1e-4), ("sigmoid", 1e-2), ("tanh", 1e-4), ("tanh", 1e-2)]
    runs = _results(sweeps / "pcdeq")
    for _, row in table.iterrows():
        mine = [r for r in runs if _override(r, "model.activation") == row["model.activation"]
                and float(_override(r, "solver.fwd_tol")) == float(row["solver.fwd_tol"])]
        accs = [100 * r["test/acc"] for r in mine]
        assert row["test_acc n"] == 2 == len(mine)
        assert row["test_acc mean"] == pytest.approx(statistics.fmean(accs), abs=1e-4)
        assert row["test_acc std"] == pytest.approx(statistics.stdev(accs), abs=1e-4)
        assert row["fwd_iters mean"] == pytest.approx(statistics.fmean(r["fwd_iters"] for r in mine), rel=1e-5)
        assert row["params"] == mine[0]["num_params"] and row["notes"] == "seeds 0,1"
    md = (out / "adhoc_pcdeq_linear_digits.md").read_text()
    assert "| model | model.activation | solver.fwd_tol | test acc. % (n) |" in md
    assert (out / "adhoc_pcdeq_linear_digits.tex").read_text().count("\\\\") == 5  # header + 4 rows

    # the other family is a table of its own, never averaged with the pcDEQ runs
    mondeq = pd.read_csv(out / "adhoc_mondeq_fc_digits.csv")
    (m,) = _results(sweeps / "mondeq")
    assert len(mondeq) == 1 and mondeq["test_acc n"][0] == 1
    assert mondeq["test_acc mean"][0] == pytest.approx(100 * m["test/acc"], abs=1e-4)

    # the evaluation sweep: the varying key is the evaluation's solver setting
    ev = pd.read_csv(out / "adhoc_eval_pcdeq_linear_digits.csv")
    evals = {float(r["solver_overrides"]["fwd_tol"]): r for r in _results(sweeps / "eval")}
    assert list(ev.columns[:2]) == ["model", "solver.fwd_tol"] and list(ev["solver.fwd_tol"]) == [0.001, 0.1]
    for _, row in ev.iterrows():
        assert row["test_acc mean"] == pytest.approx(100 * evals[row["solver.fwd_tol"]]["test/acc"], abs=1e-4)
        assert row["test_fwd_iters mean"] == pytest.approx(evals[row["solver.fwd_tol"]]["test/fwd_iters"], rel=1e-5)

    # plots: figures against the numeric key, accuracy against epoch from the CSV logs
    for name in ("adhoc_pcdeq_linear_digits_vs_solver.fwd_tol", "adhoc_pcdeq_linear_digits_accuracy_vs_epoch",
                 "adhoc_eval_pcdeq_linear_digits_vs_solver.fwd_tol"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name

    # the report: every run read, and the table and row it went to
    report = (out / "report.md").read_text()
    for r in runs:
        rel = Path(r["run_dir"]).relative_to(sweeps)
        line = next(ln for ln in report.splitlines() if f"`{rel}`" in ln)
        assert f"adhoc_pcdeq_linear_digits: model.activation={_override(r, 'model.activation')}" in line
    assert report.count("| completed |") == 8 + 1 + 2


def test_group_by_metric_and_name(sweeps: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    _ok(_aggregate(sweeps / "pcdeq", out, "--group-by", "solver.fwd_tol", "--metric", "test/fwd_iters,train/epoch_s",
                   "--name", "tolerance study", "--no-plots"))
    table = pd.read_csv(out / "tolerance_study_pcdeq_linear_digits.csv")
    assert list(table.columns) == ["model", "solver.fwd_tol", "test/fwd_iters mean", "test/fwd_iters std",
                                   "test/fwd_iters n", "train/epoch_s mean", "train/epoch_s std", "train/epoch_s n",
                                   "notes"]
    runs = _results(sweeps / "pcdeq")
    for _, row in table.iterrows():
        mine = [r for r in runs if float(_override(r, "solver.fwd_tol")) == row["solver.fwd_tol"]]
        assert row["test/fwd_iters n"] == 4
        assert row["train/epoch_s mean"] == pytest.approx(
            statistics.fmean(r["metrics"]["train/epoch_s"] for r in mine), rel=1e-5)
    assert (out / "tolerance_study_pcdeq_linear_digits.md").read_text().startswith("### tolerance study: ")


@pytest.mark.parametrize("args, message", [
    (["--group-by", "model.widht"], "--group-by model.widht: no run has this key. Keys that vary between the runs: "),
    (["--metric", "test/accuracy"], "--metric test/accuracy: no run has this figure. Figures the runs have: "),
])
def test_unknown_key_or_metric_is_one_line_naming_what_exists(sweeps: Path, tmp_path: Path, args: list[str],
                                                               message: str) -> None:
    out = tmp_path / "tables"
    proc = _aggregate(sweeps / "pcdeq", out, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert ("model.activation" if "group-by" in message else "test/acc") in proc.stderr
    if "group-by" in message:  # run locations are not keys that vary; a near miss gets its close match
        assert "default_root_dir" not in proc.stderr and "did you mean" not in proc.stderr
        typo = _aggregate(sweeps / "pcdeq", out, "--group-by", "model.activaton")
        assert typo.returncode == 2 and typo.stderr.rstrip().endswith("did you mean model.activation?")
    assert not out.exists()  # nothing written


def test_mixed_good_and_bad_runs_and_only_bad_runs(sweeps: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(sweeps / "pcdeq", root, ignore=shutil.ignore_patterns("checkpoints"))
    runs = {Path(r["run_dir"]).name: r for r in _results(sweeps / "pcdeq")}
    names = sorted(runs)
    bad = root / names[0]
    res = json.loads((bad / "results.json").read_text())
    write_results(bad / "results.json", {**res, "run_dir": str(bad), "status": "diverged"})
    (root / names[1] / "results.json").write_text("{not json")
    for name in names[2:]:  # the copies are the runs of their new directory
        res = json.loads((root / name / "results.json").read_text())
        write_results(root / name / "results.json", {**res, "run_dir": str(root / name)})
    out = tmp_path / "tables"
    _ok(_aggregate(root, out, "--no-plots"))
    table = pd.read_csv(out / "adhoc_pcdeq_linear_digits.csv")
    assert table["test_acc n"].sum() == 6
    report = (out / "report.md").read_text()
    assert f"| diverged | `{names[0]}` | none, not averaged in" in report
    assert f"| unreadable | `{names[1]}` | none, not averaged in: " in report

    # only failed runs: one line, non-zero exit, nothing written
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copytree(bad, only_bad / "one")
    proc = _aggregate(only_bad, tmp_path / "bad_out")
    assert proc.returncode == 2 and "no completed run under" in proc.stderr and "diverged" in proc.stderr
    assert not (tmp_path / "bad_out").exists() and "Traceback" not in proc.stderr


def test_empty_and_unreadable_roots(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _aggregate(empty, tmp_path / "out")
    assert proc.returncode == 2 and "no results.json under" in proc.stderr
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as a user who can read any directory (root)")
        proc = _aggregate(locked, tmp_path / "out")
        assert proc.returncode == 2 and "cannot be read" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        locked.chmod(0o755)
    assert not (tmp_path / "out").exists()


def test_inference_varying_nested_and_numeric_order() -> None:
    config = pd.DataFrame({
        "model.channels": ["10", "9", "10", "9"],        # varies: kept
        "model.activation": ["tanh"] * 4,                 # constant: not a column
        "optim.sched.name": ["a", "a", "b", "b"],         # nested, varies: kept
        "optim.sched.warmup": ["0", "0", "5", "5"],      # restates the name: dropped
        "seed": ["0", "1", "0", "1"],                     # the sample, never a key
        "paths.output_dir": ["/a", "/b", "/c", "/d"],     # where it ran, never a key
        "trainer.default_root_dir": ["/a", "/b", "/c", "/d"],  # a path derived from the run's directory
    })
    assert infer_keys(config, ["model.channels"]) == ["model.channels", "optim.sched.name"]
    # the user's keys come first, in the order they wrote them
    assert infer_keys(config, ["optim.sched.name", "model.channels"]) == ["optim.sched.name", "model.channels"]
    assert list(sort_key(pd.Series(["10", "9", "1e-3"]))) == [(0, 10.0, ""), (0, 9.0, ""), (0, 1e-3, "")]
    order = config.sort_values(["model.channels"], key=sort_key)["model.channels"]
    assert list(order) == ["9", "9", "10", "10"]


def test_configuration_reads_overrides_and_resolved_config(tmp_path: Path) -> None:
    (tmp_path / "config_resolved.yaml").write_text("model:\n  channels: 8\n  activation: tanh\nsolver:\n"
                                                   "  fwd_tol: 0.0001\n")
    run = {"run_dir": str(tmp_path), "overrides": ["model.activation=sigmoid", "seed=3", "num_threads=1"]}
    config = configuration_frame([run]).iloc[0].to_dict()
    assert config == {"model.channels": "8", "model.activation": "sigmoid", "solver.fwd_tol": "0.0001",
                      "seed": "3"}


def test_unreadable_root_is_one_clear_error_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The permission check itself (the test above cannot see it when run by root, who reads everything)."""
    import pcdeq.reproduction.aggregate as agg
    from pcdeq.errors import ConfigError
    from pcdeq.reproduction.specs import load_profile

    monkeypatch.setattr(agg.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match="cannot be read \\(permission denied\\)"):
        agg.aggregate([], load_profile("full"), tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
