"""One process per run directory: the lock (held, stale, garbage, read-only) against real processes, and train()."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcdeq.errors import OutputError
from pcdeq.training.pipeline import train
from pcdeq.training.runlock import LOCK_NAME, RunInUseError, holder_record, lock_holder, run_lock
from tests.helpers import compose_train, held_by_another_process

TINY = ["model=pcdeq_linear", "model.channels=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_test_batches=1", "test_every_epoch=false", "logger=none", "num_threads=1"]


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with held_by_another_process(run) as holder:
        with pytest.raises(RunInUseError, match=rf"run directory {run} is in use by another process \(host "
                           rf"{platform.node()}, pid {holder.pid}, started 20.*\); fix: wait for it to end, or "
                           "give this run its own"):
            with run_lock(run):
                pass
        assert holder_record(run)["pid"] == holder.pid  # the refused attempt did not overwrite the holder's record
    # SIGKILL: no cleanup ran, yet the operating system has dropped the lock with the process
    with run_lock(run):
        assert holder_record(run)["pid"] == os.getpid()
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


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped (nothing runs under it now)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_the_probe_sees_a_live_holder_only_and_never_keeps_the_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert lock_holder(run) is None and not run.exists()  # never locked: nothing created
    with held_by_another_process(run) as holder:
        found = lock_holder(run)
        assert found is not None and found["pid"] == holder.pid and found["host"] == platform.node()
        (run / LOCK_NAME).write_text("\x00garbage{")  # the record is advisory; the lock is the kernel's
        assert lock_holder(run) == {}
        with pytest.raises(RunInUseError, match="holder unknown: its lock file names none"):
            with run_lock(run):
                pass
    assert lock_holder(run) is None  # SIGKILLed holder: the kernel dropped its lock
    with run_lock(run):  # and a probe between the runs did not keep any lock
        assert lock_holder(run) == holder_record(run) and holder_record(run)["pid"] == os.getpid()


def test_a_garbage_lock_file_or_one_naming_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    for i, text in enumerate(["not json at all \xff", "[1, 2]", json.dumps({"pid": _dead_pid(), "host":
                                                                           platform.node(), "started_at": "x"})]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / LOCK_NAME).write_text(text)
        assert lock_holder(run) is None  # nobody holds it, whatever the file says
        with run_lock(run):
            assert holder_record(run)["pid"] == os.getpid()  # the record now names this process


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({made.stderr.strip() or 'mount failed'}; needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_run_directory_on_a_read_only_filesystem_is_one_line(read_only_dir: Path) -> None:
    with pytest.raises(OutputError, match=rf"^cannot lock run directory {read_only_dir}/run: Read-only file "
                                          r"system .*; fix: point hydra.run.dir / paths.output_dir at a writable"):
        with run_lock(read_only_dir / "run"):
            pass
    assert lock_holder(read_only_dir / "run") is None


def test_a_filesystem_without_flock_is_one_line_and_can_be_switched_off(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    def refuse(fd: int, op: int) -> None:
        raise OSError(38, "Function not implemented")  # ENOSYS: what Lustre mounted noflock answers

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(OutputError, match=r"filesystem refuses flock .*set PCDEQ_RUN_LOCK=off"):
        with run_lock(tmp_path / "run"):
            pass
    monkeypatch.setenv("PCDEQ_RUN_LOCK", "off")
    with run_lock(tmp_path / "run2"):
        assert not (tmp_path / "run2").exists()
