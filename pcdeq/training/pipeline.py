"""Training and evaluation runs: config -> data, model, trainer -> fit/test -> results.json.

``train.py`` and ``eval.py`` are thin Hydra wrappers around :func:`train` and :func:`evaluate`. User errors
(:class:`pcdeq.errors.PcdeqUserError`: bad config values, missing data) end with one message and exit code 2,
without a traceback. A run is built (:func:`build_run`), fitted and tested (:func:`fit_and_test`), and its
figures are written to ``results.json`` (:func:`run_results`; schema in :mod:`pcdeq.results`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import omegaconf
import torch
import torchvision
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import pcdeq
from pcdeq.disk import DiskFullError, full_disk
from pcdeq.errors import CheckpointError, ConfigError, PcdeqUserError
from pcdeq.results import atomic_write, atomic_write_json, completed_run, read_results, run_key, write_results
from pcdeq.training.checkpoint import (
    check_same_run,
    continues_in_place,
    keep_earlier_log,
    resumable_checkpoint,
    resume_from,
    trainer_plugins,
)
from pcdeq.training.config import datamodule_from_config
from pcdeq.training.data import EquilibriumDataModule, dataset_summary
from pcdeq.training.device import apply_tf32
from pcdeq.training.exclusive import run_exclusively
from pcdeq.training.module import EquilibriumModule
from pcdeq.training.quiet import silence_third_party
from pcdeq.training.space import warn_if_no_room
from pcdeq.training.validate import hydra_overrides, validate_eval, validate_train
from pcdeq.training.worklog import record_outcome

log = logging.getLogger("pcdeq")
silence_third_party()  # advertising and deprecations from inside libraries, by exact message
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def run_cli(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; user errors print one line (plus up to three of detail) and exit with status 2."""
    try:
        return fn(cfg)
    except (PcdeqUserError, OmegaConfBaseException) as e:
        msg = str(e).strip().splitlines()
        print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        for line in msg[1:4]:
            print(f"       {line}", file=sys.stderr)
        sys.exit(2)


def resolve_config(cfg: DictConfig) -> dict:
    """The plain resolved config; a failing resolver or interpolation becomes a :class:`ConfigError`."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        cause = e.__cause__ or e
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause).splitlines()[0]) from None
        raise ConfigError(f"cannot resolve the config: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------- provenance


def _git_commit() -> tuple[str | None, bool | None]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": L.__version__, "hydra": hydra.__version__, "omegaconf": omegaconf.__version__,
            "pcdeq": pcdeq.__version__}


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (library use, tests)
        return []


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _peak_memory() -> tuple[float, float | None]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return rss_mb, gpu


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def _progress_bar(setting: Any) -> bool:
    """A bar on an interactive terminal, none in batch jobs (Slurm, CI, pipes) unless asked for."""
    if setting is not None:
        return bool(setting)
    return sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ and not os.environ.get("CI")


def make_trainer(trainer_cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Lightning Trainer of the ``trainer`` group."""
    tcfg = OmegaConf.to_container(trainer_cfg, resolve=True)
    assert isinstance(tcfg, dict)
    bar = _progress_bar(tcfg.pop("enable_progress_bar", None))
    if tcfg.get("accelerator") == "cpu":
        # Importing Lightning sets this so that CUDA checks in forked workers do not initialise CUDA; with it set,
        # every optimizer step asks NVML whether a GPU exists (about 0.7 ms per AdamW step here). A CPU run has no
        # CUDA to protect.
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    plugins = {} if "plugins" in tcfg else {"plugins": trainer_plugins()}  # atomic checkpoint writes
    return instantiate(tcfg, callbacks=callbacks, logger=loggers or False, enable_progress_bar=bar, **plugins)


