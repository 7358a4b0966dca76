"""Where the best model goes wrong on the test split: per-class metrics and a gallery of
misclassified images (pure matplotlib and scikit-learn, no MLflow)."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # headless: plots are files for MLflow, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_fscore_support  # noqa: E402

GALLERY_LIMIT = 24


def per_class_metrics(predictions: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per class, in label order: precision, recall, F1, support (true images), from
    the test predictions (columns `label`, `prediction` as class names)."""
    p, r, f, n = precision_recall_fscore_support(
        predictions["label"].astype(str), predictions["prediction"].astype(str),
        labels=[str(c) for c in classes], zero_division=0)
    return pd.DataFrame({"class": [str(c) for c in classes], "precision": p.round(6),
                         "recall": r.round(6), "f1": f.round(6), "support": n})


def plot_per_class_metrics(table: pd.DataFrame):
    """Grouped bars of precision, recall and F1 per class: the weak classes at a glance."""
    n = len(table)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * n + 2), 3.6))
    for i, key in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * 0.27, table[key], width=0.27, label=key)
    ax.set_xticks(x, [f"{c}\n(n={s})" for c, s in zip(table["class"], table["support"])],
                  fontsize=8, rotation=45 if n > 8 else 0)
    ax.set_ylim(0, 1.18)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax.set_title("per-class precision, recall, F1 (test set)", fontsize=10)
    fig.tight_layout()
    return fig


def misclassified(predictions: pd.DataFrame, limit: int = GALLERY_LIMIT) -> pd.DataFrame:
    """The wrong test predictions, the most confident mistakes first, at most `limit`."""
    wrong = predictions[predictions["label"].astype(str) != predictions["prediction"].astype(str)]
    return wrong.sort_values(["probability", "path"], ascending=[False, True]).head(limit)


def plot_misclassified(predictions: pd.DataFrame, load: Callable[[str], np.ndarray],
                       limit: int = GALLERY_LIMIT, cols: int = 6):
    """A grid of misclassified test images (as `load(path)` returns them: HxWxC uint8), each
    titled with its true class, the predicted class and its probability, and the file. A
    figure saying so when the model made no mistake, so the artifact is always there."""
    rows_df = misclassified(predictions, limit)
    total = int((predictions["label"].astype(str)
                 != predictions["prediction"].astype(str)).sum())
    if rows_df.empty:
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassified test images (of {len(predictions)})",
                ha="center", va="center", fontsize=10)
        return fig
    cols = min(cols, len(rows_df))
    grid_rows = -(-len(rows_df) // cols)
    # At least as wide as its title: a gallery of 1-3 images was narrower and cut it off.
    fig, axes = plt.subplots(grid_rows, cols,
                             figsize=(max(cols * 1.9, 6.0), grid_rows * 2.4 + 0.6),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows_df.itertuples(index=False)):
        image = load(row.path)
        grey = image.ndim == 2 or image.shape[2] == 1
        ax.imshow(image[:, :, 0] if image.ndim == 3 and grey else image,
                  cmap="gray" if grey else None, vmin=0, vmax=255)
        name = "/".join(str(row.path).rsplit("/", 2)[-2:])  # <class folder>/<file>
        ax.set_title(f"true {row.label}\npred {row.prediction} ({row.probability:.2f})\n"
                     f"{name if len(name) <= 24 else '...' + name[-21:]}", fontsize=7)
    fig.suptitle(f"misclassified test images: {len(rows_df)} of {total} shown\n"
                 f"most confident first, of {len(predictions)} test images", fontsize=9)
    return fig
