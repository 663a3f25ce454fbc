"""Every command the README and docs/ show still names something that exists, with keys that still compose.

The commands are read from the Markdown itself (fenced blocks and inline code that starts with ``python`` or
``make``), so a renamed module, a removed Makefile target or variable, a moved script or a config key that no
longer exists fails here instead of in a reader's shell. Commands are checked, not run (they train for hours):

* ``make T VAR=...``: ``T`` is a Makefile target and each ``VAR`` is read by the Makefile;
* ``python -m M ...``: module ``M`` is importable, and each ``--flag`` is one that ``M``'s package defines;
* ``python path.py``: the file exists; ``python -c CODE``: the code compiles;
* ``python train.py|eval.py overrides``: the overrides pass the entry point's validation and compose with Hydra,
  its own groups included (the first value of a sweep; ``<placeholders>`` stand for any path).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pcdeq.training.validate import validate_overrides

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md",
        ROOT / "results" / "README.md", ROOT / "results" / "bench" / "README.md"]
FENCE = re.compile(r"^```.*?$(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:python|make) [^`]+)`")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for each shell command shown in the docs, continuation lines joined."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in FENCE.findall(text):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if re.match(r"^([A-Z_]+=\S+ )*(nice |\.venv/bin/)*(python|make) ", line):
                    found.append((doc.name, line))
        found += [(doc.name, c) for c in INLINE.findall(FENCE.sub("", text)) if "..." not in c]
    return found


COMMANDS = documented_commands()


def _words(command: str) -> list[str]:
    command = re.sub(r"<[^>]*>", "x", command)  # <run dir>, <dir with MNIST/raw>: any path
    words = shlex.split(command, comments=True)
    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] == "nice"):
        words.pop(0)
    words[0] = words[0].removeprefix(".venv/bin/")
    return words


def _make_targets_and_vars() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", text, re.M))
    variables = set(re.findall(r"\$\(([A-Z_]+)\)", text)) | set(re.findall(r"^([A-Z_]+)\s*\??=", text, re.M))
    return targets, variables


def _package_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    folder = Path(spec.origin).parent
    return "".join(p.read_text() for p in folder.rglob("*.py"))


def _first_of_sweep(arg: str) -> str:
    key, _, value = arg.partition("=")
    if "," in value and not value.startswith(("[", "'", '"')):
        value = value.split(",")[0]
    return f"{key}={value}"


def _check_entry_point(script: str, args: list[str]) -> None:
    task = script.removesuffix(".py")
    overrides = [a for a in args if a != "-m"]
    validate_overrides(overrides, task, ROOT / "conf")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # with Hydra's own config too, so hydra/launcher=... must name a launcher this install has
        compose(task, overrides=[_first_of_sweep(a) for a in overrides], return_hydra_config=True)


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) > 40  # the reader guard: the extraction itself must keep finding the docs' commands
    assert {w for _, c in COMMANDS for w in _words(c)[:2]} >= {"make", "python", "train.py", "-m"}


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command_exists(where: str, command: str) -> None:
    words = _words(command)
    if words[0] == "make":
        targets, variables = _make_targets_and_vars()
        goals = [w for w in words[1:] if "=" not in w]
        assert all(g in targets for g in goals), f"{where}: `{command}`: no Makefile target {goals}"
        unknown = [w.split("=")[0] for w in words[1:] if "=" in w and w.split("=")[0] not in variables]
        assert not unknown, f"{where}: `{command}`: the Makefile reads no variable {unknown}"
        return
    assert words[0] == "python", command
    if words[1] == "-c":
        compile(words[2], command, "exec")
        return
    if words[1] == "-m":
        module = words[2]
        if module == "pytest":
            return
        source = _package_source(module)
        flags = [w.split("=")[0] for w in words[3:] if w.startswith("--")]
        missing = [f for f in flags if f'"{f}"' not in source]
        assert not missing, f"{where}: `{command}`: {module} defines no option {missing}"
        return
    script = words[1]
    assert (ROOT / script).is_file(), f"{where}: `{command}`: no file {script}"
    if script in ("train.py", "eval.py"):
        _check_entry_point(script, words[2:])


def test_readme_python_runs_and_its_parameter_counts_hold() -> None:
    """The README's Python example runs as written, and a count in a comment (``net = ...  # 164,760 ...``) is the
    named model's number of parameters."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert blocks, "the README shows no Python example"
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
        claims = re.findall(r"^(\w+) = .*#\s*(\d{1,3}(?:,\d{3})+)\b", code, re.M)
        assert claims, "the README's example states no parameter count to check"
        for name, count in claims:
            assert sum(p.numel() for p in scope[name].parameters()) == int(count.replace(",", "")), name
