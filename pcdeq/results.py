"""The per-run ``results.json``: its schema, atomic writing and reading.

The aggregator and the reproduction pipeline read only these files, so the schema is versioned and documented
here and in the README. Keys with a slash are the metric names logged during training.

Schema (version 1)::

    schema_version   int      1
    status           str      completed | diverged | failed | interrupted
    task             str      train | eval
    experiment       str      experiment_name (groups seeds of one table row)
    dataset, model, family, arch, activation, variant, solver   str (activation/variant null for monDEQ)
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
    error            str      the failure message when status is failed
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

SCHEMA_VERSION = 1
STATUSES = ("completed", "diverged", "failed", "interrupted")


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
    """
    path = Path(path)
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
    """Read a results.json (raises on a schema from the future)."""
    data = json.loads(Path(path).read_text())
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {data['schema_version']} is newer than this pcdeq understands")
    return data