def base_results(config: dict, module: EquilibriumModule, run_dir: Path) -> dict:
    """The provenance part of results.json: what ran, with which code, where."""
    model = config["model"]
    sha, dirty = _git_commit()
    overrides = _overrides()
    return {
        "task": config.get("task_name", "train"),
        "experiment": config.get("experiment_name"),
        "run_key": run_key(config.get("experiment_name"), overrides),
        "dataset": config["dataset"]["name"],
        "model": model["name"],
        "family": model["family"],
        "arch": model["arch"],
        **module.net.describe(),
        "protocol": config.get("protocol"),
        "seed": config.get("seed"),
        "num_params": sum(p.numel() for p in module.net.parameters()),
        "git_commit": sha,
        "git_dirty": dirty,
        "versions": _versions(),
        "overrides": overrides,
        "run_dir": str(run_dir),
        **({"warm_start_from": warm_start_from(config)} if config.get("task_name", "train") == "train" else {}),
    }


def warm_start_from(config: dict) -> dict | None:
    """Where a run that starts from another run directory's checkpoint came from (None: a fresh run, or a
    continuation in its own directory). Such a run logs afresh in its own directory; the source run's
    history stays in the source directory."""
    ckpt = config.get("ckpt_path")
    if not ckpt or continues_in_place(config):
        return None
    return {"checkpoint": str(Path(ckpt).resolve()), "run_key": _source_run_key(Path(ckpt))}


# ---------------------------------------------------------------- training


@dataclass
class Run:
    """Everything one training run is made of."""

    config: dict
    run_dir: Path
    datamodule: EquilibriumDataModule
    module: EquilibriumModule
    trainer: L.Trainer
    loggers: list
    eval_prefixes: tuple[str, ...]
    started_at: str = ""


def build_run(cfg: DictConfig, config: dict | None = None) -> Run:
    """Seed, load the data and build the module, loggers, callbacks and trainer.

    Args:
        cfg: the composed config (its trainer group is instantiated as given).
        config: the resolved config, when the caller has already resolved (and possibly adjusted) it.
    """
    config = resolve_config(cfg) if config is None else config
    run_dir = Path(config["paths"]["output_dir"])
    if config.get("ckpt_path") and not Path(config["ckpt_path"]).is_file():
        raise CheckpointError(f"ckpt_path not found: {config['ckpt_path']} (a run keeps "
                              "<run dir>/checkpoints/last.ckpt)")
    if config.get("num_threads"):
        torch.set_num_threads(int(config["num_threads"]))
    apply_tf32(bool(config.get("tf32", False)))
    L.seed_everything(int(config["seed"]), workers=True)
    dm = datamodule_from_config(config, seed=int(config["seed"]))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    log.info("data: %s", dataset_summary(dm))
    has_val = int(config["dataset"]["val_size"]) > 0
    prefixes = (("val",) if has_val else ()) + (("test",) if config.get("test_every_epoch") else ())
    module = EquilibriumModule(config, prefixes, int(config.get("certificate_every_n_steps", 0)))

    callbacks_cfg = dict(config.get("callbacks") or {})
    if not has_val:  # the best checkpoint is chosen on the validation split only, never on the test set
        callbacks_cfg.pop("best_checkpoint", None)
    callbacks = [instantiate(c) for c in callbacks_cfg.values() if c and "_target_" in c]
    loggers = [instantiate(c) for c in (config.get("logger") or {}).values() if c and "_target_" in c]
    trainer = make_trainer(cfg.trainer, callbacks, loggers)
    return Run(config, run_dir, dm, module, trainer, loggers, prefixes)


