"""One process per run directory: the lock against a second real process, and train() on a locked directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pcdeq.training.pipeline import train
from pcdeq.training.runlock import LOCK_NAME, RunInUseError, lock_holder, run_lock
from tests.helpers import compose_train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=pcdeq_linear", "model.channels=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_test_batches=1", "test_every_epoch=false", "logger=none", "num_threads=1"]
HOLD = "import sys, time\nfrom pcdeq.training.runlock import run_lock\nwith run_lock(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(120)\n"


@contextmanager
def held_by_another_process(run_dir: Path) -> Iterator[subprocess.Popen]:
    """A second Python process holding ``run_dir``'s lock until the block ends (then killed, not released)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with held_by_another_process(run) as holder:
        with pytest.raises(RunInUseError, match=rf"run directory {run} is in use by another process \(pid "
                           rf"{holder.pid}, host .*\); fix: wait for it to end, or give this run its own"):
            with run_lock(run):
                pass
        assert lock_holder(run)["pid"] == holder.pid  # the refused attempt did not overwrite the holder's record
    # SIGKILL: no cleanup ran, yet the operating system has dropped the lock with the process
    with run_lock(run):
        assert lock_holder(run)["pid"] == os.getpid()
        with pytest.raises(RunInUseError):  # and it excludes a second holder in this process too (own open file)
            with run_lock(run):
                pass


def test_train_on_a_directory_in_use_stops_or_skips_without_writing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with held_by_another_process(run):
        with pytest.raises(RunInUseError, match="is in use by another process"):
            train(compose_train(*TINY, f"paths.output_dir={run}"))
        # a cooperative reproduction worker goes on to its next run instead
        res = train(compose_train(*TINY, "skip_if_done=true", "auto_resume=true", f"paths.output_dir={run}"))
        assert res["status"] == "in_use" and res["run_dir"] == str(run)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # no launch.json, logs or results
    res = train(compose_train(*TINY, f"paths.output_dir={run}"))  # the holder is gone: the run goes ahead
    assert res["status"] == "completed" and (run / "results.json").is_file()


def test_the_command_line_names_the_holder_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with held_by_another_process(run) as holder:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run}"], cwd=ROOT,
                              env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0] and "Traceback" not in proc.stderr
    assert not (run / "results.json").exists()
