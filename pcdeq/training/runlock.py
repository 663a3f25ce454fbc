"""One process per run directory: an advisory lock held for the whole run.

Two processes writing one run directory corrupt it (Lightning's CSV logger rewrites its file under the other
writer; a second process resumes the first one's half-written checkpoint). :func:`run_lock` takes an exclusive
``flock`` on ``<run dir>/run.lock`` before anything in the directory is read or written, and keeps it until the
run ends. The operating system drops the lock when the holder exits or is killed, so a crash never leaves a stale
lock behind; the file itself stays (deleting it would race with the next holder) and names the last holder.

Only rank 0 of a distributed run locks: the other ranks of the same run share its directory by design.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pcdeq.errors import PcdeqUserError

LOCK_NAME = "run.lock"


class RunInUseError(PcdeqUserError):
    """The run directory is locked by another live process."""

    def __init__(self, run_dir: Path, holder: dict) -> None:
        who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "started_at") if holder.get(k)) or "unknown"
        super().__init__(f"run directory {run_dir} is in use by another process ({who}); fix: wait for it to end, "
                         "or give this run its own directory (hydra.run.dir=... or paths.output_dir=...)")
        self.run_dir = run_dir
        self.holder = holder


def _is_rank_zero() -> bool:
    """False in the worker ranks a distributed launch starts (they run in rank 0's directory)."""
    return all(os.environ.get(var, "0") == "0" for var in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def lock_holder(run_dir: str | os.PathLike[str]) -> dict:
    """What the last holder of ``run_dir``'s lock wrote (pid, host, started_at); {} if nothing readable."""
    try:
        holder = json.loads((Path(run_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body; :class:`RunInUseError` if a live process holds it already.

    Nothing in ``run_dir`` but the lock file is touched, and that only once the lock is ours.
    """
    run_dir = Path(run_dir)
    if not _is_rank_zero():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUseError(run_dir, lock_holder(run_dir)) from None
        holder = {"pid": os.getpid(), "host": platform.node(),
                  "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        yield
    finally:
        os.close(fd)  # releases the lock
