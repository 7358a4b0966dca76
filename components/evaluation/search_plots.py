"""The search at a glance: mean best val F1 over the searched axes (pure matplotlib, no MLflow).

Input is the leaderboard (one row per trial, hyperparameters as columns, `best_val_f1`) and
which searched keys are categorical (grid/choice) or continuous (uniform, loguniform, ...).
A trial whose axis did not apply (a conditional `when:` axis) shows that value as "n/a".
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: plots are files for MLflow, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

METRIC = "best_val_f1"
PANEL_KEY = "model.name"
MISSING = "n/a"


def _text(series: pd.Series) -> pd.Series:
    return series.astype(object).where(series.notna(), MISSING).astype(str)


def _scored(board: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The trials that have a val F1 (failed ones have none), with the given keys present."""
    if board.empty or METRIC not in board:
        return pd.DataFrame(columns=[*keys, METRIC])
    df = board[board[METRIC].notna()].copy()
    for k in keys:
        if k not in df:
            df[k] = np.nan
    return df


def _varied(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """`keys` that take more than one value, most values first (ties: search order)."""
    counts = {k: _text(df[k]).nunique() for k in keys if k in df}
    return sorted((k for k, n in counts.items() if n > 1), key=lambda k: -counts[k])


def heatmap_layout(board: pd.DataFrame, categorical: list[str]):
    """(panel key or None, row key or None, column key) of the heatmap, or None when no
    categorical axis varies. Panels split by model when the model is searched and another
    axis is left to draw; columns take the most varied axis, rows the next one."""
    varied = _varied(_scored(board, categorical), categorical)
    if not varied:
        return None
    panel = PANEL_KEY if PANEL_KEY in varied and len(varied) > 1 else None
    axes = [k for k in varied if k != panel][:2]
    return panel, (axes[1] if len(axes) > 1 else None), axes[0]


def _labels(series: pd.Series) -> list[str]:
    """The values of an axis as tick labels, numbers in numeric order (8 < 16), then text."""
    def order(label: str):
        try:
            return (0, float(label), label)
        except ValueError:
            return (1, 0.0, label)
    return sorted(_text(series).unique(), key=order)


def _draw_panel(ax, df: pd.DataFrame, rows: list[str], cols: list[str], rows_key, cols_key,
                vmin, vmax, ylabel: str | None):
    sums = np.zeros((len(rows), len(cols)))
    counts = np.zeros_like(sums, dtype=int)
    r_vals = _text(df[rows_key]) if rows_key else pd.Series("", df.index)
    c_vals = _text(df[cols_key])
    for r, c, v in zip(r_vals, c_vals, df[METRIC]):
        i, j = rows.index(r), cols.index(c)
        sums[i, j] += v
        counts[i, j] += 1
    with np.errstate(invalid="ignore"):
        grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=vmin, vmax=vmax,
                      aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                text = f"{grid[i, j]:.3f}\nn={counts[i, j]}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="black" if grid[i, j] > (vmin + vmax) / 2 else "white")
    ax.set_xticks(range(len(cols)), cols, rotation=30 if len(cols) > 3 else 0, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.tick_params(labelleft=bool(ylabel))  # the panels share their rows: labelled once
    ax.set_xlabel(cols_key)
    if ylabel:
        ax.set_ylabel(ylabel)
    return image


def plot_comparison_heatmap(board: pd.DataFrame, categorical: list[str]):
    """Mean best val F1 of the trials in each cell (`n=` their number: a mean, not the
    maximum, so a cell with more trials is not favoured) over the two most varied categorical
    axes, one panel per model when the model is searched; one row when a single axis varies.
    None when no categorical axis varies (nothing to compare)."""
    layout = heatmap_layout(board, categorical)
    if layout is None:
        return None
    panel, rows_key, cols_key = layout
    df = _scored(board, categorical)
    groups = list(df.groupby(_text(df[panel]))) if panel else [("", df)]
    rows, cols = (_labels(df[rows_key]) if rows_key else [""]), _labels(df[cols_key])
    means = df.groupby([_text(df[k]) for k in (panel, rows_key, cols_key) if k])[METRIC].mean()
    vmin, vmax = float(means.min()), float(means.max())
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    width = max(3.5, 0.9 * len(cols) + 2)
    fig, axes = plt.subplots(1, len(groups), figsize=(width * len(groups) + 1,
                                                     max(2.2, 0.6 * len(rows) + 1.6)),
                             squeeze=False, layout="constrained")
    for n, (ax, (name, part)) in enumerate(zip(axes[0], groups)):
        image = _draw_panel(ax, part, rows, cols, rows_key, cols_key, vmin, vmax,
                            ylabel=rows_key if n == 0 else None)
        if panel:
            ax.set_title(f"{panel} = {name}", fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), label="mean best val F1", shrink=0.9)
    fig.suptitle(f"mean best val F1 by {cols_key}" + (f" x {rows_key}" if rows_key else ""),
                 fontsize=10)
    return fig


def plot_continuous_axes(board: pd.DataFrame, continuous: list[str],
                         log_keys: tuple[str, ...] = (), hue: str | None = None):
    """One scatter per continuous axis: its value against best val F1, coloured by `hue`
    (e.g. the searched model) when given. None when there is no continuous axis with values."""
    df = _scored(board, [*continuous, *([hue] if hue else [])])
    keys = [k for k in continuous if pd.to_numeric(df[k], errors="coerce").notna().any()]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys) + 0.6, 3.4), squeeze=False,
                             sharey=True)
    groups = list(df.groupby(_text(df[hue]))) if hue else [("", df)]
    for ax, key in zip(axes[0], keys):
        for name, part in groups:
            ax.scatter(pd.to_numeric(part[key], errors="coerce"), part[METRIC], s=24,
                       alpha=0.8, label=name or None)
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best val F1")
    if hue:
        axes[0][-1].legend(title=hue, fontsize=7, title_fontsize=7)
    fig.suptitle("continuous hyperparameters against best val F1", fontsize=10)
    fig.tight_layout()
    return fig