def fit_and_test(run: Run) -> tuple[str, dict[str, float], dict[str, float], float]:
    """Fit (resuming from ``ckpt_path`` if given), then test unless the run diverged.

    Returns:
        (status, metrics after fit, test metrics, fit wall time in seconds). A failure or a kill writes a
        ``failed`` / ``interrupted`` results.json before the exception propagates.
    """
    dm, trainer, module = run.datamodule, run.trainer, run.module
    val_loaders = ([dm.val_dataloader()] if "val" in run.eval_prefixes else []) + (
        [dm.test_dataloader()] if "test" in run.eval_prefixes else [])
    t0 = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=dm.train_dataloader(), val_dataloaders=val_loaders or None,
                    ckpt_path=run.config.get("ckpt_path"))
        train_time = time.perf_counter() - t0
        fit_metrics = _metrics(trainer)
        if module.diverged:
            return "diverged", fit_metrics, {}, train_time
        trainer.test(module, dataloaders=dm.test_dataloader(), verbose=False)
        status = "interrupted" if trainer.interrupted else "completed"
        return status, fit_metrics, _metrics(trainer), train_time
    except BaseException as e:
        # A kill or preemption (SIGTERM, Ctrl-C) is "interrupted", anything else "failed"; either way the run
        # directory says what happened before the exception propagates.
        status = "interrupted" if isinstance(e, (SIGTERMException, KeyboardInterrupt, SystemExit)) else "failed"
        if trainer.is_global_zero and run.run_dir.is_dir():
            full = full_disk(e)  # the root cause (errno, file), not torch's secondary "unexpected pos" error
            try:
                write_results(run.run_dir / "results.json", {**base_results(run.config, module, run.run_dir),
                                                             "status": status,
                                                             "error": full.record() if full else repr(e),
                                                             "started_at": run.started_at, "finished_at": _now()})
            except DiskFullError:
                log.warning("the failure could not be recorded in %s: the disk is full too",
                            run.run_dir / "results.json")
        raise
    finally:
        _finish_wandb(run.loggers)


def run_results(run: Run, status: str, fit_metrics: dict, test_metrics: dict, train_time: float) -> dict:
    """The figures of a finished training run, in the results.json schema."""
    epoch_times = run.module.epoch_times
    rss, gpu = _peak_memory()
    return {
        "status": status,
        "test/acc": test_metrics.get("test/acc"),
        "test/loss": test_metrics.get("test/loss"),
        "val/acc": fit_metrics.get("val/acc"),
        "val/loss": fit_metrics.get("val/loss"),
        "fwd_iters": fit_metrics.get("train/fwd_iters"),
        "bwd_iters": fit_metrics.get("train/bwd_iters"),
        "fwd_iters_max": fit_metrics.get("train/fwd_iters_max"),
        "bwd_iters_max": fit_metrics.get("train/bwd_iters_max"),
        "test/fwd_iters": test_metrics.get("test/fwd_iters"),
        "epochs": run.trainer.current_epoch,
        "train_time_s": train_time,
        "epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        "samples_per_s": fit_metrics.get("train/samples_per_s"),
        "peak_memory_mb": rss,
        "peak_gpu_memory_mb": gpu,
        "finished_at": _now(),
        "metrics": {**fit_metrics, **test_metrics},
        "residual_history": run.module.net.residual_history() if test_metrics else None,
    }


def _reuse_run_dir(config: dict, run_dir: Path, key: str) -> dict | None:
    """Apply ``skip_if_done``, ``auto_resume`` and a Slurm requeue: the finished results to return, or None.

    An interrupted run (``auto_resume``) or a requeued submitit job continues from its own last checkpoint
    (see :func:`pcdeq.training.checkpoint.resumable_checkpoint`; ``config["ckpt_path"]`` is set).
    """
    if config.get("skip_if_done"):
        done = completed_run(run_dir, key)
        if done is not None:
            log.info("already completed, skipped (skip_if_done): %s", run_dir / "results.json")
            return done
    if continues_in_place(config):  # a resume by hand: the same history as the automatic resumes
        keep_earlier_log(run_dir)
    last = resumable_checkpoint(config)
    if last is not None:
        check_same_run(config, key, last)  # before resume_from renames anything in the directory
        resume_from(config, last)
    return None


def train(cfg: DictConfig) -> dict:
    """Train one configuration and write ``results.json`` into the run directory.

    With ``skip_if_done`` a run whose directory already holds its completed results is not trained again; with
    ``auto_resume`` an interrupted one resumes from its last checkpoint. ``launch.json`` records each start, so
    a late write of an earlier process is never taken for this run's result.

    Returns:
        The results dict (also written to disk on rank 0).
    """
    started = _now()
    config = resolve_config(cfg)
    validate_train(config, hydra_overrides())  # every value, before any data is read or any file written
    run_dir = Path(config["paths"]["output_dir"])
    key = run_key(config.get("experiment_name"), _overrides())

    def locked() -> dict:
        with _resume_hint_on_full_disk(config, run_dir):
            return _train_locked(cfg, config, run_dir, key, started)

    return run_exclusively(run_dir, key, bool(config.get("skip_if_done")), locked)  # one process per run dir


