"""train.py / eval.py end to end, as a user runs them (the real CLI: subprocesses, or the script run in process)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import run_entry_point

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {
    "schema_version", "status", "dataset", "model", "activation", "variant", "seed", "num_params", "test/acc",
    "test/loss", "fwd_iters", "bwd_iters", "epochs", "train_time_s", "epoch_time_s", "samples_per_s",
    "peak_memory_mb", "git_commit", "versions", "overrides", "started_at", "finished_at",
}
SMALL_SYNTHETIC = ["num_threads=1", "dataset=mnist", "dataset.synthetic=true", "dataset.synthetic_size=[384,128]",
                   "dataset.num_workers=0", "model.channels=8"]


def cli(script: str, *overrides: str, log_dir: Path, timeout: int = 300, wandb_mode: str = "disabled"
        ) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": wandb_mode, "PCDEQ_LOG_DIR": str(log_dir), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_digits_end_to_end_then_eval(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(cli("train.py", "model=pcdeq_linear", "trainer.max_epochs=4", f"hydra.run.dir={run}", log_dir=tmp_path))
    res = json.loads((run / "results.json").read_text())
    assert REQUIRED_KEYS <= res.keys()
    assert res["status"] == "completed" and res["epochs"] == 4 and res["dataset"] == "digits"
    assert res["model"] == "pcdeq_linear" and res["activation"] == "tanh" and res["variant"] == "pcdeq1"
    assert res["test/acc"] > 0.5  # chance is 0.1
    assert res["num_params"] == 64 * 64 + 64 + 4 * 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert res["fwd_iters"] >= 1 and res["bwd_iters"] >= 1 and res["samples_per_s"] > 0
    assert res["overrides"][0] == "model=pcdeq_linear"
    # per-epoch CSV metrics, checkpoint, resolved config
    metrics = pd.read_csv(run / "csv" / "metrics.csv")
    per_epoch = metrics.dropna(subset=["train/fwd_iters"])
    assert len(per_epoch) == 4
    for col in ["train/bwd_iters_max", "train/fwd_residual_max", "train/fwd_not_converged", "train/cw_bound_max",
                "test/acc", "train/lr", "train/epoch_s", "train/samples_per_s"]:
        assert col in metrics and metrics[col].notna().any(), col
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config_resolved.yaml").is_file()

    ev = tmp_path / "eval"
    ok(cli("eval.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={ev}", log_dir=tmp_path))
    eres = json.loads((ev / "results.json").read_text())
    assert eres["task"] == "eval" and eres["status"] == "completed"
    assert eres["test/acc"] == pytest.approx(res["test/acc"], abs=1e-6)


def test_synthetic_runs_started_together_do_not_collide(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "PCDEQ_LOG_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, str(ROOT / "train.py"), "model=pcdeq_linear", *SMALL_SYNTHETIC, "optim.lr=1e-2",
            "trainer.max_epochs=3"]
    procs = [subprocess.Popen([*args, f"seed={s}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    results = sorted((tmp_path / "train" / "runs").glob("*/results.json"))
    assert len(results) == 2  # two distinct run directories
    for path in results:
        res = json.loads(path.read_text())
        assert res["status"] == "completed" and res["num_params"] > 0
        assert res["test/acc"] > 0.2  # learnable synthetic classes; chance is 0.1
    assert {json.loads(p.read_text())["seed"] for p in results} == {0, 1}


def test_validation_split_keeps_best_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(cli("train.py", "model=pcdeq_linear", "dataset.val_size=200", "trainer.max_epochs=2",
           f"hydra.run.dir={run}", log_dir=tmp_path))
    res = json.loads((run / "results.json").read_text())
    assert res["val/acc"] is not None and res["test/acc"] is not None
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_multirun_jobs_are_separate_also_in_wandb(tmp_path: Path) -> None:
    # One process runs both jobs (Hydra's basic launcher): each must get its own directory and its own wandb run.
    ok(cli("train.py", "-m", "logger=wandb", "model=pcdeq_linear", "model.activation=tanh,sigmoid",
           "trainer.max_epochs=1", "num_threads=1", log_dir=tmp_path, wandb_mode="offline"))
    jobs = sorted((tmp_path / "train" / "multiruns").glob("*/*/results.json"))
    results = [json.loads(p.read_text()) for p in jobs]
    assert sorted(r["activation"] for r in results) == ["sigmoid", "tanh"]
    assert sorted(r["variant"] for r in results) == ["pcdeq1", "pcdeq2"]
    assert len({r["run_dir"] for r in results}) == 2
    wandb_runs = [sorted(p.parent.glob("wandb/offline-run-*")) for p in jobs]
    assert all(len(runs) == 1 for runs in wandb_runs)  # one wandb run per job, none reused
    assert wandb_runs[0][0].name != wandb_runs[1][0].name


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(cli("train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "callbacks=debug",
           "model=pcdeq_conv", *SMALL_SYNTHETIC, "trainer.max_epochs=1", f"hydra.run.dir={run}", log_dir=tmp_path))
    reports = [json.loads((run / f"sanity_rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world_size"] == 2 and rep["steps"] > 0
        assert rep["params_without_grad"] == []  # every parameter received a gradient on every rank
        assert rep["projection_ok"] and rep["min_weight"] >= 0
    assert reports[0]["param_checksum"] == pytest.approx(reports[1]["param_checksum"], rel=1e-12)
    assert json.loads((run / "results.json").read_text())["status"] == "completed"


def _write_truncated_mnist(root: Path) -> None:
    """Valid MNIST IDX files of 20 / 10 images, with the training images cut short."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 20), ("t10k", 10)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">4I", 2051, n, 28, 28) + bytes(n * 784))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 2049, n) + bytes(n))
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])


