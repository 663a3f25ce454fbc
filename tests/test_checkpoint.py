"""Checkpoints (pcdeq.training.checkpoint) and results.json: atomic writes, safe reads, mismatch checks."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pcdeq.errors import CheckpointError
from pcdeq.results import atomic_write_json, write_results
from pcdeq.training import checkpoint as ckpt_mod
from pcdeq.training.checkpoint import (
    CHECKPOINT_VERSION,
    VERSION_KEY,
    AtomicCheckpointIO,
    check_resume_checkpoint,
    check_same_run,
    read_checkpoint,
)
from pcdeq.training.module import EquilibriumModule
from pcdeq.training.pipeline import evaluate, resolve_config, train
from tests.helpers import CONF, compose_train

TINY = ["model=pcdeq_linear", "model.channels=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_test_batches=1", "test_every_epoch=false", "logger=none", "num_threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a tiny pcdeq_linear run on digits."""
    out = tmp_path_factory.mktemp("run")
    train(compose_train(*TINY, f"paths.output_dir={out}"))
    return out / "checkpoints" / "last.ckpt"


def _fail_midway(monkeypatch, target, name: str) -> None:
    """Make ``target.name`` write half its bytes and then fail as a full disk does."""
    real = getattr(target, name)

    def half_then_enospc(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, name, half_then_enospc)


# ---------------------------------------------------------------- atomic writes


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    good = {"state_dict": {"w": torch.arange(1000.0)}, "epoch": 1}
    io.save_checkpoint(good, path)
    before = path.read_bytes()
    _fail_midway(monkeypatch, ckpt_mod.torch, "save")
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "epoch": 2}, path)
    assert path.read_bytes() == before  # the good checkpoint, whole
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_failed_results_write_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "results.json"
    write_results(path, {"status": "completed", "test/acc": 0.9})
    before = path.read_text()
    monkeypatch.setattr("pcdeq.results.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        atomic_write_json(path, {"status": "failed"})
    assert path.read_text() == before and json.loads(before)["status"] == "completed"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # the usual permissions, not mkstemp's private ones


def test_trainer_writes_checkpoints_atomically_and_loadable_with_weights_only(trained: Path) -> None:
    ckpt = torch.load(trained, weights_only=True)  # plain values only: safe loading works
    assert ckpt[VERSION_KEY] == CHECKPOINT_VERSION and ckpt["hyper_parameters"]["config"]["model"]["arch"] == "linear"
    assert not [p for p in trained.parent.iterdir() if p.name.endswith(".tmp")]
    module = EquilibriumModule.from_checkpoint(trained)
    assert module.net.describe()["activation"] == "tanh"


# ---------------------------------------------------------------- damaged and foreign checkpoints


def test_truncated_empty_and_garbage_checkpoints(tmp_path: Path, trained: Path) -> None:
    data = trained.read_bytes()
    cases = {"truncated.ckpt": data[: len(data) // 2], "empty.ckpt": b"", "garbage.ckpt": b"not a checkpoint" * 9}
    messages = {"truncated.ckpt": "is truncated or damaged (", "empty.ckpt": "is empty (0 bytes)",
                "garbage.ckpt": "is truncated or damaged ("}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="fix: use an intact checkpoint") as info:
            read_checkpoint(tmp_path / name)
        assert messages[name] in str(info.value) and str(tmp_path / name) in str(info.value)
        assert "\n" not in str(info.value)


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "evil": Path("/")}, path)  # an object a weights_only load will not build
    with pytest.raises(CheckpointError, match="a safe load \\(weights_only=True\\) refuses"):
        read_checkpoint(path)
    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match="is not a Lightning checkpoint"):
        read_checkpoint(path)
    torch.save({"state_dict": {}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointError, match="is not a pcdeq training checkpoint"):
        EquilibriumModule.from_checkpoint(path)


def test_checkpoint_of_a_newer_pcdeq(tmp_path: Path, trained: Path) -> None:
    ckpt = torch.load(trained, weights_only=True)
    ckpt[VERSION_KEY] = CHECKPOINT_VERSION + 1
    torch.save(ckpt, tmp_path / "new.ckpt")
    newer = f"was written by a newer pcdeq (checkpoint version {CHECKPOINT_VERSION + 1}; this one reads up to "
    with pytest.raises(CheckpointError, match=re.escape(newer + f"{CHECKPOINT_VERSION})")):
        EquilibriumModule.from_checkpoint(tmp_path / "new.ckpt")


def test_checkpoint_whose_parameters_do_not_fit_its_config(tmp_path: Path, trained: Path) -> None:
    ckpt = torch.load(trained, weights_only=True)
    ckpt["hyper_parameters"]["config"]["model"]["channels"] = 12  # e.g. an edited or mixed-up file
    torch.save(ckpt, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError, match=r"does not fit the network of its config: parameters \d+ of another "
                                              r"shape \(e.g. [\w.]+: checkpoint \[\d+(, \d+)*\], network"):
        EquilibriumModule.from_checkpoint(tmp_path / "odd.ckpt")


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=pcdeq_conv", "model.channels=8"],
     "model.arch: checkpoint 'linear', config 'conv'); fix: run with the checkpoint's settings (model=pcdeq_linear)"),
    (["model=pcdeq_linear", "model.channels=8", "dataset=mnist"],
     "dataset.name: checkpoint 'digits', config 'mnist'); fix: run with the checkpoint's settings (dataset=digits)"),
    (["model=mondeq_fc", "model.channels=8"], "model.family: checkpoint 'pcdeq', config 'mondeq'"),
    (["model=pcdeq_linear", "model.channels=16"], "model.channels: checkpoint 8, config 16"),
    (["model=pcdeq_linear", "model.channels=8", "model.activation=sigmoid"],
     "model.activation: checkpoint 'tanh', config 'sigmoid'"),
])
def test_resuming_from_a_checkpoint_of_another_model(tmp_path: Path, trained: Path, overrides: list[str],
                                                     message: str) -> None:
    config = resolve_config(compose_train(*overrides, f"ckpt_path={trained}", f"paths.output_dir={tmp_path}"))
    with pytest.raises(CheckpointError, match="was trained with other settings than this config") as info:
        check_resume_checkpoint(config)
    assert message in str(info.value)


