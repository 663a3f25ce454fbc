"""The results aggregator: every results.json under a root, grouped by the table specs, into tables and plots.

``python -m pcdeq.aggregate --root results/runs --out results/tables`` (or ``--profile smoke``) writes, per
table spec, ``<name>.md``, ``<name>.csv`` and ``<name>.tex`` (booktabs), the plots (``plots/*.png``) and
``report.md``: the runs that failed, diverged, are partial or unreadable (listed, never averaged in) and the rows
with fewer seeds than the spec asks. Accuracy is the mean ± sample standard deviation over seeds, with n. Only
the project's own files are read: no network, no wandb account.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pcdeq.errors import ConfigError, PcdeqUserError
from pcdeq.reproduce import (
    PROJECT_ROOT,
    Profile,
    RunIndex,
    TableSpec,
    eval_jobs,
    find_eval,
    index_runs,
    list_specs,
    load_profile,
    load_spec,
    train_jobs,
)

log = logging.getLogger("pcdeq.aggregate")
PUBLISHED = PROJECT_ROOT / "results" / "published.csv"


@dataclass
class Stat:
    """Mean, sample standard deviation and count of one figure over a row's runs."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else math.nan


def _stat(runs: list[dict], key: str, scale: float = 1.0) -> Stat:
    return Stat([float(r[key]) * scale for r in runs if r.get(key) is not None])


def load_published(path: Path = PUBLISHED) -> dict[tuple[str, str], dict]:
    """(dataset, model) -> the published row (accuracy, std, runs, params, source)."""
    with path.open() as f:
        return {(r["dataset"], r["model"]): r for r in csv.DictReader(f)}


@dataclass
class TableRow:
    """One row of an aggregated table (formatted lazily by the writers)."""

    label: str
    cells: dict[str, Stat | float | str | None]
    n_wanted: int
    note: str = ""


@dataclass
class Table:
    spec: TableSpec
    header: list[str]
    rows: list[TableRow]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- building


def _protocol_note(runs: list[dict]) -> str:
    notes = {(r.get("protocol") or {}).get("note") for r in runs if (r.get("protocol") or {}).get("published") is False}
    return "; ".join(sorted(n for n in notes if n)) or ("protocol not published" if notes else "")


def _published_cells(published: dict, dataset: str | None, model: str | None) -> tuple[float | None, str]:
    entry = published.get((dataset or "", model or "")) if model else None
    if entry is None:
        return None, ""
    std = f" ± {float(entry['std']):.1f}" if entry.get("std") else ""
    runs = f" ({entry['runs']})" if entry.get("runs") else ""
    return float(entry["accuracy"]), f"{float(entry['accuracy']):.2f}{std}{runs}"


def build_rows_table(spec: TableSpec, profile: Profile, index: RunIndex, published: dict) -> Table:
    """A 'rows' table: one line per spec row, statistics over its seeds."""
    header = ["model"] + list(spec.columns)
    rows = []
    for row in spec.rows:
        runs = [index.completed[j.key] for _, j in train_jobs(spec, profile, row=row) if j.key in index.completed]
        dataset = spec.dataset or (runs[0]["dataset"] if runs else None)
        _, pub = _published_cells(published, dataset, row.published)
        cells: dict[str, Stat | float | str | None] = {
            "test_acc": _stat(runs, "test/acc", 100.0), "params": runs[0]["num_params"] if runs else None,
            "fwd_iters": _stat(runs, "fwd_iters"), "bwd_iters": _stat(runs, "bwd_iters"),
            "epoch_time": _stat(runs, "epoch_time_s"), "published": pub,
            "test_fwd_iters": _stat(runs, "test/fwd_iters"),
        }
        n_wanted = len(train_jobs(spec, profile, row=row))
        rows.append(TableRow(row.label, cells, n_wanted, _protocol_note(runs)))
    for model in spec.also_published:
        _, pub = _published_cells(published, spec.dataset, model)
        if pub:
            rows.append(TableRow(model, {"published": pub}, 0, "published figure only"))
    return Table(spec, header, rows)