# (overrides, message): every class of bad value, each one line, exit status 2, no traceback, nothing written.
# {tmp} is a fresh directory; {file} is a plain file.
BAD_INPUT = [
    (["model=nope"], "model=nope: unknown choice (no conf/model/nope.yaml); valid: one of mondeq, mondeq_conv"),
    (["model.activation=relu"], "unknown activation 'relu'; valid choices: tanh"),
    (["model.activation=sigmoid", "model.variant=pcdeq1"], "valid activations for 'pcdeq1': tanh, softsign, relu6"),
    (["optim.lr=-0.1"], "optim.lr=-0.1: out of range; valid: a number > 0, e.g. optim.lr=5e-4"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9,1.5]: 1.5 is not valid; valid: a list of 2 values, each a number"),
    (["optim.scheduler.name=cosine"], "optim.scheduler.name=cosine: unknown choice; valid: one of multistep, step"),
    (["optim.scheduler.milestones=[40]"],
     "optim.scheduler.milestones=[40]: past the last epoch (trainer.max_epochs=30); valid: epochs in [1, 29]"),
    (["dataset.batch_size=0"], "dataset.batch_size=0: out of range; valid: an integer >= 1, e.g. "
                               "dataset.batch_size=64"),
    (["dataset.batch_size=abc"], "dataset.batch_size=abc: not an integer; valid: an integer >= 1"),
    (["dataset.val_size=5000"], "dataset.val_size=5000: leaves no training data (digits has 1437 training images)"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0: out of range; valid: an integer >= 1"),
    (["num_threads=0"], "num_threads=0: out of range; valid: an integer >= 1"),
    (["solver.fwd_tol=-0.5"], "solver.fwd_tol=-0.5: out of range; valid: a number in [0, 1), e.g. solver.fwd_tol=1e-4"),
    (["solver.fwd_max_iter=0"], "solver.fwd_max_iter=0: out of range; valid: an integer >= 1"),
    (["model=mondeq_fc", "solver.alpha=0"], "solver.alpha=0: out of range; valid: a number > 0"),
    (["model=node_aug_conv", "model.augment_dim=-1"], "model.augment_dim=-1: out of range; valid: an integer >= 1"),
    (["model=node_conv", "solver.ode_method=rk45"], "solver.ode_method=rk45: unknown choice; valid: one of dopri5"),
    (["-m", "optim.lr=1e-3,-1e-3"], "optim.lr=-0.001: out of range"),  # a sweep fails before its first job
    (["dataset=mnist", "dataset.download=false", "paths.data_dir={tmp}"], "MNIST/raw/train-images-idx3-ubyte"),
    (["dataset=mnist", "dataset.download=false", "paths.data_dir={mnist}"],
     "MNIST/raw/train-images-idx3-ubyte is damaged: truncated: 5000 bytes, its header announces 20 items"),
    (["dataset=mnist", "paths.data_dir={file}"], "is a file, not a directory; fix: point paths.data_dir=..."),
    (["ckpt_path={tmp}/none.ckpt"], "/empty/none.ckpt: checkpoint not found; fix: pass an existing checkpoint"),
    (["hydra.run.dir={file}/run"], "cannot create the run directory"),
]


# Cases that also go through a real `python train.py` process, one per place a user error is caught: before Hydra
# starts (check_command_line), in a sweep, in Hydra's run-directory callback, and inside the run (run_cli). The
# others run the same script in process (tests.helpers.run_entry_point), which saves a Python start each.
REAL_CLI = {("model=nope",), ("-m", "optim.lr=1e-3,-1e-3"), ("hydra.run.dir={file}/run",),
            ("dataset=mnist", "dataset.download=false", "paths.data_dir={mnist}")}


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_gives_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str],
                                           message: str) -> None:
    (tmp_path / "afile").write_text("a file, not a directory")
    if any("{mnist}" in o for o in overrides):
        _write_truncated_mnist(tmp_path / "mnist")
    real_cli = tuple(overrides) in REAL_CLI
    overrides = [o.format(tmp=tmp_path / "empty", file=tmp_path / "afile", mnist=tmp_path / "mnist")
                 for o in overrides]
    run_dir = [] if any(o.startswith("hydra.run.dir") for o in overrides) else [f"hydra.run.dir={tmp_path / 'run'}"]
    if real_cli:
        proc = cli("train.py", *overrides, *run_dir, log_dir=tmp_path / "logs")
        status, stderr = proc.returncode, proc.stderr
    else:
        monkeypatch.setenv("WANDB_MODE", "disabled")
        monkeypatch.setenv("PCDEQ_LOG_DIR", str(tmp_path / "logs"))
        status, stderr = run_entry_point(ROOT / "train.py", *overrides, *run_dir)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert status == 2, stderr[-3000:]
    assert len(errors) == 1 and message in stderr, stderr[-3000:]  # one message (with its detail lines)
    assert "Traceback" not in stderr
    # no run directory claiming anything: at most Hydra's own record of the attempt (.hydra/, train.log) and the
    # run lock's file, which holds no lock once the process has ended (an flock dies with its holder)
    left = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert left <= {".hydra", "train.log", "run.lock"}
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("*.ckpt"))


