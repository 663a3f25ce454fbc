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
import io
import logging
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pcdeq.disk import DiskFullError
from pcdeq.errors import ConfigError, PcdeqUserError
from pcdeq.reproduction.adhoc import AdhocTable, build_adhoc, check_metrics, metric_value
from pcdeq.reproduction.plan import RunIndex, eval_jobs, find_eval, index_runs, train_jobs
from pcdeq.reproduction.specs import PROJECT_ROOT, Profile, TableSpec, list_specs, load_profile, load_spec
from pcdeq.results import atomic_write
from pcdeq.training.runlock import runs_in_progress

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
    return Stat([v * scale for v in (metric_value(r, key) for r in runs) if v is not None])


# table column -> (results.json figure, scale); the columns every table (spec or ad hoc) can show
TRAIN_FIGURES = {"test_acc": ("test/acc", 100.0), "params": ("num_params", 1.0), "fwd_iters": ("fwd_iters", 1.0),
                 "bwd_iters": ("bwd_iters", 1.0), "epoch_time": ("epoch_time_s", 1.0),
                 "test_fwd_iters": ("test/fwd_iters", 1.0)}
EVAL_FIGURES = {"test_acc": ("test/acc", 100.0), "params": ("num_params", 1.0),
                "test_fwd_iters": ("test/fwd_iters", 1.0)}


def figure_cells(runs: list[dict], figures: dict[str, tuple[str, float]]) -> dict[str, Stat | float | str | None]:
    """The statistics of a row's runs, one cell per column of ``figures`` (params: the first run's count)."""
    cells: dict[str, Stat | float | str | None] = {}
    for column, (key, scale) in figures.items():
        if key == "num_params":
            cells[column] = runs[0].get("num_params") if runs else None
        else:
            cells[column] = _stat(runs, key, scale)
    return cells


def metric_figures(metrics: Sequence[str]) -> dict[str, tuple[str, float]]:
    """``--metric`` keys as table columns, named as the user typed them (accuracies in %, like the paper tables)."""
    return {m: (m, 100.0 if m.endswith("acc") else 1.0) for m in metrics}


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
        cells = {**figure_cells(runs, TRAIN_FIGURES), "published": pub}
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
                "tolerance": f"{value:g}", **{f"train {c}": v for c, v in figure_cells(runs, TRAIN_FIGURES).items()},
                **{f"eval {c}": v for c, v in figure_cells(ev_runs, EVAL_FIGURES).items()}}
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
    lines += ["", _footnote(table)]
    return "\n".join(lines) + "\n"


SPEC_FOOTNOTE = ("Accuracy: mean ± sample standard deviation over seeds (n runs), last epoch. Iterations: per "
                 "training batch, last epoch. s / epoch: training time per epoch on the machine that ran it.")
# what each column of an ad-hoc table means, said only when the table has the column
COLUMN_NOTES = {"fwd_iters": "Iterations: per training batch, last epoch.",
                "test_fwd_iters": "Test fwd iters: per test batch.",
                "epoch_time": "s / epoch: training time per epoch on the machine that ran it."}


def _footnote(table: Table) -> str:
    if table.spec.kind != "adhoc":
        return SPEC_FOOTNOTE
    notes = ["Figures: mean ± sample standard deviation over seeds (n runs), final values of results.json."]
    return " ".join(notes + [n for c, n in COLUMN_NOTES.items() if c in table.header])


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
    """Machine-readable: mean, std and n of every statistic as separate numeric columns (written atomically)."""
    _write_text(path, to_csv(table))


def _write_text(path: Path, text: str) -> None:
    """Atomically: a reader (or a later run after a kill) sees the previous file or the new one, never half."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def to_csv(table: Table) -> str:
    """The CSV text of :func:`write_csv`."""
    fields = ["model"]
    for c in table.header[1:]:
        sample = next((r.cells.get(c) for r in table.rows if isinstance(r.cells.get(c), Stat)), None)
        fields += [f"{c} mean", f"{c} std", f"{c} n"] if sample is not None else [c]
    fields.append("notes")
    with io.StringIO(newline="") as f:
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
        return f.getvalue()


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


# ---------------------------------------------------------------- ad-hoc tables


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_.") or "adhoc"


def adhoc_figures(task: str, metrics: Sequence[str] | None) -> dict[str, tuple[str, float]]:
    """The statistic columns of an ad-hoc table: ``--metric`` if given, else the paper tables' columns."""
    if metrics:
        return metric_figures(metrics)
    if task == "eval":
        return EVAL_FIGURES
    return {c: f for c, f in TRAIN_FIGURES.items() if c != "test_fwd_iters"}


