"""A full disk, an exceeded quota or a read-only filesystem while writing an output: one error naming the file.

Every writer of a long-lived output goes through :func:`writing` (:func:`pcdeq.results.atomic_write` does, so
checkpoints, results.json, the resolved config and the aggregator's tables and plots are covered; training's
CSV log through its logger). A failed write is then a :class:`DiskFullError` (an
:class:`~pcdeq.errors.OutputError`, so the entry points print it as one line) whose message names the file,
the errno, the free space on that filesystem and the fix.

The cause is found through the exception chain: ``torch.save`` reports a failed write as a secondary
``RuntimeError`` ("unexpected pos ...") raised while handling the ``OSError``, and Lightning re-raises what a
callback raised. :func:`full_disk` finds the earliest such cause anywhere in a chain.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pcdeq.errors import OutputError

NO_ROOM = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EROFS: "EROFS"}
DEFAULT_FIX = "free space on that filesystem, or write the outputs elsewhere, then run the command again"


class DiskFullError(OutputError):
    """Writing ``path`` failed for lack of space or quota, or on a read-only filesystem (``errno_name``)."""

    def __init__(self, path: str | os.PathLike[str] | None, cause: OSError, fix: str = DEFAULT_FIX) -> None:
        self.path = Path(path) if path is not None else (Path(cause.filename) if cause.filename else None)
        self.cause = cause
        self.errno_name = NO_ROOM.get(cause.errno or 0, str(cause.errno))
        self.fix = fix
        where = self.path if self.path is not None else "an output file"
        super().__init__(cause.errno, f"cannot write {where}: {cause.strerror or cause} ({self.errno_name}; "
                                      f"{free_space(self.path)}); fix: {fix}")

    def __str__(self) -> str:
        return str(self.strerror)

    def with_fix(self, fix: str) -> DiskFullError:
        """The same failure with another fix (the caller knows how to continue, e.g. the resume command)."""
        return DiskFullError(self.path, self.cause, fix)

    def record(self) -> str:
        """The root cause for a results.json ``error``: errno name, message and file."""
        return f"{self.errno_name}: [Errno {self.cause.errno}] {self.cause.strerror}: {self.path}"


def free_space(path: str | os.PathLike[str] | None) -> str:
    """``'56.0 KiB free on /mnt/x'`` for the filesystem holding ``path`` (its nearest existing ancestor)."""
    if path is None:
        return "free space unknown"
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return "free space unknown"
    mount = where
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"{human_bytes(free)} free on {mount}"


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling, latest first (each once)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]


def full_disk(exc: BaseException) -> DiskFullError | None:
    """The earliest out-of-room failure in ``exc``'s chain as a :class:`DiskFullError` (None when there is none).

    A :class:`DiskFullError` already in the chain (it knows the file) wins over a bare ``OSError`` it was raised
    from; of several, the earliest raised is the root cause (later ones come from clean-up after it).
    """
    chain = list(_chain(exc))
    named = [e for e in chain if isinstance(e, DiskFullError)]
    if named:
        return named[-1]
    bare = [e for e in chain if isinstance(e, OSError) and e.errno in NO_ROOM]
    return DiskFullError(None, bare[-1]) if bare else None


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an out-of-room failure while writing ``path`` into a :class:`DiskFullError`; others pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        cause = next((c for c in reversed(list(_chain(e))) if isinstance(c, OSError) and c.errno in NO_ROOM), None)
        if cause is None:
            raise
        raise DiskFullError(path, cause) from cause
