"""Table specs (``experiments/*.yaml``) and profiles (``experiments/profiles/``), read and checked.

A table spec names its rows (an experiment config plus overrides such as the activation), the seeds, the
columns and the published figure beside each row; a tolerance table also sweeps solver settings per row and
evaluates one trained model of another table at each setting. A *profile* says where runs live and adds overrides
to every job (``smoke``: synthetic data, tiny budgets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcdeq.activations import ACTIVATIONS
from pcdeq.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: experiments/, conf/ and results/
SPEC_DIR = PROJECT_ROOT / "experiments"
EXPERIMENT_DIR = PROJECT_ROOT / "conf" / "experiment"
COLUMNS = ("test_acc", "params", "fwd_iters", "bwd_iters", "epoch_time", "published", "test_fwd_iters")
TABLE_KINDS = ("rows", "tolerance")


@dataclass(frozen=True)
class Row:
    """One table row: an experiment config and the overrides that make the row.

    Attributes:
        label: the row's name in the table.
        experiment: a config name in ``conf/experiment/``.
        overrides: Hydra overrides, e.g. ``["model.activation=sigmoid"]``.
        published: the ``model`` entry of ``results/published.csv`` shown beside the row, if any.
        tags: free labels to select rows (``--tag cpu``).
        sweep_keys / sweep_values / sweep_default: tolerance tables: the keys set together, their values, and
            the value the protocol uses anyway (its runs are the row's own runs, with no override).
    """

    label: str
    experiment: str
    overrides: tuple[str, ...] = ()
    published: str | None = None
    tags: tuple[str, ...] = ()
    sweep_keys: tuple[str, ...] = ()
    sweep_values: tuple[Any, ...] = ()
    sweep_default: Any = None


@dataclass(frozen=True)
class TableSpec:
    """A table: rows, seeds, columns and, for tolerance tables, the evaluation sweep."""

    name: str
    title: str
    kind: str
    dataset: str | None
    seeds: tuple[int, ...]
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    eval_seed: int | None = None  # tolerance tables: evaluate this seed's model (trained at the row's defaults)
    also_published: tuple[str, ...] = ()  # published.csv models shown below the rows (not trained here)
    path: Path = field(default=SPEC_DIR)


def _fail(path: Path, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def load_spec(name_or_path: str | Path) -> TableSpec:
    """Read and check a table spec (``experiments/<name>.yaml``).

    Raises:
        ConfigError: unreadable file, unknown experiment, column or kind, or a malformed row; the message
            names the file and the problem.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SPEC_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_specs()) or "none"
        raise ConfigError(f"no table spec {path} (known tables: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise _fail(path, f"cannot be read as YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise _fail(path, "expected a mapping with name, rows, seeds, columns")
    kind = raw.get("kind", "rows")
    if kind not in TABLE_KINDS:
        raise _fail(path, f"unknown kind {kind!r}; valid choices: {', '.join(TABLE_KINDS)}")
    columns = tuple(raw.get("columns") or COLUMNS[:6])
    bad = [c for c in columns if c not in COLUMNS]
    if bad:
        raise _fail(path, f"unknown column(s) {', '.join(bad)}; valid columns: {', '.join(COLUMNS)}")
    seeds = raw.get("seeds") or [0]
    if not all(isinstance(s, int) for s in seeds):
        raise _fail(path, f"seeds must be integers, got {seeds!r}")
    rows = []
    for i, r in enumerate(raw.get("rows") or []):
        if not isinstance(r, dict) or "experiment" not in r:
            raise _fail(path, f"row {i + 1} needs at least an experiment: {r!r}")
        if not (EXPERIMENT_DIR / f"{r['experiment']}.yaml").is_file():
            valid = ", ".join(sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml")))
            raise _fail(path, f"row {i + 1}: unknown experiment {r['experiment']!r}; valid: {valid}")
        overrides = tuple(str(o) for o in r.get("overrides") or ())
        if any("=" not in o for o in overrides):
            raise _fail(path, f"row {i + 1}: overrides must be key=value, got {list(overrides)}")
        for o in overrides:
            if o.startswith("model.activation=") and o.split("=", 1)[1] not in ACTIVATIONS:
                raise _fail(path, f"row {i + 1}: unknown activation {o.split('=', 1)[1]!r}; valid choices: "
                                  f"{', '.join(ACTIVATIONS)}")
        sweep = r.get("sweep") or {}
        if kind == "tolerance" and not (sweep.get("keys") and sweep.get("values")):
            raise _fail(path, f"row {i + 1}: a tolerance table needs sweep: {{keys: [...], values: [...]}}")
        rows.append(Row(
            label=str(r.get("label") or f"{r['experiment']} {' '.join(overrides)}".strip()),
            experiment=r["experiment"], overrides=overrides, published=r.get("published"),
            tags=tuple(r.get("tags") or ()), sweep_keys=tuple(sweep.get("keys") or ()),
            sweep_values=tuple(sweep.get("values") or ()), sweep_default=sweep.get("default"),
        ))
    if not rows:
        raise _fail(path, "has no rows")
    return TableSpec(name=str(raw.get("name") or path.stem), title=str(raw.get("title") or path.stem), kind=kind,
                     dataset=raw.get("dataset"), seeds=tuple(seeds), columns=columns, rows=tuple(rows),
                     eval_seed=raw.get("eval_seed"), also_published=tuple(raw.get("also_published") or ()),
                     path=path)


def list_specs() -> list[str]:
    """Names of the table specs in ``experiments/``."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class Profile:
    """Where runs live and what every job adds (``experiments/profiles/<name>.yaml``)."""

    name: str
    root: Path
    out: Path
    overrides: tuple[str, ...] = ()
    channels: dict[str, str] = field(default_factory=dict)  # model name -> model.channels override
    seeds: tuple[int, ...] | None = None  # at most these seeds of each table


def load_profile(name: str) -> Profile:
    """Read ``experiments/profiles/<name>.yaml`` (or a profile file's path); relative paths in it are relative to
    the project root."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SPEC_DIR / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (SPEC_DIR / "profiles").glob("*.yaml")))
        raise ConfigError(f"unknown profile {name!r} (no {path}); valid: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    root, out = Path(raw.get("root", "results/runs")), Path(raw.get("out", "results/tables"))
    return Profile(name=path.stem, root=root if root.is_absolute() else PROJECT_ROOT / root,
                   out=out if out.is_absolute() else PROJECT_ROOT / out,
                   overrides=tuple(str(o) for o in raw.get("overrides") or ()),
                   channels={str(k): str(v) for k, v in (raw.get("channels") or {}).items()},
                   seeds=tuple(raw["seeds"]) if raw.get("seeds") else None)
