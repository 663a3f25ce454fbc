"""A full disk, an exceeded quota or a read-only filesystem while writing outputs: one line, nothing lost.

Each path is tested twice where the machine allows: on a real size-limited tmpfs (mounting needs root; those
tests skip with the reason otherwise) and with the OSError injected, which runs everywhere.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pcdeq.disk import DiskFullError, full_disk, human_bytes
from pcdeq.reproduction.aggregate import main as aggregate_main
from pcdeq.reproduction.plots import _epoch_curve
from pcdeq.results import atomic_write, run_key, write_results
from pcdeq.training.logfiles import CSVLogger, RunLogFileHandler
from pcdeq.training.space import checkpoint_bytes, warn_if_no_room
from tests.helpers import run_entry_point

ROOT = Path(__file__).resolve().parents[1]
ERRNOS = {"ENOSPC": errno.ENOSPC, "EDQUOT": errno.EDQUOT, "EROFS": errno.EROFS}


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``tmp_path/fs``, unmounted whatever the test does (skipped where mounting is not
    permitted: it needs root)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e}); the injected-error tests cover the same code")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the injected-error "
                    "tests cover the same code")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # still busy: detach it


def fill(mnt: Path, leave: int) -> None:
    """Fill the filesystem of ``mnt`` until about ``leave`` bytes are free."""
    free = shutil.disk_usage(mnt).free
    (mnt / "filler").write_bytes(b"\0" * max(free - leave, 0))


class FailingFile(io.RawIOBase):
    """A writable file that takes ``limit`` bytes, then fails as a full disk, quota or read-only mount does."""

    def __init__(self, f, limit: int, code: int) -> None:
        self.f, self.left, self.code = f, limit, code

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.left:
            raise OSError(self.code, {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                                      errno.EROFS: "Read-only file system"}[self.code])
        self.left -= len(b)
        return self.f.write(b)


# ---------------------------------------------------------------- finding the root cause


@pytest.mark.parametrize("name", list(ERRNOS))
def test_torch_secondary_error_is_traced_to_the_oserror_and_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "last.ckpt"
    atomic_write(path, lambda f: torch.save({"w": torch.arange(10.0)}, f))
    before = path.read_bytes()
    big = {"w": torch.zeros(50_000)}
    with pytest.raises(DiskFullError) as info:
        atomic_write(path, lambda f: torch.save(big, FailingFile(f, 4096, ERRNOS[name])))
    err = info.value
    assert err.errno == ERRNOS[name] and err.errno_name == name and err.path == path
    assert isinstance(err.__cause__, OSError) and not isinstance(err.__cause__, DiskFullError)
    text = str(err)
    assert text.startswith(f"cannot write {path}: ") and f"({name}; " in text and " free on " in text
    assert "\n" not in text and "unexpected pos" not in text and "fix: " in text
    assert err.record().startswith(f"{name}: [Errno {ERRNOS[name]}] ") and str(path) in err.record()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_full_disk_walks_cause_and_context_and_prefers_the_earliest() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 50752 vs 50644")  # noqa: B904 (implicit chaining, as torch does)
    except RuntimeError as e:
        secondary = e
    found = full_disk(secondary)
    assert found is not None and found.errno_name == "ENOSPC" and found.path is None
    assert "cannot write an output file" in str(found)
    first = DiskFullError(Path("/r/checkpoints/last.ckpt"), OSError(errno.ENOSPC, "No space left on device"))
    later = DiskFullError(Path("/r/csv/metrics.csv"), OSError(errno.ENOSPC, "No space left on device"))
    later.__context__ = first  # the CSV logger's flush failed while Lightning handled the checkpoint's failure
    assert full_disk(later) is first
    assert full_disk(OSError(errno.EACCES, "Permission denied")) is None
    assert full_disk(ValueError("x")) is None


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 * 2**20)] == ["0 B", "1023 B", "1.5 KiB", "3.0 MiB"]


# ---------------------------------------------------------------- each writer, on a real full filesystem


def test_atomic_write_on_a_full_tmpfs_keeps_the_previous_file(small_fs: Path) -> None:
    path = small_fs / "run" / "last.ckpt"
    atomic_write(path, lambda f: torch.save({"w": torch.arange(20_000.0)}, f))  # about 80 KB
    before = path.read_bytes()
    fill(small_fs, 16 * 1024)
    with pytest.raises(DiskFullError, match=rf"^cannot write {path}: No space left on device \(ENOSPC; "
                                            rf"[0-9.]+ KiB free on {small_fs}\); fix: "):
        atomic_write(path, lambda f: torch.save({"w": torch.zeros(40_000)}, f))
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_csv_log_on_a_full_tmpfs_names_metrics_csv(small_fs: Path) -> None:
    logger = CSVLogger(save_dir=str(small_fs), name="csv", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    fill(small_fs, 0)
    logger.log_metrics({"train/loss": 0.5, **{f"m{i}": float(i) for i in range(2000)}}, step=1)
    with pytest.raises(DiskFullError, match=rf"^cannot write {small_fs / 'csv' / 'metrics.csv'}: No space left"):
        logger.save()


@pytest.mark.parametrize("name", ["EROFS", "EDQUOT"])
def test_csv_log_injected_failure_names_metrics_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    name: str) -> None:
    from lightning.fabric.loggers import csv_logs

    def fail(self) -> None:
        raise OSError(ERRNOS[name], "injected")

    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    monkeypatch.setattr(csv_logs._ExperimentWriter, "save", fail)
    with pytest.raises(DiskFullError, match=rf"cannot write {tmp_path / 'csv' / 'metrics.csv'}: injected \({name}"):
        logger.save()


# ---------------------------------------------------------------- pre-flight


def test_preflight_warns_when_the_run_directory_has_no_room_for_a_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    net = torch.nn.Linear(100, 100)  # 10,100 float32 parameters: 40,400 bytes
    needed = checkpoint_bytes(net, "adamw")
    assert needed >= 3 * 40_400 + 64 * 1024  # weights plus Adam's two moments, and the extras
    assert checkpoint_bytes(net, "sgd") < needed
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("pcdeq.training.space.shutil.disk_usage", lambda p: usage._replace(free=needed - 1))
    with caplog.at_level("WARNING", logger="pcdeq"):
        assert warn_if_no_room(tmp_path, net, "adamw")
    assert "less than one checkpoint needs" in caplog.text and "hydra.run.dir" in caplog.text
    monkeypatch.setattr("pcdeq.training.space.shutil.disk_usage", lambda p: usage._replace(free=needed))
    assert not warn_if_no_room(tmp_path, net, "adamw")


def test_a_full_disk_before_the_run_starts_is_one_line_before_hydra_writes(small_fs: Path) -> None:
    fill(small_fs, 0)
    status, err = run_entry_point(TRAIN, *RUN, "trainer.max_epochs=1", f"hydra.run.dir={small_fs / 'R'}")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot write the run directory {small_fs / 'R'}: No space left on device")
    assert f"(ENOSPC; 0 B free on {small_fs}); fix: free space, or pass hydra.run.dir=" in lines[0]
    assert not (small_fs / "R").exists()  # nothing created


def test_an_exceeded_quota_at_the_start_check_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pcdeq.errors import OutputError
    from pcdeq.training.validate import check_writable_dir

    monkeypatch.setattr("pcdeq.training.validate.os.fsync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(OutputError, match=rf"cannot write the run directory {tmp_path / 'run'}: Disk quota exceeded "
                                          rf"in {tmp_path} \(EDQUOT; .* free on .*\); fix: free space, or pass"):
        check_writable_dir(tmp_path / "run", "run directory", "pass hydra.run.dir=...")
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


# ---------------------------------------------------------------- a run that resumes onto a full disk

TRAIN = ROOT / "train.py"
RUN = ["model=pcdeq_linear", "dataset=digits", "num_threads=1"]


def _epochs(run_dir: Path) -> list[int]:
    """Training epochs in the run's CSV logs, parts in order (an epoch redone after a failure counts once)."""
    import pandas as pd

    parts = sorted(run_dir.glob("csv_part*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    seen: list[int] = []
    for path in [*parts, run_dir / "csv" / "metrics.csv"]:
        rows = pd.read_csv(path)
        if "train/loss" not in rows:  # an attempt that failed before it finished an epoch of training
            continue
        for e in rows.dropna(subset=["train/loss"])["epoch"]:
            if int(e) not in seen:
                seen.append(int(e))
    return seen


def test_resume_onto_a_full_tmpfs_is_one_line_and_the_printed_command_continues(small_fs: Path) -> None:
    """The issue's scenario: 2 epochs, then the resume to 4 with about 60 KB free; then the printed command."""
    run = small_fs / "R"
    last = run / "checkpoints" / "last.ckpt"
    status, err = run_entry_point(TRAIN, *RUN, "trainer.max_epochs=2", f"hydra.run.dir={run}")
    assert status == 0, err
    before = last.read_bytes()
    fill(small_fs, 60 * 1024)
    status, err = run_entry_point(TRAIN, *RUN, "trainer.max_epochs=4", f"hydra.run.dir={run}", f"ckpt_path={last}")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot write {last}: No space left on device (ENOSPC; ")
    assert f"free on {small_fs}); fix: free space, or point hydra.run.dir / paths.log_dir elsewhere" in lines[0]
    assert last.read_bytes() == before  # the previous checkpoint, whole
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "failed" and res["error"].startswith("ENOSPC: [Errno 28]") and str(last) in res["error"]
    assert "less than one checkpoint needs" in (run / "train.log").read_text()  # warned before the first epoch
    assert checkpoint_bytes_of_run(run) >= len(before)  # the pre-flight estimate covers the real checkpoint

    (small_fs / "filler").unlink()  # the fix: free space, then the printed command
    command = shlex.split(lines[0].split("then resume with: ", 1)[1])
    assert command[:2] == ["python", "train.py"] and f"ckpt_path={last}" in command
    status, err = run_entry_point(TRAIN, *command[2:])
    assert status == 0, err
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "completed" and res["epochs"] == 4 and res["warm_start_from"] is None
    assert _epochs(run) == [0, 1, 2, 3]  # every epoch of the three attempts, as one sequence
    # the accuracy-against-epoch plots read the parts as one curve: that of an uninterrupted run
    full = small_fs.parent / "full"
    status, err = run_entry_point(TRAIN, *RUN, "trainer.max_epochs=4", f"hydra.run.dir={full}")
    assert status == 0, err
    resumed, uninterrupted = _epoch_curve(run), _epoch_curve(full)
    # the final test (logged one epoch past the last) is not an epoch of its own
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4]
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)


def checkpoint_bytes_of_run(run: Path) -> int:
    from pcdeq.training.module import EquilibriumModule

    module = EquilibriumModule.from_checkpoint(run / "checkpoints" / "last.ckpt")
    return checkpoint_bytes(module, "adamw")


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("two") / "R"
    status, err = run_entry_point(TRAIN, *RUN, "trainer.max_epochs=2", f"hydra.run.dir={run}")
    assert status == 0, err
    return run


@pytest.mark.parametrize(("target", "name"), [("last.ckpt", "ENOSPC"), ("metrics.csv", "EROFS"),
                                              ("config_resolved.yaml", "EDQUOT"), ("results.json", "ENOSPC")])
def test_each_output_of_a_resumed_run_failing_to_be_written_is_one_line(
        two_epochs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, name: str) -> None:
    """Injected: each of a run's writers meets a full disk, an exceeded quota or a read-only filesystem."""
    import tempfile

    from lightning.fabric.loggers import csv_logs

    run = tmp_path / "R"
    shutil.copytree(two_epochs, run)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    failure = OSError(ERRNOS[name], "injected")
    if target == "metrics.csv":
        def fail_csv(self) -> None:
            raise failure
        monkeypatch.setattr(csv_logs._ExperimentWriter, "save", fail_csv)
    else:
        real = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            if str(kwargs.get("prefix", "")).startswith(f".{target}."):
                raise failure
            return real(*args, **kwargs)
        monkeypatch.setattr("pcdeq.results.tempfile.mkstemp", mkstemp)
    status, err = run_entry_point(TRAIN, *RUN, "trainer.max_epochs=3", f"hydra.run.dir={run}", f"ckpt_path={last}")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    path = {"last.ckpt": last, "metrics.csv": run / "csv" / "metrics.csv"}.get(target, run / target)
    assert lines[0].startswith(f"error: cannot write {path}: injected ({name}; ") and "resume with: " in lines[0]
    assert last.read_bytes() == before or target in ("config_resolved.yaml", "results.json")  # written: epoch 3
    res = json.loads((run / "results.json").read_text())
    if target in ("last.ckpt", "metrics.csv"):  # failed during fit: recorded with the root cause
        assert res["status"] == "failed" and res["error"].startswith(f"{name}: ") and str(path) in res["error"]


def test_a_real_full_disk_from_the_command_line_prints_no_traceback(small_fs: Path) -> None:
    """The one real subprocess: what a user sees in the terminal, Hydra's own handler included."""
    import os

    run = small_fs / "R"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    fill(small_fs, 60 * 1024)
    proc = subprocess.run([sys.executable, str(TRAIN), *RUN, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                           "trainer.limit_test_batches=1", f"hydra.run.dir={run}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left on device (ENOSPC; " in errors[0] and "resume with: " in errors[0]


# ---------------------------------------------------------------- the aggregator's outputs


def _completed_run(root: Path, seed: int, acc: float) -> None:
    d = root / "sweep" / f"seed-{seed}"
    d.mkdir(parents=True)
    overrides = ["model=pcdeq_linear", f"seed={seed}"]
    write_results(d / "results.json", {
        "status": "completed", "task": "train", "experiment": "diskcheck", "overrides": overrides,
        "run_dir": str(d), "run_key": run_key("diskcheck", overrides), "started_at": "2026-01-01T00:00:00",
        "dataset": "digits", "family": "pcdeq", "model": "pcdeq_linear", "arch": "linear", "num_params": 10,
        "test/acc": acc})


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_aggregator_on_a_full_disk_keeps_the_previous_tables(how: str, tmp_path: Path, request: pytest.FixtureRequest,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = (request.getfixturevalue("small_fs") if how == "tmpfs" else tmp_path) / "tables"
    root = tmp_path / "runs"
    for seed, acc in enumerate((0.90, 0.92)):
        _completed_run(root, seed, acc)
    assert aggregate_main(["--root", str(root), "--out", str(out), "--no-plots"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(p.suffix == ".md" and p.name != "report.md" for p in before)
    _completed_run(root, 2, 0.50)  # a new run: every table would change
    if how == "tmpfs":
        fill(out.parent, 0)
    else:
        monkeypatch.setattr("pcdeq.results.tempfile.mkstemp", lambda *a, **k: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
    capsys.readouterr()
    assert aggregate_main(["--root", str(root), "--out", str(out), "--no-plots"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out}/")
    assert "No space left on device (ENOSPC; " in lines[0]
    assert lines[0].endswith("fix: free space on that filesystem, or write the tables elsewhere with --out DIR, "
                             "then run the command again")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # every previous file, whole


# ---------------------------------------------------------------- train.log


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_train_log_on_a_full_disk_is_one_warning_not_a_traceback_per_record(
        how: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    where = request.getfixturevalue("small_fs") if how == "tmpfs" else tmp_path
    handler = RunLogFileHandler(where / "train.log")
    logger = logging.getLogger("pcdeq.test_disk")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("first record")
        if how == "tmpfs":
            fill(where, 0)
        else:
            def full(*args) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(handler, "flush", full)
        for i in range(200):
            logger.warning("epoch %d %s", i, "x" * 100)  # far more than the last page of train.log holds
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: cannot write {where / 'train.log'}: No space left "
                                                   "on device (ENOSPC; ")
    assert (where / "train.log").read_text().startswith("first record")