def build_adhoc_table(adhoc: AdhocTable, name: str, title: str | None, metrics: Sequence[str] | None) -> Table:
    """An ad-hoc table as the writers take it: one row per configuration, a column per varying key."""
    g = adhoc.group
    evaluation = g["task"] == "eval"
    file_name = "_".join([_slug(name)] + (["eval"] if evaluation else []) + [
        _slug(g[k]) for k in ("model", "dataset") if g[k] != "-"])
    what = f"{g['model']} on {g['dataset']}" + (" (evaluations of trained models)" if evaluation else "")
    by = f", by {', '.join(adhoc.keys)}" if adhoc.keys else ", all runs alike"
    figures = adhoc_figures(g["task"], metrics)
    spec = TableSpec(name=file_name, title=f"{title or name}: {what}{by}", kind="adhoc", dataset=g["dataset"],
                     seeds=(), columns=tuple(figures), rows=())
    rows = []
    for values, runs in adhoc.rows:
        seeds = sorted({str(r.get("seed")) for r in runs}, key=lambda s: (len(s), s))
        cells: dict[str, Stat | float | str | None] = dict(zip(adhoc.keys, values, strict=True))
        cells.update(figure_cells(runs, figures))
        rows.append(TableRow(g["model"], cells, 0, f"seeds {','.join(seeds)}"))
    return Table(spec, ["model", *adhoc.keys, *figures], rows)


