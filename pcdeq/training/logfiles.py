"""A run's log files, ``<run dir>/csv/metrics.csv`` and ``<run dir>/train.log``, reporting a full disk in one line.

* :class:`CSVLogger` (``conf/logger/csv.yaml``): Lightning's CSV logger. Its writer appends to ``metrics.csv``
  with a plain file write, so a full disk, an exceeded quota or a read-only filesystem surfaces as a bare
  ``OSError`` without a file name; here it is a :class:`pcdeq.disk.DiskFullError` naming ``metrics.csv``, like
  every other output of a run.
* :class:`RunLogFileHandler` (``conf/hydra/default.yaml``, the handler of ``train.log``): a record that cannot be
  written for lack of room is one warning line on stderr, once, instead of Python's "--- Logging error ---"
  traceback for every record; the run goes on logging to the console.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger

from pcdeq.disk import DiskFullError, full_disk, writing


class CSVLogger(LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose writes report an out-of-room failure with the file name."""

    def save(self) -> None:
        with writing(Path(self.log_dir) / "metrics.csv"):
            super().save()


class RunLogFileHandler(logging.FileHandler):
    """``logging.FileHandler`` that reports a full disk (or quota, or read-only filesystem) once, in one line.

    The records it could not write are lost from ``train.log`` only; flushing and closing on a full disk (at the
    end of the run) drop the buffered rest instead of raising.
    """

    reported = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if not self._out_of_room(sys.exc_info()[1]):
            super().handleError(record)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            if not self._out_of_room(e):
                raise

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:
            if not self._out_of_room(e):
                raise

    def _out_of_room(self, error: BaseException | None) -> bool:
        """Whether ``error`` is a full disk (then reported, the first time only)."""
        full = full_disk(error) if error is not None else None
        if full is None:
            return False
        if not self.reported:
            self.reported = True
            named = DiskFullError(self.baseFilename, full.cause, "free space; the console still has the log")
            print(f"warning: {named}", file=sys.stderr)
        return True
