"""One job per run directory, the same for training and evaluation: the run lock, a job held elsewhere, the outcome.

:func:`run_exclusively` is what :func:`pcdeq.training.pipeline.train` and
:func:`pcdeq.training.pipeline.evaluate` share: the job's body runs only while this process holds the
directory's lock (:mod:`pcdeq.training.runlock`); a job another live process holds is an error, or, for a
cooperative reproduction worker (``skip_if_done``), a skip with status ``in_use``. A job that raises, or one
skipped as in use, is recorded for the worker's summary (:mod:`pcdeq.training.worklog`); a body that returns
records its own outcome (it alone knows whether it ran or found its results done).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pcdeq.training.runlock import RunInUseError, describe_holder, run_lock
from pcdeq.training.worklog import record_outcome

log = logging.getLogger("pcdeq")


def run_exclusively(run_dir: Path, key: str, skip_if_done: bool, body: Callable[[], dict]) -> dict:
    """``body()`` while holding ``run_dir``'s lock; its result.

    Args:
        run_dir: the job's output directory (nothing is written there before the lock is held).
        key: the job's identity (``run_key``), for the worker log.
        skip_if_done: a cooperative worker: a directory held by another live process is skipped, not an error.
        body: the job itself; it records its own outcome when it returns.

    Returns:
        What ``body`` returned, or ``{"status": "in_use", "run_dir", "run_key", "holder"}`` for a skipped job.

    Raises:
        RunInUseError: another live process holds ``run_dir`` and ``skip_if_done`` is off.
    """
    try:
        with run_lock(run_dir):
            return body()
    except RunInUseError as e:
        if not skip_if_done:
            record_outcome(key, run_dir, "failed")
            raise
        # a cooperative worker (the same reproduction started twice): the other process runs this job; go on
        log.info("running in another process, skipped (skip_if_done): %s (%s)", run_dir, describe_holder(e.holder))
        record_outcome(key, run_dir, "in_use")
        return {"status": "in_use", "run_dir": str(run_dir), "run_key": key, "holder": e.holder}
    except BaseException:
        record_outcome(key, run_dir, "failed")
        raise
