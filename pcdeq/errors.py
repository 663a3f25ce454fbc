"""The project's user-facing errors: one base class, caught once at the command line.

Anything a user can fix (a bad config value, a missing or damaged file, a checkpoint that does not match the
config) raises a subclass of :class:`PcdeqUserError`. The entry points print its message as one line (plus up
to three lines of detail) and exit with status 2, without a traceback. Library code can catch the specific
subclass; the subclasses also derive from the builtin exception a caller would expect (``ValueError`` for bad
values, ``FileNotFoundError`` for missing data, ``OSError`` for unwritable outputs).
"""

from __future__ import annotations


class PcdeqUserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


class ConfigError(PcdeqUserError, ValueError):
    """A configuration value or combination is invalid (unknown name, out-of-range number, wrong pairing)."""


class DataError(PcdeqUserError):
    """A dataset's files are unusable (damaged, truncated, wrong layout)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are not on disk and could not be downloaded."""


class CheckpointError(PcdeqUserError):
    """A checkpoint cannot be used (missing, damaged, or written for another model or schema)."""


class OutputError(PcdeqUserError, OSError):
    """An output directory (run, log or aggregate directory) cannot be created or written."""