def test_evaluate_a_truncated_checkpoint_writes_nothing(tmp_path: Path, trained: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(trained.read_bytes()[:1000])
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={bad}", f"paths.output_dir={tmp_path / 'ev'}"])
    with pytest.raises(CheckpointError, match="is truncated or damaged"):
        evaluate(cfg)
    assert not (tmp_path / "ev" / "results.json").exists()


def test_trainer_plugins_turn_off_lightnings_slurm_requeue_under_submitit(monkeypatch) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for var in ("SUBMITIT_EXECUTOR", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert [type(p) for p in ckpt_mod.trainer_plugins()] == [AtomicCheckpointIO]
    # a submitit job on Slurm: submitit requeues (and the job resumes from its own last.ckpt), Lightning must not
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    plugins = ckpt_mod.trainer_plugins()
    assert isinstance(plugins[1], SLURMEnvironment) and plugins[1].auto_requeue is False


def test_requeued_job_resumes_from_its_own_checkpoint(tmp_path: Path, monkeypatch, trained: Path) -> None:
    run = trained.parent.parent
    config = {"ckpt_path": None, "paths": {"output_dir": str(run)}}
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert ckpt_mod.resumable_checkpoint(config) is None  # not a submitit job: a fresh start, as asked
    assert ckpt_mod.resumable_checkpoint({**config, "auto_resume": True}) == trained  # unless auto_resume
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert ckpt_mod.resumable_checkpoint(config) == trained
    assert ckpt_mod.resumable_checkpoint({**config, "ckpt_path": "x.ckpt"}) is None  # an explicit ckpt_path wins
    assert ckpt_mod.resumable_checkpoint({**config, "paths": {"output_dir": str(tmp_path)}}) is None  # first start


def _shared_dir(tmp_path: Path, trained: Path, launched_key: str | None) -> Path:
    """A run directory holding ``trained`` as its last.ckpt, as another run left it."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(trained.read_bytes())
    if launched_key is not None:
        atomic_write_json(run / "launch.json", {"run_key": launched_key, "started_at": "2026-01-01T00:00:00"})
    return run


def test_resume_refuses_a_checkpoint_left_by_another_run_identity(tmp_path: Path, trained: Path) -> None:
    seed = torch.load(trained, weights_only=True)["hyper_parameters"]["config"]["seed"]
    mine = f"pcdeq_multiconv_mnist/model.activation=softsign,seed={seed + 2}"
    run = _shared_dir(tmp_path, trained, f"pcdeq_multiconv_mnist/model.activation=softsign,seed={seed}")
    path = run / "checkpoints" / "last.ckpt"
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(CheckpointError, match=r"belongs to the run 'pcdeq_multiconv_mnist/.*seed=\d+' \(its "
                       r"launch.json\), not to this run .*fix: give each run its own directory"):
        check_same_run({"seed": seed}, mine, path)
    assert sorted(p.name for p in run.rglob("*")) == before
    check_same_run({"seed": seed}, f"pcdeq_multiconv_mnist/model.activation=softsign,seed={seed}", path)  # its own


def test_auto_resume_with_another_seed_stops_before_touching_the_run(tmp_path: Path, trained: Path) -> None:
    """The incident behind the check: a second seed launched into the first seed's directory (no launch.json key
    to tell them apart outside a Hydra job, so the checkpoint's saved seed decides)."""
    seed = torch.load(trained, weights_only=True)["hyper_parameters"]["config"]["seed"]
    run = _shared_dir(tmp_path, trained, None)
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("epoch,train/loss\n0,1.0\n")
    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}

    before = files()
    cfg = compose_train(*TINY, f"seed={seed + 2}", "auto_resume=true", f"paths.output_dir={run}")
    with pytest.raises(CheckpointError, match=rf"a run with seed={seed} \(this run: seed={seed + 2}\)"):
        train(cfg)
    assert files() == before  # no csv_part1, no results.json


def test_a_resume_by_hand_in_the_run_directory_keeps_every_epoch_of_the_log(tmp_path: Path) -> None:
    import pandas as pd

    run = tmp_path / "run"
    tiny = [o for o in TINY if o != "logger=none" and not o.startswith("trainer.max_epochs")]
    train(compose_train(*tiny, "trainer.max_epochs=2", f"paths.output_dir={run}"))
    first = (run / "csv" / "metrics.csv").read_bytes()
    res = train(compose_train(*tiny, "trainer.max_epochs=4", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                              f"paths.output_dir={run}"))
    assert res["status"] == "completed" and res["warm_start_from"] is None  # a continuation, not a warm start
    assert (run / "csv_part1" / "metrics.csv").read_bytes() == first  # the first attempt, untouched
    epochs = [int(e) for part in ("csv_part1", "csv")
              for e in pd.read_csv(run / part / "metrics.csv").dropna(subset=["train/loss"])["epoch"]]
    assert epochs == [0, 1, 2, 3]  # the two files read in order: one sequence, every epoch once


def test_auto_resume_of_an_interrupted_run_keeps_every_epoch_of_the_log(tmp_path: Path) -> None:
    import pandas as pd

    run = tmp_path / "run"
    tiny = [o for o in TINY if o != "logger=none" and not o.startswith("trainer.max_epochs")]
    done = train(compose_train(*tiny, "trainer.max_epochs=1", f"paths.output_dir={run}"))
    write_results(run / "results.json", {**done, "status": "interrupted"})  # as a kill after epoch 1 leaves it
    first = (run / "csv" / "metrics.csv").read_bytes()
    res = train(compose_train(*tiny, "trainer.max_epochs=2", "auto_resume=true", f"paths.output_dir={run}"))
    assert res["status"] == "completed" and res["epochs"] == 2 and res["warm_start_from"] is None
    assert (run / "csv_part1" / "metrics.csv").read_bytes() == first
    epochs = [int(e) for part in ("csv_part1", "csv")
              for e in pd.read_csv(run / part / "metrics.csv").dropna(subset=["train/loss"])["epoch"]]
    assert epochs == [0, 1]


def test_a_warm_start_from_another_run_logs_afresh_and_records_its_source(tmp_path: Path) -> None:
    import pandas as pd

    source, run = tmp_path / "source", tmp_path / "warm"
    tiny = [o for o in TINY if o != "logger=none" and not o.startswith("trainer.max_epochs")]
    src = train(compose_train(*tiny, "trainer.max_epochs=1", f"paths.output_dir={source}"))
    source_log = (source / "csv" / "metrics.csv").read_bytes()
    ckpt = source / "checkpoints" / "last.ckpt"
    res = train(compose_train(*tiny, "trainer.max_epochs=2", f"ckpt_path={ckpt}", f"paths.output_dir={run}"))
    assert res["status"] == "completed"
    assert res["warm_start_from"] == {"checkpoint": str(ckpt.resolve()), "run_key": src["run_key"]}
    assert json.loads((run / "results.json").read_text())["warm_start_from"]["checkpoint"] == str(ckpt.resolve())
    assert not list(run.glob("csv_part*"))  # its own, fresh log: the epoch it trained
    assert list(pd.read_csv(run / "csv" / "metrics.csv").dropna(subset=["train/loss"])["epoch"]) == [1]
    assert (source / "csv" / "metrics.csv").read_bytes() == source_log  # the source run's history, untouched
