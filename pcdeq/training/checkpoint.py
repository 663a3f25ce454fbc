"""Checkpoints: atomic writes, safe reads, the checks that a checkpoint fits the run using it, and requeue resume.

* :class:`AtomicCheckpointIO` (a Lightning plugin that :func:`trainer_plugins` hands to every Trainer): each
  checkpoint goes to a temporary file in the same directory, is fsynced and renamed over the old one, so a full
  disk or a kill during a write leaves the previous good checkpoint in place, never a truncated one.
* :func:`read_checkpoint`: ``torch.load(weights_only=True)``; a missing, empty, truncated or damaged file, or one
  holding objects a safe load refuses, is one :class:`~pcdeq.errors.CheckpointError`.
* :func:`checkpoint_config`, :func:`check_matches`, :func:`check_state_dict`: the run config saved in a
  checkpoint (a checkpoint written by a newer pcdeq is refused), and whether family, architecture, dataset, size
  and parameters fit the config that loads it (``ckpt_path=`` of train.py, eval.py). The Lightning module of a
  checkpoint is rebuilt by :meth:`pcdeq.training.module.EquilibriumModule.from_checkpoint`, which uses them.
* :func:`resume_if_requeued`: a Slurm job requeued by submitit (preemption, time limit) starts again with the
  same config in the same run directory; it resumes from that directory's ``checkpoints/last.ckpt``, the
  checkpoint written at the end of the last finished epoch, so it ends with the figures of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pcdeq.errors import CheckpointError
from pcdeq.family import get_family
from pcdeq.results import atomic_write, read_results
from pcdeq.training.config import net_from_config

log = logging.getLogger("pcdeq")

CHECKPOINT_VERSION = 1  # bump when the checkpoint content changes incompatibly
VERSION_KEY = "pcdeq_checkpoint_version"
DAMAGED_FIX = ("fix: use an intact checkpoint (a run rewrites <run dir>/checkpoints/last.ckpt atomically after "
               "every epoch; best.ckpt or an earlier run's last.ckpt also work)")


# ---------------------------------------------------------------- writing


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes through a temporary file, fsync and an atomic rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote or unusual targets: Lightning's own writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def trainer_plugins() -> list:
    """Plugins every Trainer of this project gets: atomic checkpoints and, in a submitit job on Slurm,
    Lightning's own Slurm requeue turned off (submitit requeues the job; see :func:`resume_if_requeued`)."""
    plugins: list = [AtomicCheckpointIO()]
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


