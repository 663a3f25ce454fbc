"""The aggregator's plots (matplotlib, PNG), drawn from results.json and each run's ``csv/metrics.csv``.

* rows tables: test accuracy against epoch (mean over seeds; pcDEQ solid, monDEQ dashed) and the forward
  residual against iteration of each row's trained seed-0 model (the last test batch);
* tolerance tables: accuracy and forward iterations against the tolerance, training at it (solid) and
  evaluating one trained model at it (dashed).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from pcdeq.reproduction.plan import RunIndex, eval_jobs, find_eval, train_jobs  # noqa: E402
from pcdeq.reproduction.specs import Profile, TableSpec  # noqa: E402
from pcdeq.results import atomic_write  # noqa: E402


def save_png(fig: plt.Figure, path: Path) -> None:
    """Write a figure atomically: an interrupted or failed write leaves the previous PNG in place."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def _epoch_curve(run_dir: Path, key: str = "test/acc") -> dict[int, float]:
    """epoch -> value of ``key`` from a run's CSV logs (empty when there are none or the column is missing).

    A resumed run logged its earlier attempts to ``csv_part<k>/`` and the last one to ``csv/``: read in that
    order, a later attempt's value for an epoch replaces an earlier one. Only trained epochs count: the final
    test after the last epoch is logged one epoch further on (Lightning's epoch counter has moved past it) and
    would otherwise read as an extra epoch.
    """
    parts = sorted(run_dir.glob("csv_part*/metrics.csv"), key=lambda p: int(p.parent.name[8:] or 0))
    curve: dict[int, float] = {}
    for path in [*parts, run_dir / "csv" / "metrics.csv"]:
        if not path.is_file():
            continue
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch") not in (None, "")]
        trained = {r["epoch"] for r in rows if any(v not in (None, "") for k, v in r.items() if k.startswith("train/"))}
        for row in rows:
            if row.get(key) not in (None, "") and (row["epoch"] in trained or not trained):
                curve[int(float(row["epoch"])) + 1] = float(row[key])
    return curve


def _style(runs: list[dict]) -> str:
    return "--" if runs and runs[0].get("family") == "mondeq" else "-"


def plot_rows(spec: TableSpec, profile: Profile, index: RunIndex, out: Path) -> list[Path]:
    """Accuracy against epoch and residual against iteration for a rows table; returns the files written."""
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fig_r, ax_r = plt.subplots(figsize=(7, 4.5))
    drawn = drawn_r = 0
    for row in spec.rows:
        runs = [index.completed[j.key] for _, j in train_jobs(spec, profile, row=row) if j.key in index.completed]
        if not runs:
            continue
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for r in runs:
            for epoch, acc in _epoch_curve(Path(r["run_dir"])).items():
                per_epoch[epoch].append(100 * acc)
        if per_epoch:
            epochs = sorted(per_epoch)
            ax.plot(epochs, [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs], _style(runs), label=row.label)
            drawn += 1
        history = (runs[0].get("residual_history") or [[]])[0]
        if history:
            ax_r.semilogy(range(1, len(history) + 1), [max(h, 1e-12) for h in history], _style(runs) + "o",
                          markersize=3, label=row.label)
            drawn_r += 1
    for f, a, n, name, xlabel, ylabel in (
            (fig, ax, drawn, "accuracy_vs_epoch", "epoch", "test accuracy (%), mean over seeds"),
            (fig_r, ax_r, drawn_r, "residual_vs_iteration", "forward iteration", "stopping residual")):
        if n:
            a.set_xlabel(xlabel)
            a.set_ylabel(ylabel)
            a.set_title(f"{spec.title.split(':')[0]}: {ylabel.split(',')[0]} (pcDEQ solid, monDEQ dashed)", fontsize=9)
            a.grid(alpha=0.3)
            a.legend(fontsize=7, ncol=2)
            path = out / f"{spec.name}_{name}.png"
            f.tight_layout()
            save_png(f, path)
            written.append(path)
        plt.close(f)
    return written


def plot_tolerance(spec: TableSpec, profile: Profile, index: RunIndex, out: Path) -> list[Path]:
    """Accuracy and forward iterations against the tolerance, per row, training and evaluation."""
    fig, (ax_acc, ax_it) = plt.subplots(1, 2, figsize=(11, 4.5))
    evals, _ = eval_jobs(spec, profile, index)
    drawn = 0
    for i, row in enumerate(spec.rows):
        color = f"C{i}"
        jobs = train_jobs(spec, profile, row=row)
        per_value = len(jobs) // max(1, len(row.sweep_values))
        train_pts, eval_pts = [], []
        for k, value in enumerate(row.sweep_values):
            runs = [index.completed[j.key] for _, j in jobs[k * per_value:(k + 1) * per_value]
                    if j.key in index.completed]
            if runs:
                train_pts.append((value, _mean(runs, "test/acc"), _mean(runs, "fwd_iters")))
            for r, e in evals:
                if r == row and dict(e.solver) == {key.split(".", 1)[1]: value for key in row.sweep_keys}:
                    res = find_eval(index, e)
                    if res is not None:
                        eval_pts.append((value, 100 * float(res["test/acc"]), float(res["test/fwd_iters"])))
        for pts, style, what in ((train_pts, "-o", "train"), (eval_pts, "--x", "eval")):
            if pts:
                xs = [p[0] for p in pts]
                ax_acc.semilogx(xs, [p[1] for p in pts], style, color=color, label=f"{row.label} ({what})")
                ax_it.semilogx(xs, [p[2] for p in pts], style, color=color, label=f"{row.label} ({what})")
                drawn += 1
    if not drawn:
        plt.close(fig)
        return []
    for a, ylabel in ((ax_acc, "test accuracy (%)"), (ax_it, "forward iterations per batch")):
        a.set_xlabel("forward tolerance")
        a.set_ylabel(ylabel)
        a.invert_xaxis()
        a.grid(alpha=0.3)
    ax_acc.set_title("train at the tolerance (solid), evaluate a trained model at it (dashed)", fontsize=9)
    ax_it.legend(fontsize=6, ncol=1)
    fig.tight_layout()
    path = out / f"{spec.name}.png"
    save_png(fig, path)
    plt.close(fig)
    return [path]


def _mean(runs: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in runs if r.get(key) is not None]
    scale = 100.0 if key == "test/acc" else 1.0
    return scale * sum(vals) / len(vals) if vals else math.nan


def plot_table(spec: TableSpec, profile: Profile, index: RunIndex, out: Path) -> list[Path]:
    """The plots of one table (none when it has no runs yet)."""
    return plot_tolerance(spec, profile, index, out) if spec.kind == "tolerance" else plot_rows(spec, profile,
                                                                                              index, out)
