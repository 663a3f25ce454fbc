"""`make help` is generated from the `## ` comments on the rule lines, so every phony target must carry one."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def _phony_targets() -> list[str]:
    match = re.search(r"^\.PHONY:(.*)$", MAKEFILE.read_text(), re.M)
    assert match, "Makefile has no .PHONY line"
    return match.group(1).split()


def test_every_phony_target_has_a_help_comment() -> None:
    text = MAKEFILE.read_text()
    undocumented = [t for t in _phony_targets() if not re.search(rf"^{re.escape(t)}:[^\n]*## \S", text, re.M)]
    assert undocumented == []


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_every_phony_target() -> None:
    out = subprocess.run(["make", "-s", "-f", str(MAKEFILE), "help"], capture_output=True, text=True, check=True).stdout
    listed = [line.split()[1] for line in out.splitlines() if line.startswith("make ")]
    assert sorted(listed) == sorted(_phony_targets())
