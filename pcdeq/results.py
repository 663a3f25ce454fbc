"""The per-run ``results.json``: its schema, atomic writing and reading, and a run's identity.

The aggregator and the reproduction pipeline read only these files, so the schema is versioned and documented
here (the single source; the README links to it). Keys with a slash are the metric names logged during
training.

Schema (version 2; version 1 lacked protocol, run_key, residual_history and the eval keys)::

    schema_version   int      2
    status           str      completed | diverged | failed | interrupted
    task             str      train | eval
    experiment       str      experiment_name (groups seeds of one table row)
    run_key          str      the run's identity: experiment and the overrides that change what is computed
                              (see run_key); never a timestamp
    dataset, model, family, arch, activation, variant, solver   str (activation/variant null for monDEQ)
    protocol         dict     the training protocol applied: name, source, dataset, published, note
    seed             int
    num_params       int
    test/acc, test/loss          float   final-epoch test figures (None when the run did not finish)
    val/acc, val/loss            float   when dataset.val_size > 0
    fwd_iters, bwd_iters         float   mean solver iterations per training batch, last epoch
    fwd_iters_max, bwd_iters_max float   max over the last epoch's batches
    test/fwd_iters               float   mean forward iterations per test batch
    epochs           int      completed epochs
    train_time_s     float    wall time of fit()
    epoch_time_s     float    mean training time per epoch (without evaluation)
    samples_per_s    float    training throughput, last epoch
    peak_memory_mb   float    peak resident memory of the process (MiB)
    peak_gpu_memory_mb float  peak CUDA memory (None on CPU)
    git_commit       str      HEAD of the project checkout (None outside git); git_dirty bool
    versions         dict     python, torch, torchvision, lightning, hydra, omegaconf, pcdeq
    overrides        list     the command-line overrides
    run_dir          str
    started_at, finished_at   str  ISO 8601 (UTC)
    metrics          dict     every final epoch-level metric (train/*, test/*, val/*)
    residual_history list     per equilibrium solve of the last test batch: the stopping residual after each
                              forward iteration (trained weights)
    error            str      the failure message when status is failed (a full disk: the errno name, e.g.
                              ENOSPC, and the file)
    warm_start_from  dict     (train) checkpoint and run_key of another run's checkpoint it started from, or null
    checkpoint, source_run_key, solver_overrides, eval_time_s    (eval only) what was evaluated, how

Next to it, ``launch.json`` (``run_key``, ``started_at``, ``pid``, ``host``) is written when a run starts: a
results.json whose ``started_at`` is older than the last launch is a late write of an earlier process, never the
result of the current one (see :func:`completed_run`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pcdeq.disk import writing

SCHEMA_VERSION = 2
STATUSES = ("completed", "diverged", "failed", "interrupted")

# Overrides that say where or how a run executes, not what it computes: they are not part of its identity.
EXECUTION_KEYS = (
    "experiment", "num_threads", "skip_if_done", "auto_resume", "ckpt_path", "tags", "logger", "callbacks",
    "paths.data_dir", "paths.log_dir", "paths.output_dir", "dataset.data_dir", "dataset.download",
    "dataset.num_workers", "dataset.pin_memory", "trainer", "trainer.accelerator", "trainer.devices",
    "trainer.strategy", "trainer.enable_progress_bar", "trainer.enable_model_summary", "certificate_every_n_steps",
)


def canonical_value(value: str) -> str:
    """One spelling per value, as Hydra reads it: ``1e-2`` and ``0.01`` -> ``0.01``, ``True`` -> ``true``."""
    v = value.strip()
    if v.startswith("[") and v.endswith("]"):
        return "[" + ",".join(canonical_value(x) for x in v[1:-1].split(",") if x.strip()) + "]"
    if v.lower() in ("true", "false"):
        return v.lower()
    try:
        return str(int(v))
    except ValueError:
        pass
    try:
        return repr(float(v))
    except ValueError:
        return v


def identity_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change what a run computes, canonical and sorted (``+`` / ``++`` prefixes dropped)."""
    kept = []
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key.lstrip("~") not in EXECUTION_KEYS and not key.startswith("hydra"):
            kept.append(f"{key}={canonical_value(value)}")
    return sorted(kept)


def run_key(experiment: str | None, overrides: list[str]) -> str:
    """A run's identity: its experiment and the sorted identity overrides (seed included), e.g.
    ``pcdeq_linear_mnist/model.activation=tanh,seed=0``."""
    return f"{experiment or '-'}/{','.join(identity_overrides(overrides))}"


def completed_run(run_dir: str | Path, key: str) -> dict | None:
    """The results of ``run_dir`` if they are a completed run (or evaluation) of identity ``key`` written by its
    last launch.

    A stale write (an older process finishing after the directory was reused) is never taken for the current
    run: the results must name this directory and the key, and must not be older than ``launch.json``.
    """
    run_dir = Path(run_dir)
    try:
        res = read_results(run_dir / "results.json")
    except (OSError, ValueError):
        return None
    # a training run's identity is recomputed from what it recorded, so it follows this pcdeq's canonical
    # spelling; an evaluation's is the key it recorded (its checkpoint's run and solver settings, not overrides)
    recorded = (res.get("run_key") if res.get("task") == "eval"
                else run_key(res.get("experiment"), res.get("overrides") or []))
    if res.get("status") != "completed" or recorded != key:
        return None
    if not res.get("run_dir") or Path(res["run_dir"]).resolve() != run_dir.resolve():
        return None
    launch = run_dir / "launch.json"
    if launch.is_file():
        try:
            started = json.loads(launch.read_text()).get("started_at") or ""
        except (OSError, ValueError):
            return None
        if (res.get("started_at") or "") < started:
            return None
    return res


def _clean(value: Any) -> Any:
    """JSON-safe values: tensors to numbers, NaN/Inf to None."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file through a temporary file in the same directory, fsync and an atomic rename.

    ``write(f)`` fills the binary file ``f``. Whatever fails (a full disk, a kill, an exception in ``write``), the
    previous ``path`` is left as it was and the temporary file is removed: a reader only ever sees the old or the
    new complete file. The file gets the usual permissions (0666 less the umask), not mkstemp's 0600.

    Raises:
        pcdeq.disk.DiskFullError: no space, quota or a read-only filesystem (the message names the file, the
            free space and a fix); the previous file is intact and the temporary one removed.
    """
    path = Path(path)
    with writing(path):  # a full disk, quota or read-only filesystem: one DiskFullError naming the file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`atomic_write`)."""
    text = json.dumps(_clean(data), indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_results(path: str | Path, results: dict) -> None:
    """Validate the status and write a results.json atomically."""
    if results.get("status") not in STATUSES:
        raise ValueError(f"results status must be one of {STATUSES}, got {results.get('status')!r}")
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, **results})


def read_results(path: str | Path) -> dict:
    """Read a results.json.

    Raises:
        ValueError: not JSON, not an object, or a schema version this pcdeq does not read (the message names
            the file); OSError when it cannot be read.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version not in (1, SCHEMA_VERSION):
        raise ValueError(f"{path}: schema_version {version!r} is not one this pcdeq reads (1 or {SCHEMA_VERSION})")
    if version == 1:  # no run_key yet: derive it from what version 1 recorded
        data.setdefault("run_key", run_key(data.get("experiment"), data.get("overrides") or []))
    return data
