"""Training and evaluation runs: config -> data, model, trainer -> fit/test -> results.json.

``train.py`` and ``eval.py`` are thin Hydra wrappers around :func:`train` and :func:`evaluate`. User errors
(bad config values, missing data) end with one message and exit code 2, without a traceback.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pcdeq.config import ConfigError, build_datamodule
from pcdeq.results import write_results

log = logging.getLogger("pcdeq")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """An error the user can fix; reported as one line."""


def run_cli(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; user errors print one line to stderr and exit with status 2."""
    from pcdeq.data import DataNotFoundError

    try:
        return fn(cfg)
    except (UserError, ConfigError, DataNotFoundError, OmegaConfBaseException) as e:
        msg = str(e).strip().splitlines()
        print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        for line in msg[1:4]:
            print(f"       {line}", file=sys.stderr)
        sys.exit(2)


def _resolve(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        cause = e.__cause__ or e
        if isinstance(cause, (ValueError, ConfigError)):
            raise ConfigError(str(cause).splitlines()[0]) from None
        raise ConfigError(f"cannot resolve the config: {str(e).splitlines()[0]}") from None


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
    import hydra
    import lightning
    import omegaconf
    import torchvision

    import pcdeq

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__, "hydra": hydra.__version__, "omegaconf": omegaconf.__version__,
            "pcdeq": pcdeq.__version__}


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def _progress_bar(setting: Any) -> bool:
    """A bar on an interactive terminal, none in batch jobs (Slurm, CI, pipes) unless asked for."""
    if setting is not None:
        return bool(setting)
    return sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ and not os.environ.get("CI")


def _make_trainer(cfg: DictConfig, callbacks: list, loggers: list):
    from hydra.utils import instantiate

    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    bar = _progress_bar(tcfg.pop("enable_progress_bar", None))
    return instantiate(tcfg, callbacks=callbacks, logger=loggers or False, enable_progress_bar=bar)


def _base_results(config: dict, module, run_dir: Path) -> dict:
    model = config["model"]
    layers = module.net.deq_layers() if hasattr(module.net, "deq_layers") else []  # pcDEQ: the variant in use
    sha, dirty = _git_commit()
    return {
        "task": config.get("task_name", "train"),
        "experiment": config.get("experiment_name"),
        "dataset": config["dataset"]["name"],
        "model": model["name"],
        "family": model["family"],
        "arch": model["arch"],
        "activation": model.get("activation"),
        "variant": layers[0].act.variant if layers else model.get("variant"),
        "solver": config["solver"].get("fwd_solver") or config["solver"].get("solver"),
        "seed": config.get("seed"),
        "num_params": sum(p.numel() for p in module.net.parameters()),
        "git_commit": sha,
        "git_dirty": dirty,
        "versions": _versions(),
        "overrides": _overrides(),
        "run_dir": str(run_dir),
    }


def _peak_memory() -> tuple[float, float | None]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return rss_mb, gpu


