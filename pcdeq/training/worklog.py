"""What each training job of a reproduction worker did, for the worker's summary line.

``python -m pcdeq.reproduce`` hands its ``train.py`` processes a file in :data:`ENV`; :func:`train` appends one
JSON line per job to it: the run's key and directory and its outcome (:data:`OUTCOMES`). The worker reads the
file back once its commands have ended (:func:`read_outcomes`). Without the variable nothing is written.
Lines are appended with ``O_APPEND`` in one write each, so the processes of a parallel launcher (joblib, a Slurm
array on a shared filesystem) can share one file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "PCDEQ_WORKLOG"
# trained here and finished (the run's own status) | completed earlier | another process holds it | raised
OUTCOMES = ("completed", "diverged", "interrupted", "done", "in_use", "failed")


def record_outcome(key: str, run_dir: str | os.PathLike[str], outcome: str) -> None:
    """Append ``outcome`` of the run ``key`` to the worker's log, if this process has one."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"run_key": key, "run_dir": str(run_dir), "outcome": outcome, "pid": os.getpid()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_outcomes(path: Path) -> dict[str, str]:
    """run key -> the outcome of its last job in the log at ``path`` ({} when none was written)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    outcomes = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            outcomes[str(entry["run_key"])] = str(entry["outcome"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed process
    return outcomes