@contextmanager
def _resume_hint_on_full_disk(config: dict, run_dir: Path) -> Iterator[None]:
    """A full disk (or quota, or read-only filesystem) anywhere in the run: one :class:`DiskFullError` whose fix
    ends with the command that continues the run."""
    try:
        yield
    except Exception as e:
        full = full_disk(e)
        if full is None:
            raise
        raise full.with_fix("free space, or point hydra.run.dir / paths.log_dir elsewhere, then resume with: "
                            f"{resume_command(config, run_dir)}") from None


def resume_command(config: dict, run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``: its overrides, the directory and its last checkpoint.

    A run stopped before its first checkpoint starts again from its own ``ckpt_path`` (or none).
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = str(last) if last.is_file() else config.get("ckpt_path")
    kept = [o for o in _overrides() if o.lstrip("+").partition("=")[0] not in ("ckpt_path", "hydra.run.dir")]
    extra = [f"hydra.run.dir={run_dir}"] + ([f"ckpt_path={ckpt}"] if ckpt else [])
    return " ".join(["python train.py", *(shlex.quote(o) for o in [*kept, *extra])])


def _train_locked(cfg: DictConfig, config: dict, run_dir: Path, key: str, started: str) -> dict:
    """:func:`train` once the run directory's lock is held."""
    done = _reuse_run_dir(config, run_dir, key)
    if done is not None:
        record_outcome(key, run_dir, "done")
        return done
    run = build_run(cfg, config)
    run.started_at = started
    log.info("run directory: %s", run.run_dir)
    if run.trainer.is_global_zero:
        atomic_write_json(run_dir / "launch.json", {"run_key": key, "started_at": started, "pid": os.getpid(),
                                                    "host": platform.node()})
        warn_if_no_room(run_dir, run.module, str(config["optim"]["name"]))
    status, fit_metrics, test_metrics, train_time = fit_and_test(run)
    results = {**base_results(run.config, run.module, run.run_dir), "started_at": started,
               **run_results(run, status, fit_metrics, test_metrics, train_time)}
    if run.trainer.is_global_zero:  # the config first: a completed results.json implies its config is there
        text = OmegaConf.to_yaml(run.config)
        atomic_write(run.run_dir / "config_resolved.yaml", lambda f: f.write(text.encode()))
        write_results(run.run_dir / "results.json", results)
        log.info("status %s, test acc %s, results: %s", status, results["test/acc"], run.run_dir / "results.json")
    record_outcome(key, run_dir, status)
    return results


def _finish_wandb(loggers: list) -> None:
    """End the wandb run so the next job of a multirun starts a fresh one."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb  # only loaded when a wandb logger is in use: importing it costs about a second

        wandb.finish()


# ---------------------------------------------------------------- evaluation


def _solver_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The ``solver.*`` keys given to eval.py (None: keep the checkpoint's)."""
    given = OmegaConf.to_container(cfg.get("solver") or {}, resolve=True)
    assert isinstance(given, dict)
    return {str(k): v for k, v in given.items() if v is not None}


def _source_run_key(ckpt: Path) -> str | None:
    """The run_key of the training run that wrote ``<run dir>/checkpoints/<name>.ckpt`` (None if unknown)."""
    try:
        return read_results(ckpt.parent.parent / "results.json").get("run_key")
    except (OSError, ValueError):
        return None


# eval.py's dataset keys that change what an evaluation computes (data_dir, download, num_workers only say where
# the same data come from and how they are read)
EVAL_DATA_IDENTITY = ("synthetic", "batch_size")


def eval_run_key(ckpt: Path, solver_overrides: dict[str, Any], data_overrides: dict[str, Any] | None = None) -> str:
    """An evaluation's identity: the training run it evaluates (its checkpoint path if unknown), the solver
    settings it replaces and the :data:`EVAL_DATA_IDENTITY` keys it sets, e.g.
    ``eval:pcdeq_linear_mnist/seed=0|solver.fwd_tol=0.01`` or ``...|solver.fwd_tol=0.01,synthetic=True``."""
    parts = [f"solver.{k}={v}" for k, v in sorted(solver_overrides.items())]
    parts += [f"{k}={v}" for k, v in sorted((data_overrides or {}).items())]
    return f"eval:{_source_run_key(ckpt) or ckpt}|{','.join(parts)}"


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate a checkpoint on its dataset's test set and write ``results.json`` in the eval run directory.

    ``solver.*`` keys evaluate with other solver settings than the training run's (a tolerance sweep of
    inference: ``python eval.py ckpt_path=... solver.fwd_tol=1e-2``); ``data_dir``, ``synthetic``, ``batch_size``,
    ``download`` and ``num_workers`` replace the checkpoint's dataset settings. As in :func:`train`, the run
    directory is locked before anything is written there; with ``skip_if_done`` an evaluation whose directory
    holds its completed results (same run_key) is not run again, and one held by another live process is
    skipped (status ``in_use``).
    """
    validate_eval(resolve_config(cfg))
    ckpt = Path(str(cfg.ckpt_path))
    if not ckpt.is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt} (pass ckpt_path=<run dir>/checkpoints/last.ckpt)")
    solver_overrides = _solver_overrides(cfg)
    key = eval_run_key(ckpt, solver_overrides, {k: cfg[k] for k in EVAL_DATA_IDENTITY if cfg.get(k) is not None})
    run_dir = Path(cfg.paths.output_dir)
    skip = bool(cfg.get("skip_if_done"))
    return run_exclusively(run_dir, key, skip,
                           lambda: _evaluate_locked(cfg, ckpt, solver_overrides, key, run_dir, skip))


def _evaluate_locked(cfg: DictConfig, ckpt: Path, solver_overrides: dict[str, Any], key: str, run_dir: Path,
                     skip_if_done: bool) -> dict:
    """:func:`evaluate` once the run directory's lock is held."""
    if skip_if_done:
        done = completed_run(run_dir, key)
        if done is not None:
            log.info("already completed, skipped (skip_if_done): %s", run_dir / "results.json")
            record_outcome(key, run_dir, "done")
            return done
    started = _now()
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    # safe load; a damaged, newer or mismatched checkpoint is one message
    module = EquilibriumModule.from_checkpoint(ckpt)
    config = dict(module.hparams["config"])
    if solver_overrides:  # the same weights under other solver settings
        config["solver"] = {**config["solver"], **solver_overrides}
        tuned = EquilibriumModule(config, module.eval_prefixes, module.certificate_every)
        tuned.load_state_dict(module.state_dict())
        module = tuned
    dataset = dict(config["dataset"])
    for name in ("data_dir", "synthetic", "batch_size", "download", "num_workers"):
        if cfg.get(name) is not None:
            dataset[name] = cfg[name]
    config["dataset"] = dataset
    dm = datamodule_from_config(config, seed=int(config["seed"]))
    dm.prepare_data()
    dm.setup("test")
    trainer = make_trainer(cfg.trainer, [], [])
    t0 = time.perf_counter()
    trainer.test(module, dataloaders=dm.test_dataloader(), verbose=False)
    metrics = _metrics(trainer)
    results = base_results({**config, "task_name": "eval"}, module, run_dir)
    rss, gpu = _peak_memory()
    results.update({
        "status": "completed", "checkpoint": str(ckpt), "source_run_key": _source_run_key(ckpt),
        "run_key": key, "solver_overrides": solver_overrides,
        "started_at": started, "finished_at": _now(),
        "test/acc": metrics.get("test/acc"), "test/loss": metrics.get("test/loss"),
        "test/fwd_iters": metrics.get("test/fwd_iters"), "eval_time_s": time.perf_counter() - t0,
        "peak_memory_mb": rss, "peak_gpu_memory_mb": gpu, "metrics": metrics,
        "residual_history": module.net.residual_history(),
    })
    write_results(run_dir / "results.json", results)
    log.info("test acc %s, results: %s", results["test/acc"], run_dir / "results.json")
    record_outcome(key, run_dir, "completed")
    return results
