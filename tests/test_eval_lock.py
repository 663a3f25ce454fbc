"""eval.py follows training's rules for a run directory: one process per directory, and ``skip_if_done``.

A real checkpoint (one epoch of pcdeq_linear on the embedded digits) is trained once for the module; the holder
of a lock is a real second process, since the lock is the kernel's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pcdeq.training.pipeline import evaluate
from pcdeq.training.runlock import LOCK_NAME
from pcdeq.training.worklog import ENV, read_outcomes
from tests.helpers import CONF, held_by_another_process, run_entry_point

ROOT = Path(CONF).parent
TINY = ["model=pcdeq_linear", "model.channels=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "test_every_epoch=false", "logger=none", "num_threads=1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The last.ckpt of a tiny completed training run; the environment of every eval of the module."""
    run = tmp_path_factory.mktemp("source") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("PCDEQ_LOG_DIR", str(run.parent))
        status, stderr = run_entry_point(ROOT / "train.py", *TINY, f"hydra.run.dir={run}")
        assert status == 0, stderr[-3000:]
        yield run / "checkpoints" / "last.ckpt"


def _eval(ckpt: Path, run_dir: Path, *overrides: str) -> tuple[int, str]:
    return run_entry_point(ROOT / "eval.py", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", "num_threads=1",
                           *overrides)


def _log(run_dir: Path) -> str:
    """What the evaluations in ``run_dir`` logged (Hydra's job log, appended to by each)."""
    return (run_dir / "eval.log").read_text()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_eval_on_a_directory_in_use_exits_2_with_one_line_and_writes_nothing(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, worklog = tmp_path / "ev", tmp_path / "worklog.jsonl"
    monkeypatch.setenv(ENV, str(worklog))
    with held_by_another_process(run) as holder:
        status, stderr = _eval(ckpt, run)
    assert status == 2 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = _errors(stderr)
    assert re.fullmatch(rf"error: run directory {run} is in use by another process \(host [^,]+, pid {holder.pid}, "
                        r"started [^)]+\); fix: wait for it to end, or give this run its own directory .*", line), line
    assert not (run / "results.json").exists()
    assert set(read_outcomes(worklog).values()) == {"failed"}  # the worker summary counts it as a failed job


def test_skip_if_done_leaves_a_completed_evaluation_byte_identical_and_runs_another_setting(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, worklog = tmp_path / "ev", tmp_path / "worklog.jsonl"
    assert _eval(ckpt, run, "solver.fwd_tol=1e-2")[0] == 0
    first = (run / "results.json").read_bytes()
    monkeypatch.setenv(ENV, str(worklog))
    status, stderr = _eval(ckpt, run, "solver.fwd_tol=1e-2", "skip_if_done=true")
    assert status == 0 and _log(run).count("already completed, skipped (skip_if_done)") == 1, stderr[-3000:]
    assert (run / "results.json").read_bytes() == first
    assert list(read_outcomes(worklog).values()) == ["done"]
    # the oracle that the skip is the key's doing: another tolerance in that directory is another evaluation
    status, stderr = _eval(ckpt, run, "solver.fwd_tol=1e-3", "skip_if_done=true")
    assert status == 0 and _log(run).count("already completed") == 1, stderr[-3000:]
    assert (run / "results.json").read_bytes() != first
    assert sorted(read_outcomes(worklog).values()) == ["completed", "done"]
    # the same tolerance on other data (synthetic=true) is another evaluation too: it runs, under its own key
    status, stderr = _eval(ckpt, run, "solver.fwd_tol=1e-3", "synthetic=true", "skip_if_done=true")
    assert status == 0 and _log(run).count("already completed") == 1, stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["run_key"].endswith("|solver.fwd_tol=0.001,synthetic=True")


def test_skip_if_done_skips_an_evaluation_another_process_holds(ckpt: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run, worklog = tmp_path / "ev", tmp_path / "worklog.jsonl"
    monkeypatch.setenv(ENV, str(worklog))
    with held_by_another_process(run) as holder:
        status, stderr = _eval(ckpt, run, "skip_if_done=true")
        assert status == 0 and "Traceback" not in stderr, stderr[-3000:]
        (line,) = [s for s in _log(run).splitlines() if "running in another process" in s]
        assert re.search(rf"skipped \(skip_if_done\): {run} \(host [^,]+, pid {holder.pid}, started [^)]+\)$", line)
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):  # the library call says so too
            cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", "skip_if_done=true", f"paths.output_dir={run}"])
        res = evaluate(cfg)
        assert res["status"] == "in_use" and res["holder"]["pid"] == holder.pid and res["run_dir"] == str(run)
    assert LOCK_NAME in {p.name for p in run.iterdir()} and not (run / "results.json").exists()
    assert set(read_outcomes(worklog).values()) == {"in_use"}


@pytest.mark.parametrize("script", ["eval.py", "train.py"])
def test_a_bad_skip_if_done_value_is_one_line(script: str, tmp_path: Path) -> None:
    status, stderr = run_entry_point(ROOT / script, "ckpt_path=x.ckpt", "skip_if_done=maybe",
                                     f"hydra.run.dir={tmp_path / 'run'}")
    assert status == 2 and stderr.strip() == ("error: skip_if_done=maybe: not true or false; valid: one of true, "
                                              "false, e.g. skip_if_done=true")
    assert not (tmp_path / "run").exists()