def _row_name(keys: Sequence[str], values: Sequence[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) or "all runs"


# ---------------------------------------------------------------- where every run went


def spec_destinations(specs: Sequence[TableSpec], profile: Profile, index: RunIndex) -> dict[str, str]:
    """run directory -> '<spec table>: <row>' for every run a table spec claims (training and evaluation)."""
    dest: dict[str, str] = {}
    for spec in specs:
        for row, job in train_jobs(spec, profile):
            res = index.completed.get(job.key)
            if res is not None:
                swept = [o for o in job.overrides if o.split("=", 1)[0] in row.sweep_keys]
                dest.setdefault(str(res["run_dir"]), f"{spec.name}: {row.label}" + (
                    f" ({', '.join(swept)})" if swept else ""))
        evals, _ = eval_jobs(spec, profile, index)
        for row, ejob in evals:
            found = find_eval(index, ejob)
            if found is not None:
                setting = ", ".join(f"solver.{k}={v}" for k, v in ejob.solver)
                dest.setdefault(str(found["run_dir"]), f"{spec.name}: {row.label} (evaluated at {setting})")
    return dest


def unreadable_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` that cannot be listed (their runs, if any, are not read)."""
    found: list[Path] = []
    for _ in os.walk(root, onerror=lambda e: found.append(Path(e.filename))):
        pass
    return found


@dataclass
class Destinations:
    """Where each completed run went: a spec row, an ad-hoc row, or a spec table that was not built."""

    spec: dict[str, str] = field(default_factory=dict)
    adhoc: dict[str, str] = field(default_factory=dict)
    built: set[str] = field(default_factory=set)  # the spec tables written this time

    def of(self, run_dir: str) -> str:
        if run_dir in self.adhoc:
            return self.adhoc[run_dir]
        target = self.spec.get(run_dir)
        if target is None:
            return "none: not claimed by any table"
        table = target.split(":", 1)[0]
        return target if table in self.built else f"none: belongs to spec table {table}, not built (see --tables)"


# ---------------------------------------------------------------- report and CLI


def _rel(d: Path, root: Path) -> Path:
    """``d`` relative to the root the user named (run_dir in results.json is absolute, --root often not)."""
    d, root = d.resolve(), root.resolve()
    return d.relative_to(root) if d.is_relative_to(root) else d


def _running(holder: dict) -> str:
    """The status cell of a run in progress: ``running (host, pid)``."""
    return f"running ({holder.get('host', 'host unknown')}, pid {holder.get('pid', 'unknown')})"


def write_report(index: RunIndex, tables: list[Table], root: Path, out: Path, command: str,
                 dest: Destinations | None = None, unreadable: Sequence[Path] = ()) -> None:
    """``report.md``: every run read and the table it went to, or why it went nowhere; short spec rows."""
    dest = dest or Destinations()
    lines = ["# Aggregation report", "", f"- command: `{command}`", f"- runs read from: `{root}`",
             f"- written: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
             f"- completed training runs: {len(index.completed)}, completed evaluations: {len(index.evals)}", ""]
    lines += ["## Every run read, and where it went", "", "| status | run directory | table |", "|---|---|---|"]
    counted = set()
    for res in [*index.completed.values(), *index.evals]:
        counted.add(Path(str(res["run_dir"])).resolve())
        lines.append(f"| {res.get('status')} | `{_rel(Path(str(res['run_dir'])), root)}` | "
                     f"{dest.of(str(res['run_dir']))} |")
    running = runs_in_progress(root)  # a sweep still going: a live process holds these runs' locks
    for d, status, detail in index.problems:
        if d.resolve() in running:
            status, detail = _running(running[d.resolve()]), "in progress"
        lines.append(f"| {status} | `{_rel(d, root)}` | none, not averaged in: {' '.join(detail.split())[:200]} |")
    listed = counted | {d.resolve() for d, _, _ in [*index.problems, *index.superseded]}
    for d, holder in sorted(running.items()):  # locked before its launch.json is written: still loading
        if d not in listed:
            lines.append(f"| {_running(holder)} | `{_rel(d, root)}` | none, not averaged in: in progress |")
    for d, status, _ in index.superseded:
        lines.append(f"| {status} | `{_rel(d, root)}` | none: superseded (the run completed in another directory) |")
    seen = counted | {d.resolve() for d, _, _ in [*index.problems, *index.superseded]}
    for p in sorted(root.rglob("results.json")):
        if p.parent.resolve() not in seen:
            lines.append(f"| completed | `{_rel(p.parent, root)}` | none: the same run (configuration and seed) "
                         "completed in another directory, counted there |")
    for d in unreadable:
        lines.append(f"| unreadable | `{_rel(d, root)}` | none: the directory cannot be listed |")
    lines += ["", "## Runs not averaged in", ""]
    if index.problems:
        by_status: dict[str, int] = {}
        for d, status, _ in index.problems:
            status = "running" if d.resolve() in running else status
            by_status[status] = by_status.get(status, 0) + 1
        lines.append(", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())) + " (listed above).")
    else:
        lines.append("None: every run found completed.")
    if index.superseded:
        lines += ["", f"Superseded attempts (their run completed in another directory): {len(index.superseded)}."]
    lines += ["", "## Rows with fewer runs than their spec asks", ""]
    short = [f"- {t.spec.name}: {r.label}" + (f" (tolerance {r.cells.get('tolerance')})" if "tolerance" in r.cells
                                              else "") + f": {_marks(t, r)}"
             for t in tables for r in t.rows if r.n_wanted and "run" in _marks(t, r)]
    lines += short or ["None."]
    _write_text(out / "report.md", "\n".join(lines) + "\n")


def _check_root(root: Path, index: RunIndex, unreadable: Sequence[Path]) -> None:
    where = f" ({len(unreadable)} directories could not be read, e.g. {unreadable[0]})" if unreadable else ""
    if not index.completed and not index.evals and not index.problems:
        raise ConfigError(f"no results.json under {root}{where}: nothing to aggregate (run a sweep or "
                          "make reproduce-tables first)")
    if not index.completed and not index.evals:
        d, status, detail = index.problems[0]
        raise ConfigError(f"no completed run under {root}: all {len(index.problems)} runs read went wrong, e.g. "
                          f"{d} is {status}: {' '.join(detail.split())[:160] or 'no detail'} (rerun them; "
                          "see each run's train.log)")


def aggregate(tables: Sequence[str], profile: Profile, root: Path | None = None, out: Path | None = None,
              command: str = "", plots: bool = True, group_by: Sequence[str] | None = None,
              metrics: Sequence[str] | None = None, name: str = "adhoc", only_with_runs: bool = False) -> list[Table]:
    """Build and write the spec tables ``tables`` and the ad-hoc tables of the runs no spec claims.

    Every table is built before anything is written, and every file is written atomically: a bad key, a
    root without completed runs or an interruption never leaves a half-written table under ``out``.
    ``only_with_runs``: skip the spec tables none of whose runs exist (``--tables all``).

    Raises:
        ConfigError: the root is missing, unreadable, holds no results.json or only runs that went wrong; a
            ``group_by`` key or a metric no run has; the output directory cannot be written.
    """
    root = root or profile.root
    out = out or profile.out
    if not root.is_dir():
        raise ConfigError(f"runs directory {root} does not exist or is not a directory (run make reproduce-tables, "
                          "or pass --root)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ConfigError(f"runs directory {root} cannot be read (permission denied): fix its permissions or "
                          "pass another --root")
    index = index_runs(root)
    unreadable = unreadable_dirs(root)
    _check_root(root, index, unreadable)
    specs = [load_spec(t) for t in tables]
    dest = Destinations(spec_destinations([*specs, *(load_spec(n) for n in list_specs()
                                                    if n not in {s.name for s in specs})], profile, index))
    published = load_published()
    built = []
    for spec in specs:
        table = (build_tolerance_table(spec, profile, index) if spec.kind == "tolerance"
                 else build_rows_table(spec, profile, index, published))
        if only_with_runs and not any(v.split(":", 1)[0] == spec.name for v in dest.spec.values()):
            continue
        built.append(table)
        dest.built.add(spec.name)
    unclaimed = [r for r in [*index.completed.values(), *index.evals] if str(r["run_dir"]) not in dest.spec]
    if (group_by or metrics) and not unclaimed:
        raise ConfigError(f"--group-by / --metric shape the ad-hoc tables, but every completed run under {root} "
                          "belongs to a spec table (drop them, or point --root at your own runs)")
    if metrics:
        check_metrics(unclaimed, metrics)
    adhoc = build_adhoc(unclaimed, group_by)
    adhoc_tables = [build_adhoc_table(a, name, None if name == "adhoc" else name, metrics) for a in adhoc]
    for a, t in zip(adhoc, adhoc_tables, strict=True):
        for values, runs in a.rows:
            for r in runs:
                dest.adhoc[str(r["run_dir"])] = f"{t.spec.name}: {_row_name(a.keys, values)}"

    try:
        (out / "plots").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output directory {out}: {e.strerror}") from None
    for table in [*built, *adhoc_tables]:
        for suffix, text in (("md", to_markdown(table)), ("tex", to_latex(table)), ("csv", to_csv(table))):
            _write_text(out / f"{table.spec.name}.{suffix}", text)
        log.info("%s: %d rows -> %s", table.spec.name, len(table.rows), out / f"{table.spec.name}.md")
    if plots:
        from pcdeq.reproduction.adhoc_plots import plot_adhoc  # matplotlib is loaded only when plots are drawn
        from pcdeq.reproduction.plots import plot_table

        for table in built:
            plot_table(table.spec, profile, index, out / "plots")
        for a, table in zip(adhoc, adhoc_tables, strict=True):
            plot_adhoc(a, table.spec.name, adhoc_figures(a.group["task"], metrics), out / "plots")
    write_report(index, built, root, out, command, dest, unreadable)
    return [*built, *adhoc_tables]


EPILOG = """\
Spec tables: the paper's tables (experiments/*.yaml), built from the runs they name.

Ad-hoc tables: every completed run (or eval.py evaluation) under --root that no spec names goes into a table
of its own. Runs are separated by task, family, dataset and model; within each, a row is one configuration:
the config keys whose values differ between the runs (read from each run's overrides and
config_resolved.yaml; the seed and where-it-ran keys such as paths.* excluded; a key that only restates
another is dropped), one column per key, rows sorted by them (numerically for numbers). Statistics are the
mean, sample std and n over the runs of a row (its seeds). Evaluations vary by their solver.* settings.
A numeric key gets a plot of each figure against it (log axis when its values span decades); every table
gets test accuracy against epoch from the CSV logs. report.md lists every run read and where it went.

Example: python train.py -m model=pcdeq_linear dataset=digits model.activation=tanh,sigmoid seed=0,1 \\
             hydra.sweep.dir=multirun/adhoc
         python -m pcdeq.aggregate --root multirun/adhoc      # tables in multirun/adhoc/tables
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcdeq.aggregate", description=__doc__.splitlines()[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="runs directory (default: the profile's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: <root>/tables with --root, else the profile's)")
    parser.add_argument("--profile", default="full", help="experiments/profiles/<name>.yaml (full, smoke)")
    parser.add_argument("--tables", default="all",
                        help="comma-separated spec table names, or all (default: the specs that have runs)")
    parser.add_argument("--group-by", default=None,
                        help="ad-hoc rows by these dotted config keys (e.g. solver.fwd_tol,model.channels) "
                             "instead of the inferred ones")
    parser.add_argument("--metric", default=None,
                        help="ad-hoc statistic columns: final figures of results.json (e.g. test/fwd_iters, "
                             "train/epoch_s) instead of accuracy, params, iterations and s / epoch")
    parser.add_argument("--name", default="adhoc", help="ad-hoc tables' title and file-name prefix (default adhoc)")
    parser.add_argument("--no-plots", action="store_true", help="tables and report only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[aggregate] %(message)s")
    command = "python -m pcdeq.aggregate " + " ".join(sys.argv[1:] if argv is None else argv)

    def keys(text: str | None) -> list[str] | None:
        return [k.strip() for k in text.split(",") if k.strip()] if text else None

    out = args.out if args.out is not None or args.root is None else args.root / "tables"
    try:
        every = args.tables == "all"
        tables = list_specs() if every else [t for t in args.tables.split(",") if t]
        aggregate(tables, load_profile(args.profile), args.root, out, command.strip(), not args.no_plots,
                  keys(args.group_by), keys(args.metric), args.name, only_with_runs=every)
    except DiskFullError as e:  # the previous tables are still whole (atomic writes); say where else they can go
        fix = "free space on that filesystem, or write the tables elsewhere with --out DIR, then run the command again"
        print(f"error: {e.with_fix(fix)}", file=sys.stderr)
        return 2
    except PcdeqUserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