def build_tolerance_table(spec: TableSpec, profile: Profile, index: RunIndex) -> Table:
    """A 'tolerance' table: per row and sweep value, training at it and evaluating one model at it."""
    header = ["model", "tolerance"] + [f"train {c}" for c in spec.columns if c != "test_fwd_iters"] + [
        "eval test_acc", "eval test_fwd_iters"]
    evals, _ = eval_jobs(spec, profile, index)
    rows = []
    for row in spec.rows:
        jobs = train_jobs(spec, profile, row=row)
        per_value = len(jobs) // max(1, len(row.sweep_values))
        for i, value in enumerate(row.sweep_values):
            chunk = jobs[i * per_value:(i + 1) * per_value]
            runs = [index.completed[j.key] for _, j in chunk if j.key in index.completed]
            ev = [find_eval(index, e) for r, e in evals if r == row and dict(e.solver) == {
                k.split(".", 1)[1]: value for k in row.sweep_keys}]
            ev_runs = [e for e in ev if e is not None]
            cells: dict[str, Stat | float | str | None] = {
                "tolerance": f"{value:g}", "train test_acc": _stat(runs, "test/acc", 100.0),
                "train fwd_iters": _stat(runs, "fwd_iters"), "train bwd_iters": _stat(runs, "bwd_iters"),
                "train epoch_time": _stat(runs, "epoch_time_s"),
                "train params": runs[0]["num_params"] if runs else None,
                "eval test_acc": _stat(ev_runs, "test/acc", 100.0),
                "eval test_fwd_iters": _stat(ev_runs, "test/fwd_iters"),
            }
            rows.append(TableRow(row.label, cells, per_value))
    return Table(spec, header, rows)


# ---------------------------------------------------------------- formatting


def _fmt(cell: Stat | float | str | None, column: str, latex: bool = False) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, str):
        return cell or "-"
    if isinstance(cell, Stat):
        if cell.n == 0:
            return "-"
        digits = 2 if "acc" in column else 1
        pm = " $\\pm$ " if latex else " ± "
        std = f"{pm}{cell.std:.{digits}f}" if cell.n > 1 else ""
        body = f"{cell.mean:.{digits}f}{std}"
        return f"{body} ({cell.n})" if column.endswith("test_acc") else body
    return f"{cell:,}" if isinstance(cell, int) else f"{cell:g}"


TITLES = {"model": "model", "test_acc": "test acc. % (n)", "params": "params", "fwd_iters": "fwd iters",
          "bwd_iters": "bwd iters", "epoch_time": "s / epoch", "published": "published % (runs)",
          "test_fwd_iters": "test fwd iters", "tolerance": "tolerance"}


def _title(column: str) -> str:
    prefix, _, rest = column.partition(" ")
    if prefix in ("train", "eval") and rest:
        return f"{prefix}: {TITLES.get(rest, rest)}"
    return TITLES.get(column, column)


def _marks(table: Table, row: TableRow) -> str:
    marks = []
    n = row.cells.get("test_acc") or row.cells.get("train test_acc")
    if isinstance(n, Stat) and row.n_wanted and n.n < row.n_wanted:
        marks.append(f"{n.n} of {row.n_wanted} runs" if n.n else "not run")
    if row.note:
        marks.append(row.note)
    return "; ".join(marks)


def to_markdown(table: Table) -> str:
    lines = [f"### {table.spec.title}", ""]
    lines.append("| " + " | ".join(_title(c) for c in table.header) + " | notes |")
    lines.append("|" + "---|" * (len(table.header) + 1))
    for row in table.rows:
        cells = [row.label] + [_fmt(row.cells.get(c), c) for c in table.header[1:]]
        lines.append("| " + " | ".join(cells) + f" | {_marks(table, row)} |")
    lines += ["", "Accuracy: mean ± sample standard deviation over seeds (n runs), last epoch. Iterations: per "
              "training batch, last epoch. s / epoch: training time per epoch on the machine that ran it."]
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("±", "$\\pm$")):
        text = text.replace(a, b)
    return text


def _tex_cell(cell: Stat | float | str | None, column: str) -> str:
    text = _fmt(cell, column, latex=True)
    if isinstance(cell, str):
        text = _tex_escape(text)
    return text.replace(",", "{,}")  # thousands separators, not column breaks in some packages


