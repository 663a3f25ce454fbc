"""One process per run directory: an advisory lock held for the whole run.

Two processes writing one run directory corrupt it (Lightning's CSV logger rewrites its file under the other
writer; a second process resumes the first one's half-written checkpoint). :func:`run_lock` takes an exclusive
``flock`` on ``<run dir>/run.lock`` before anything in the directory is read or written, and keeps it until the
run ends. The lock file records its holder (pid, host, start time) for the refusal message and for
:func:`lock_holder`, the probe the aggregator uses to list the runs in progress.

Stale locks: the kernel drops a ``flock`` when the holder's last descriptor closes, which includes SIGKILL and
any other death of the process, so a dead holder never blocks anyone and nothing reads its pid to decide. The
file itself stays (deleting it would race with the next holder); its contents are only a record, so a garbage or
outdated file is overwritten by the next holder and never trusted to mean "held".

Shared cluster filesystems (what this assumes): Linux implements ``flock`` on NFS as a whole-file POSIX lock on
the server, so it excludes processes on other nodes on NFSv4 (locking is part of the protocol) and on NFSv3 with
the lock manager (lockd/NLM) running. On NFSv3 mounted ``nolock`` (or ``local_lock=flock``), and on Lustre mounted
``localflock``, locks are only seen on the node that took them: workers on one node still exclude each other,
workers on different nodes do not. GPFS / Spectrum Scale and Lustre mounted ``-o flock`` lock cluster-wide. A
filesystem that refuses ``flock`` (Lustre ``noflock``) makes :func:`run_lock` stop with one line; setting
``PCDEQ_RUN_LOCK=off`` runs without the lock there, and one process per run directory is then up to the user.

Only rank 0 of a distributed run locks: the other ranks of the same run share its directory by design.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pcdeq.errors import OutputError, PcdeqUserError

LOCK_NAME = "run.lock"
SWITCH_ENV = "PCDEQ_RUN_LOCK"  # "off": no lock (a filesystem without flock)
# :func:`lock_holder` holds a shared lock for a moment; a run starting in that moment retries rather than taking
# the probe for another run
RETRIES, RETRY_DELAY_S = 5, 0.05


def describe_holder(holder: dict) -> str:
    """``host H, pid P, started T`` from a lock record (the fields it has), or a note that it names none."""
    parts = [f"{label} {holder[k]}" for k, label in (("host", "host"), ("pid", "pid"), ("started_at", "started"))
             if holder.get(k)]
    return ", ".join(parts) or "holder unknown: its lock file names none"


class RunInUseError(PcdeqUserError):
    """The run directory is locked by another live process."""

    def __init__(self, run_dir: Path, holder: dict) -> None:
        super().__init__(f"run directory {run_dir} is in use by another process ({describe_holder(holder)}); "
                         "fix: wait for it to end, or give this run its own directory (hydra.run.dir=... or "
                         "paths.output_dir=...)")
        self.run_dir = run_dir
        self.holder = holder


def _is_rank_zero() -> bool:
    """False in the worker ranks a distributed launch starts (they run in rank 0's directory)."""
    return all(os.environ.get(var, "0") == "0" for var in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def holder_record(run_dir: str | os.PathLike[str]) -> dict:
    """What the last holder of ``run_dir``'s lock wrote (pid, host, started_at); {} if nothing readable.

    A record, not a lock state: the process it names may have ended long ago.
    """
    try:
        holder = json.loads((Path(run_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_holder(run_dir: str | os.PathLike[str]) -> dict | None:
    """The holder record of ``run_dir``'s lock if a live process holds it now, else None. Never blocks.

    The probe takes a shared lock without waiting and drops it at once; it never creates the lock file, so it
    works on read-only copies of a results tree. A holder whose record is unreadable is returned as {}.
    """
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None  # no lock file: never locked (or not readable: nothing to say)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder_record(run_dir)
        except OSError:
            return None  # a filesystem without flock: no lock state to report
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _unwritable(run_dir: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot lock run directory {run_dir}: {e.strerror or e} (the run writes its checkpoints "
                       "and results there); fix: point hydra.run.dir / paths.output_dir at a writable directory")


def _take(fd: int, run_dir: Path) -> None:
    """An exclusive lock on ``fd`` without waiting for a holder (a probe's moment aside), or the one-line error."""
    for attempt in range(RETRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == RETRIES - 1:
                raise RunInUseError(run_dir, holder_record(run_dir)) from None
            time.sleep(RETRY_DELAY_S)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise OutputError(f"cannot lock run directory {run_dir}: the filesystem refuses flock "
                                  f"({e.strerror}); fix: mount it with lock support (NFS with lockd, Lustre with "
                                  f"-o flock), put the runs on another disk, or set {SWITCH_ENV}=off to run "
                                  "unlocked (then never start two processes on one run directory)") from None
            raise _unwritable(run_dir, e) from None


@contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body; :class:`RunInUseError` if a live process holds it already.

    Nothing in ``run_dir`` but the lock file is touched, and that only once the lock is ours. A directory that
    cannot be created or written (a read-only filesystem) is an :class:`OutputError`, one line.
    """
    run_dir = Path(run_dir)
    if not _is_rank_zero() or os.environ.get(SWITCH_ENV, "").lower() == "off":
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _unwritable(run_dir, e) from None
    try:
        _take(fd, run_dir)
        holder = {"pid": os.getpid(), "host": platform.node(),
                  "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
        except OSError as e:
            raise _unwritable(run_dir, e) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def runs_in_progress(root: str | os.PathLike[str]) -> dict[Path, dict]:
    """Every run directory under ``root`` whose lock a live process holds now, with its holder record."""
    found = {}
    for lock in Path(root).rglob(LOCK_NAME):
        holder = lock_holder(lock.parent)
        if holder is not None:
            found[lock.parent.resolve()] = holder
    return found