def _train_tiny_in_process(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-epoch checkpoint to test against, trained by train.py in process (no Python start)."""
    monkeypatch.setenv("PCDEQ_LOG_DIR", str(run.parent))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    status, stderr = run_entry_point(ROOT / "train.py", "model=pcdeq_linear", "model.channels=8",
                                     "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                     "test_every_epoch=false", f"hydra.run.dir={run}")
    assert status == 0, stderr[-3000:]


def test_eval_missing_checkpoint(tmp_path: Path) -> None:
    proc = cli("eval.py", f"ckpt_path={tmp_path / 'none.ckpt'}", f"hydra.run.dir={tmp_path / 'ev'}",
               log_dir=tmp_path)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_bad_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a truncated checkpoint, one written by a newer pcdeq, one whose parameters are of another architecture
    import torch

    run = tmp_path / "run"
    _train_tiny_in_process(run, monkeypatch)
    good = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(good, weights_only=True)  # checkpoints hold plain values only
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    torch.save({**ckpt, "pcdeq_checkpoint_version": 99}, tmp_path / "newer.ckpt")
    ckpt["hyper_parameters"]["config"]["model"]["arch"] = "conv"  # parameters of a linear net, config of a conv one
    torch.save(ckpt, tmp_path / "other.ckpt")
    cases = {"truncated": "is truncated or damaged", "other": "does not fit the network of its config",
             "newer": "was written by a newer pcdeq (checkpoint version 99"}
    monkeypatch.setenv("PCDEQ_LOG_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name, message in cases.items():  # eval.py in process (test_eval_missing_checkpoint runs it for real)
        status, stderr = run_entry_point(ROOT / "eval.py", f"ckpt_path={tmp_path / f'{name}.ckpt'}",
                                         f"hydra.run.dir={tmp_path / name}")
        assert status == 2 and message in stderr and "Traceback" not in stderr, stderr
        assert not (tmp_path / name / "results.json").exists()


def test_resume_from_a_checkpoint_of_another_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _train_tiny_in_process(run, monkeypatch)
    proc = cli("train.py", "model=pcdeq_conv", "dataset=mnist", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
               f"hydra.run.dir={tmp_path / 'b'}", log_dir=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("was trained with other settings than this config (model.arch: checkpoint 'linear', config 'conv', "
            "dataset.name: checkpoint 'digits', config 'mnist'") in proc.stderr
    assert "fix: run with the checkpoint's settings (model=pcdeq_linear dataset=digits" in proc.stderr


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # in process (tests.helpers.run_entry_point): the same train.py, three runs without three Python starts
    monkeypatch.setenv("PCDEQ_LOG_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    common = ["model=pcdeq_linear", "trainer.deterministic=true"]

    def train(*args: str) -> None:
        status, stderr = run_entry_point(ROOT / "train.py", *common, *args)
        assert status == 0, stderr[-3000:]

    train("trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'full'}")
    train("trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'a'}")
    train("trainer.max_epochs=3", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
          f"hydra.run.dir={tmp_path / 'b'}")
    full, resumed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "b"))
    assert resumed["epochs"] == full["epochs"] == 3
    assert resumed["test/loss"] == pytest.approx(full["test/loss"], rel=1e-5)
    assert resumed["test/acc"] == full["test/acc"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_sweep_launchers(tmp_path: Path, launcher: str) -> None:
    # The local stand-ins of the cluster path: joblib (parallel processes) and submitit_local (Slurm's code path).
    ok(cli("train.py", "-m", f"hydra/launcher={launcher}", "model=pcdeq_linear", "model.activation=tanh,sigmoid",
           "trainer.max_epochs=1", "num_threads=1", log_dir=tmp_path))
    results = [json.loads(p.read_text()) for p in (tmp_path / "train" / "multiruns").glob("*/*/results.json")]
    assert sorted(r["activation"] for r in results) == ["sigmoid", "tanh"]
    assert all(r["status"] == "completed" for r in results)


def test_sigterm_leaves_an_interrupted_results_json(tmp_path: Path) -> None:
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "PCDEQ_LOG_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "model=pcdeq_linear", "trainer.max_epochs=1000",
                             "num_threads=1", f"hydra.run.dir={run}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (run / "csv" / "hparams.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)  # the logger writes hparams.yaml as fit starts
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)  # a checkpoint exists after every epoch, so a killed run can be resumed
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "interrupted" and "SIGTERM" in res["error"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "checkpoints" / "best.ckpt").exists()


def test_non_finite_loss_ends_as_diverged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(cli("train.py", "model=pcdeq_linear", "optim.lr=1e12", "trainer.max_epochs=5", "num_threads=1",
           f"hydra.run.dir={run}", log_dir=tmp_path))
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "diverged" and res["epochs"] < 5 and res["test/acc"] is None


def _processes_with(*parts: str) -> list[int]:
    """Ids of the processes whose command line contains every one of ``parts``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if all(p in cmdline for p in parts):
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_preempted_submitit_job_is_requeued_and_resumes(tmp_path: Path) -> None:
    # Slurm's path on this CPU: submitit_local runs the job as Slurm would, and a preemption signal (submitit's
    # SIGUSR2; Slurm sends it before the time limit) makes submitit requeue the job with the same config. The
    # requeued job resumes from its run directory's last checkpoint and ends with an uninterrupted run's figures.
    import signal
    import time

    common = ["model=pcdeq_linear", "num_threads=1", "trainer.deterministic=true", "trainer.max_epochs=8"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PCDEQ_LOG_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    sweep = tmp_path / "sweep"
    driver = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                               *common, f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    full = cli("train.py", *common, f"hydra.run.dir={tmp_path / 'full'}", log_dir=tmp_path)  # meanwhile
    ok(full)
    run = sweep / "0_0"
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    jobs = _processes_with("submitit.core._submit", str(sweep))
    assert len(jobs) == 1 and driver.poll() is None, "the job should be running, with a checkpoint"
    os.kill(jobs[0], signal.SIGUSR2)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-3000:]

    reference = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["status"] == "completed" and resumed["epochs"] == reference["epochs"] == 8
    assert resumed["test/loss"] == pytest.approx(reference["test/loss"], rel=1e-5)
    assert resumed["test/acc"] == reference["test/acc"]
    log = (run / "train.log").read_text()
    assert "requeued job: resuming from" in log and str(run / "checkpoints" / "last.ckpt") in log
    assert (run / "csv_part1" / "metrics.csv").is_file()  # the first attempt's epochs are kept
    submitit_logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
    assert "Requeued job" in submitit_logs or "Requeued job" in "".join(
        p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))


def test_output_is_quiet_but_keeps_the_warnings_that_matter(tmp_path: Path) -> None:
    # Python's default warning filters (no PYTHONWARNINGS=ignore here): what a user sees in a terminal or Slurm log
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(WANDB_MODE="disabled", PCDEQ_LOG_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=pcdeq_linear", "trainer.max_epochs=2",
                           "trainer.limit_train_batches=3", "solver.fwd_max_iter=2", "num_threads=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    ok(proc)
    out = proc.stdout + proc.stderr
    for noise in ("litlogger", "Tip:", "across ranks is zero", "LeafSpec", "to estimate number of stepping batches"):
        assert noise not in out, noise
    # solves that stop at the iteration cap: one line per epoch, naming the setting to change
    capped = [line for line in out.splitlines() if "stopped at the iteration cap" in line]
    assert len(capped) == 2 and all("raise solver.fwd_max_iter" in line for line in capped)