# ---------------------------------------------------------------- reading and checking


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``, on the CPU).

    Raises:
        CheckpointError: missing, empty, truncated, damaged, not a Lightning checkpoint, or holding objects
            other than tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path}: checkpoint not found; fix: pass an existing checkpoint (a run keeps "
                              "<run dir>/checkpoints/last.ckpt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); {DAMAGED_FIX}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:  # a well-formed file holding objects: torch names the first class it will not build
            raise CheckpointError(f"checkpoint {path} holds objects that a safe load (weights_only=True) refuses "
                                  f"({found.group(1)}); fix: use a checkpoint written by this project's train.py, "
                                  "which holds only tensors and plain values") from None
        raise CheckpointError(f"checkpoint {path} is truncated or damaged (not a readable torch file); "
                              f"{DAMAGED_FIX}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or damaged ({first}); {DAMAGED_FIX}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict); "
                              "fix: pass <run dir>/checkpoints/last.ckpt of a train.py run")
    return ckpt


def checkpoint_config(ckpt: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """The run config saved in a checkpoint.

    Raises:
        CheckpointError: written by a newer pcdeq (a higher checkpoint version), or not by train.py.
    """
    version = ckpt.get(VERSION_KEY, 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer pcdeq (checkpoint version {version}; this "
                              f"one reads up to {CHECKPOINT_VERSION}); fix: upgrade pcdeq, or use the version "
                              "that wrote it")
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, Mapping) or not {"model", "dataset", "solver"} <= config.keys():
        raise CheckpointError(f"{path} is not a pcdeq training checkpoint (it holds no run config); "
                              "fix: pass <run dir>/checkpoints/last.ckpt of a train.py run")
    return dict(config)


def _identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide which network a config builds: family, arch, dataset, size, family options."""
    model = config["model"]
    ident = {"model.family": model.get("family"), "model.arch": model.get("arch"),
             "dataset.name": config["dataset"].get("name"), "model.channels": model.get("channels")}
    try:
        options = get_family(str(model.get("family"))).option_names()
    except Exception:  # an unknown family: the family entry alone says it
        options = ()
    for key in options:
        if model.get(key) is not None:
            ident[f"model.{key}"] = model[key]
    return ident


def check_matches(saved: Mapping[str, Any], config: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` when the checkpoint's run config describes another network than ``config``."""
    mine, theirs = _identity(config), _identity(saved)
    diffs = [k for k in mine if k in theirs and _plain(mine[k]) != _plain(theirs[k])]
    if not diffs:
        return
    if "model.family" in diffs:  # options of another family are not comparable
        diffs = [k for k in diffs if k in ("model.family", "model.arch", "dataset.name")]
    detail = ", ".join(f"{k}: checkpoint {theirs[k]!r}, config {mine[k]!r}" for k in diffs)
    fixes = []
    if "model.family" in diffs or "model.arch" in diffs:
        fixes.append(f"model={theirs['model.family']}_{theirs['model.arch']}")
    if "dataset.name" in diffs:
        fixes.append(f"dataset={theirs['dataset.name']}")
    fixes += [f"{k}={_plain(theirs[k])}".replace(" ", "") for k in diffs
              if k not in ("model.family", "model.arch", "dataset.name")]
    fix = " ".join(fixes)
    raise CheckpointError(f"checkpoint {path} was trained with other settings than this config ({detail}); "
                          f"fix: run with the checkpoint's settings ({fix}) or pass a checkpoint of this model")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_state_dict(state: Mapping[str, Any], expected: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the keys and shapes of ``expected``."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    wanted = {k: tuple(v.shape) for k, v in expected.items() if hasattr(v, "shape")}
    missing = sorted(wanted.keys() - shapes.keys())
    extra = sorted(shapes.keys() - wanted.keys())
    other = sorted(k for k in wanted.keys() & shapes.keys() if wanted[k] != shapes[k])
    if not (missing or extra or other):
        return
    parts = []
    if other:
        k = other[0]
        parts.append(f"{len(other)} of another shape (e.g. {k}: checkpoint {list(shapes[k])}, "
                     f"network {list(wanted[k])})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    raise CheckpointError(f"checkpoint {path} does not fit the network of its config: parameters "
                          f"{', '.join(parts)}; fix: pass a checkpoint written for this model by this pcdeq")


def net_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The network's entries of a Lightning state dict, without their ``net.`` prefix."""
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}


def check_resume_checkpoint(config: Mapping[str, Any]) -> None:
    """The checkpoint of ``ckpt_path`` can be read and was written for the network ``config`` describes."""
    path = config["ckpt_path"]
    ckpt = read_checkpoint(path)
    check_matches(checkpoint_config(ckpt, path), config, path)
    net = net_from_config(config)
    assert isinstance(net, torch.nn.Module)
    check_state_dict(net_state(ckpt["state_dict"]), net.state_dict(), path)


# ---------------------------------------------------------------- preemption


def resumable_checkpoint(config: Mapping[str, Any]) -> Path | None:
    """The run directory's own last checkpoint when the run continues from it, else None.

    Two cases, and only when no ``ckpt_path`` was given and ``<run dir>/checkpoints/last.ckpt`` exists:

    * a submitit job (``hydra/launcher=slurm``, ``submitit_slurm`` or ``submitit_local``) that was preempted or
      reached its time limit: submitit requeues it with the same config, so it starts again in the same run
      directory;
    * ``auto_resume`` (the reproduction runs): an interrupted or failed run, or one killed before it wrote
      results.json. A diverged run starts afresh: resuming would continue from the weights that diverged.
    """
    if config.get("ckpt_path"):
        return None
    path = Path(config["paths"]["output_dir"]) / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return path
    if config.get("auto_resume"):
        try:
            previous = read_results(path.parent.parent / "results.json").get("status")
        except (OSError, ValueError):
            previous = None  # killed before it could write any
        return None if previous == "diverged" else path
    return None


def check_same_run(config: Mapping[str, Any], key: str, path: Path) -> None:
    """Refuse to continue another run's checkpoint: ``path`` must come from the run of identity ``key``.

    A requeue or ``auto_resume`` continues the run directory's own last checkpoint. Two runs that share a
    directory by mistake (a sweep whose ``hydra.sweep.subdir`` does not tell them apart) would otherwise continue
    each other's weights: the check that the checkpoint builds the same network ignores the seed and every other
    setting of the run's identity. The directory's ``launch.json`` (written at each start) names the identity that
    last ran there; the checkpoint's saved config names its seed.

    Raises:
        CheckpointError: the earlier launch had another identity, or the checkpoint another seed; nothing in the
            run directory has been touched.
    """
    run_dir = path.parent.parent
    try:
        previous = json.loads((run_dir / "launch.json").read_text()).get("run_key")
    except (OSError, ValueError, AttributeError):
        previous = None  # no readable record of the last launch: the seed below still decides
    saved_seed = checkpoint_config(read_checkpoint(path), path).get("seed")
    if previous not in (None, key):
        found = f"the run {previous!r} (its launch.json)"
    elif saved_seed is not None and config.get("seed") is not None and saved_seed != config["seed"]:
        found = f"a run with seed={saved_seed} (this run: seed={config['seed']})"
    else:
        return
    raise CheckpointError(f"{path} belongs to {found}, not to this run {key!r}: two runs share the run directory "
                          f"{run_dir}; fix: give each run its own directory (e.g. hydra.sweep.subdir="
                          "'${run_slug:${hydra.job.override_dirname}}', the reproduction runs' setting), or "
                          "pass ckpt_path= explicitly to start from that checkpoint on purpose")


def resume_from(config: dict[str, Any], path: Path) -> None:
    """Continue the run of ``config`` from its own checkpoint ``path`` (sets ``config["ckpt_path"]``).

    The CSV log of the earlier attempt is kept as ``csv_part<k>/`` (Lightning's CSV logger would otherwise
    overwrite it): the resumed attempt logs the remaining epochs to ``csv/``, and the aggregator reads both.
    """
    check_resume_checkpoint({**config, "ckpt_path": str(path)})
    keep_earlier_log(path.parent.parent)
    config["ckpt_path"] = str(path)
    log.info("resuming from %s", path)


def keep_earlier_log(run_dir: Path) -> None:
    """Move the earlier attempt's ``csv/`` aside as ``csv_part<k>/`` before a continuation logs to ``csv/``.

    Lightning's CSV logger rewrites ``csv/metrics.csv`` from its own rows; the parts, read in order, are the run's
    whole per-epoch history (the aggregator and its plots read them as one sequence).
    """
    csv = run_dir / "csv"
    if not csv.is_dir():
        return
    k = 1
    while (run_dir / f"csv_part{k}").exists():
        k += 1
    csv.rename(run_dir / f"csv_part{k}")


def continues_in_place(config: Mapping[str, Any]) -> bool:
    """True when an explicit ``ckpt_path`` is a checkpoint of the run directory itself (a resume by hand)."""
    ckpt = config.get("ckpt_path")
    if not ckpt:
        return False
    run_dir = Path(config["paths"]["output_dir"]).resolve()
    return Path(ckpt).resolve().parent.parent == run_dir