def to_latex(table: Table) -> str:
    cols = "l" + "r" * (len(table.header) - 1) + "l"
    lines = [f"% {table.spec.title}", f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
             " & ".join(_tex_escape(_title(c)) for c in table.header) + " & notes \\\\", "\\midrule"]
    for row in table.rows:
        cells = [_tex_escape(row.label)] + [_tex_cell(row.cells.get(c), c) for c in table.header[1:]]
        lines.append(" & ".join(cells) + f" & {_tex_escape(_marks(table, row))} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_csv(table: Table, path: Path) -> None:
    """Machine-readable: mean, std and n of every statistic as separate numeric columns."""
    fields = ["model"]
    for c in table.header[1:]:
        sample = next((r.cells.get(c) for r in table.rows if isinstance(r.cells.get(c), Stat)), None)
        fields += [f"{c} mean", f"{c} std", f"{c} n"] if sample is not None else [c]
    fields.append("notes")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for row in table.rows:
            out: list[object] = [row.label]
            for c in table.header[1:]:
                cell = row.cells.get(c)
                if f"{c} mean" in fields:
                    s = cell if isinstance(cell, Stat) else Stat()
                    out += [_num(s.mean), _num(s.std), s.n]
                else:
                    out.append("" if cell is None else cell)
            out.append(_marks(table, row))
            w.writerow(out)


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


# ---------------------------------------------------------------- report and CLI


def write_report(index: RunIndex, tables: list[Table], root: Path, out: Path, command: str) -> None:
    lines = ["# Aggregation report", "", f"- command: `{command}`", f"- runs read from: `{root}`",
             f"- written: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
             f"- completed training runs: {len(index.completed)}, completed evaluations: {len(index.evals)}", ""]
    lines += ["## Runs not averaged in", ""]
    if index.problems:
        lines += ["| status | run directory | detail |", "|---|---|---|"]
        for d, status, detail in index.problems:
            rel = d.relative_to(root) if d.is_relative_to(root) else d
            lines.append(f"| {status} | `{rel}` | {' '.join(detail.split())[:200]} |")
    else:
        lines.append("None: every run found completed.")
    if index.superseded:
        lines += ["", f"Superseded attempts (their run completed in another directory): {len(index.superseded)}."]
    lines += ["", "## Rows with fewer runs than their spec asks", ""]
    short = [f"- {t.spec.name}: {r.label}" + (f" (tolerance {r.cells.get('tolerance')})" if "tolerance" in r.cells
                                              else "") + f": {_marks(t, r)}"
             for t in tables for r in t.rows if r.n_wanted and "run" in _marks(t, r)]
    lines += short or ["None."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def aggregate(tables: Sequence[str], profile: Profile, root: Path | None = None, out: Path | None = None,
              command: str = "", plots: bool = True) -> list[Table]:
    """Build and write every table of ``tables`` from the runs under ``root``.

    Raises:
        ConfigError: the root is missing, not a directory, or holds no results.json; the output directory
            cannot be written.
    """
    root = root or profile.root
    out = out or profile.out
    if not root.is_dir():
        raise ConfigError(f"runs directory {root} does not exist or is not a directory (run make reproduce-tables, "
                          "or pass --root)")
    index = index_runs(root)
    if not index.completed and not index.evals and not index.problems:
        raise ConfigError(f"no results.json under {root}: nothing to aggregate (run make reproduce-tables first)")
    try:
        (out / "plots").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output directory {out}: {e.strerror}") from None
    published = load_published()
    built = []
    for name in tables:
        spec = load_spec(name)
        table = (build_tolerance_table(spec, profile, index) if spec.kind == "tolerance"
                 else build_rows_table(spec, profile, index, published))
        (out / f"{spec.name}.md").write_text(to_markdown(table))
        (out / f"{spec.name}.tex").write_text(to_latex(table))
        write_csv(table, out / f"{spec.name}.csv")
        if plots:
            from pcdeq.plots import plot_table  # matplotlib is loaded only when plots are drawn

            plot_table(spec, profile, index, out / "plots")
        built.append(table)
        log.info("%s: %d rows -> %s", spec.name, len(table.rows), out / f"{spec.name}.md")
    write_report(index, built, root, out, command)
    return built


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcdeq.aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="runs directory (default: the profile's)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the profile's)")
    parser.add_argument("--profile", default="full", help="experiments/profiles/<name>.yaml (full, smoke)")
    parser.add_argument("--tables", default="all", help="comma-separated table names, or all (default)")
    parser.add_argument("--no-plots", action="store_true", help="tables and report only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[aggregate] %(message)s")
    command = "python -m pcdeq.aggregate " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        tables = list_specs() if args.tables == "all" else [t for t in args.tables.split(",") if t]
        aggregate(tables, load_profile(args.profile), args.root, args.out, command.strip(), not args.no_plots)
    except PcdeqUserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
