"""Plots of the ad-hoc tables (matplotlib, PNG, written atomically).

* for every numeric varying key with at least two values: each statistic of the table against the key, one
  line per combination of the other keys, error bars the sample standard deviation over seeds, a log axis
  when the values span two decades or more;
* training tables: test accuracy against epoch (mean over seeds) for every row, from the runs' CSV logs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import pandas as pd  # noqa: E402

from pcdeq.reproduction.adhoc import AdhocTable, is_numeric, metric_value  # noqa: E402
from pcdeq.reproduction.plots import _epoch_curve, save_png  # noqa: E402


def spans_decades(values: Sequence[float]) -> bool:
    """Whether positive ``values`` cover a factor of 100 or more (then a log axis reads better)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def _points(table: AdhocTable, figures: dict[str, tuple[str, float]]) -> pd.DataFrame:
    """One row per run: the table's keys and every figure (scaled as in the table)."""
    records = []
    for values, runs in table.rows:
        for r in runs:
            rec: dict[str, object] = dict(zip(table.keys, values, strict=True))
            for column, (key, scale) in figures.items():
                v = metric_value(r, key)
                rec[column] = math.nan if v is None else v * scale
            records.append(rec)
    return pd.DataFrame.from_records(records)


def plot_against_key(table: AdhocTable, key: str, figures: dict[str, tuple[str, float]], path: Path) -> Path | None:
    """Every figure against the numeric ``key``; None when there is nothing to draw."""
    columns = [c for c in figures if figures[c][0] != "num_params"]
    frame = _points(table, figures)
    if frame.empty or not columns:
        return None
    frame[key] = pd.to_numeric(frame[key], errors="coerce")
    frame = frame.dropna(subset=[key])
    others = [k for k in table.keys if k != key]
    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        lines = frame.groupby(others, sort=False) if others else [((), frame)]
        for label, part in lines:
            stats = part.groupby(key)[column].agg(["mean", "std"]).sort_index()
            values = label if isinstance(label, tuple) else (label,)
            name = ", ".join(f"{k}={v}" for k, v in zip(others, values, strict=True))
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3,
                        label=name or None)
        if spans_decades(list(frame[key])):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        key_name, scale = figures[column]
        ax.set_ylabel(f"{key_name}{' in %' if scale == 100.0 else ''} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def plot_accuracy_vs_epoch(table: AdhocTable, path: Path) -> Path | None:
    """Test accuracy against epoch, one line per row (mean over its seeds); None without CSV logs."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for values, runs in table.rows:
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for r in runs:
            for epoch, acc in _epoch_curve(Path(str(r.get("run_dir")))).items():
                per_epoch[epoch].append(100 * acc)
        if per_epoch:
            epochs = sorted(per_epoch)
            label = ", ".join(f"{k}={v}" for k, v in zip(table.keys, values, strict=True)) or "all runs"
            ax.plot(epochs, [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs], "-o", label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def plot_adhoc(table: AdhocTable, name: str, figures: dict[str, tuple[str, float]], out: Path) -> list[Path]:
    """The plots of one ad-hoc table (file names start with ``name``); returns the files written."""
    written = []
    for key in table.keys:
        values = [v[table.keys.index(key)] for v, _ in table.rows]
        if is_numeric(values) and len(set(values)) > 1:
            p = plot_against_key(table, key, figures, out / f"{name}_vs_{key}.png")
            written += [p] if p else []
    if table.group.get("task") != "eval":
        p = plot_accuracy_vs_epoch(table, out / f"{name}_accuracy_vs_epoch.png")
        written += [p] if p else []
    return written