def train(cfg: DictConfig) -> dict:
    """Train one configuration and write ``results.json`` into the run directory.

    Returns:
        The results dict (also written to disk on rank 0).
    """
    import lightning as L
    from hydra.utils import instantiate

    from pcdeq.lit_module import EquilibriumModule

    started = _now()
    config = _resolve(cfg)
    run_dir = Path(config["paths"]["output_dir"])
    if config.get("ckpt_path") and not Path(config["ckpt_path"]).is_file():
        raise UserError(f"ckpt_path not found: {config['ckpt_path']} (a run keeps <run dir>/checkpoints/last.ckpt)")
    if config.get("num_threads"):
        torch.set_num_threads(int(config["num_threads"]))
    L.seed_everything(int(config["seed"]), workers=True)
    dm = build_datamodule(config, seed=int(config["seed"]))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    has_val = int(config["dataset"]["val_size"]) > 0
    prefixes = (["val"] if has_val else []) + (["test"] if config.get("test_every_epoch") else [])
    module = EquilibriumModule(config, tuple(prefixes), int(config.get("certificate_every_n_steps", 0)))

    callbacks_cfg = OmegaConf.to_container(cfg.callbacks, resolve=True) if cfg.get("callbacks") else {}
    if not has_val:  # the best checkpoint is chosen on the validation split only, never on the test set
        callbacks_cfg.pop("best_checkpoint", None)
    callbacks = [instantiate(c) for c in callbacks_cfg.values() if c and "_target_" in c]
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    loggers = [instantiate(c) for c in logger_cfg.values() if c and "_target_" in c]
    trainer = _make_trainer(cfg, callbacks, loggers)
    log.info("run directory: %s", run_dir)

    results = _base_results(config, module, run_dir)
    results["started_at"] = started
    val_loaders = ([dm.val_dataloader()] if has_val else []) + ([dm.test_dataloader()] if "test" in prefixes else [])
    t0 = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=dm.train_dataloader(), val_dataloaders=val_loaders or None,
                    ckpt_path=config.get("ckpt_path"))
        train_time = time.perf_counter() - t0
        fit_metrics = _metrics(trainer)
        if module.diverged:
            status = "diverged"
            test_metrics = {}
        else:
            trainer.test(module, dataloaders=dm.test_dataloader(), verbose=False)
            test_metrics = _metrics(trainer)
            status = "interrupted" if trainer.interrupted else "completed"
    except BaseException as e:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # A kill or preemption (SIGTERM, Ctrl-C) is "interrupted", anything else "failed"; either way the run
        # directory says what happened before the exception propagates.
        status = "interrupted" if isinstance(e, (SIGTERMException, KeyboardInterrupt)) else "failed"
        if trainer.is_global_zero and run_dir.is_dir():
            write_results(run_dir / "results.json", {**results, "status": status, "error": repr(e),
                                                     "finished_at": _now()})
        raise
    finally:
        _finish_wandb(loggers)

    metrics = {**fit_metrics, **test_metrics}
    epoch_times = module.epoch_times
    rss, gpu = _peak_memory()
    results.update({
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
        "epochs": trainer.current_epoch,
        "train_time_s": train_time,
        "epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        "samples_per_s": fit_metrics.get("train/samples_per_s"),
        "peak_memory_mb": rss,
        "peak_gpu_memory_mb": gpu,
        "finished_at": _now(),
        "metrics": metrics,
    })
    if trainer.is_global_zero:
        write_results(run_dir / "results.json", results)
        OmegaConf.save(config, run_dir / "config_resolved.yaml")
        log.info("status %s, test acc %s, results: %s", status, results["test/acc"], run_dir / "results.json")
    return results


def _finish_wandb(loggers: list) -> None:
    """End the wandb run so the next job of a multirun starts a fresh one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate a checkpoint on its dataset's test set and write ``results.json`` in the eval run directory."""
    from pcdeq.lit_module import EquilibriumModule

    ckpt = Path(str(cfg.ckpt_path))
    if not ckpt.is_file():
        raise UserError(f"checkpoint not found: {ckpt} (pass ckpt_path=<run dir>/checkpoints/last.ckpt)")
    started = _now()
    module = EquilibriumModule.load_from_checkpoint(ckpt, map_location="cpu")
    config = dict(module.hparams["config"])
    dataset = dict(config["dataset"])
    for key in ("data_dir", "synthetic", "batch_size", "download", "num_workers"):
        if cfg.get(key) is not None:
            dataset[key] = cfg[key]
    config["dataset"] = dataset
    dm = build_datamodule(config, seed=int(config["seed"]))
    dm.prepare_data()
    dm.setup("test")
    trainer = _make_trainer(cfg, [], [])
    run_dir = Path(cfg.paths.output_dir)
    t0 = time.perf_counter()
    trainer.test(module, dataloaders=dm.test_dataloader(), verbose=False)
    metrics = _metrics(trainer)
    results = _base_results({**config, "task_name": "eval"}, module, run_dir)
    rss, gpu = _peak_memory()
    results.update({
        "status": "completed", "checkpoint": str(ckpt), "started_at": started, "finished_at": _now(),
        "test/acc": metrics.get("test/acc"), "test/loss": metrics.get("test/loss"),
        "test/fwd_iters": metrics.get("test/fwd_iters"), "eval_time_s": time.perf_counter() - t0,
        "peak_memory_mb": rss, "peak_gpu_memory_mb": gpu, "metrics": metrics,
    })
    write_results(run_dir / "results.json", results)
    log.info("test acc %s, results: %s", results["test/acc"], run_dir / "results.json")
    return results
