"""Third-party output that says nothing to this project's users, silenced by its exact message and nothing else.

Each entry names one message: advertising (Lightning's "Tip: ... litlogger"), a torch deprecation hit inside
Lightning's own code on every fit and test, and warnings about situations this project creates on purpose (an
empty validation loader list when there is no validation split, the dataloader Lightning loads once to size the
schedule). Every other warning and log line, from any library, is untouched; the project's own warnings
(solves that did not converge, uncertified batches) are one line per epoch (:mod:`pcdeq.training.module`).
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, message pattern) of log records to drop
LOG_LINES: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging and experiment tracking, try "
                                              r"installing \[litlogger\]"),
    ("lightning.pytorch.utilities.rank_zero", r"Loading `train_dataloader` to estimate number of stepping batches\.$"),
)
# (message pattern, category) of warnings to ignore
WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated, use `isinstance\(treespec, TreeSpec\) and "
     r"treespec\.is_leaf\(\)` instead\.", FutureWarning),
    (r"Total length of `list` across ranks is zero\. Please make sure this was your intention\.", Warning),
)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches one of the patterns."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def silence_third_party() -> None:
    """Install the filters above (idempotent)."""
    by_logger: dict[str, list[str]] = {}
    for name, pattern in LOG_LINES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    for pattern, category in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
