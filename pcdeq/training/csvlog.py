"""The per-epoch CSV log of a run (``<run dir>/csv/metrics.csv``): Lightning's CSV logger, reporting a full disk.

Lightning's writer appends to ``metrics.csv`` with a plain file write, so a full disk, an exceeded quota or a
read-only filesystem surfaces as a bare ``OSError`` without a file name; here it is a
:class:`pcdeq.disk.DiskFullError` naming ``metrics.csv``, like every other output of a run.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger

from pcdeq.disk import writing


class CSVLogger(LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose writes report an out-of-room failure with the file name."""

    def save(self) -> None:
        with writing(Path(self.log_dir) / "metrics.csv"):
            super().save()
