"""Best-trial selection, test-set metrics, confusion matrix, leaderboard (no Ray, no MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: plots are files for MLflow, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import classification_report, confusion_matrix  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from components.augment import build_eval_transform  # noqa: E402
from components.data.dataset import ImageDataset  # noqa: E402
from components.errors import UserError  # noqa: E402
from components.evaluation.paired_tests import f1_interval  # noqa: E402
from components.training.loop import predict  # noqa: E402
from components.training.metrics import (  # noqa: E402
    classification_metrics,
    resolve_average,
    thin_classes,
)


class NoUsableTrialError(UserError, RuntimeError):
    """No trial of the sweep produced a checkpoint (the run fails; the trials' errors say
    why)."""


def select_best_trial(trials):
    """Highest best-epoch val F1; ties go to the lower val loss at that epoch, then to the
    trial id (deterministic). Trials without a checkpoint cannot be chosen."""
    usable = [t for t in trials if t.best_val_f1 is not None and t.checkpoint_path]
    if not usable:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)[:2000]
        raise NoUsableTrialError(f"no trial produced a checkpoint ({len(trials)} trials). "
                                 f"{errors}")
    return min(usable, key=lambda t: (-t.best_val_f1, t.best_val_loss or float("inf"),
                                      t.trial_id))


@dataclass
class TestReport:
    metrics: dict[str, float]          # accuracy, precision, recall, f1
    average: str                       # the F1 averaging actually used
    predictions: pd.DataFrame          # path, label, prediction, probability
    confusion: np.ndarray
    report: str                        # scikit-learn's classification report
    # the 95% bootstrap interval of the test F1 over images: the test split is one draw
    f1_interval: tuple[float, float] = (0.0, 0.0)
    warnings: tuple[str, ...] = ()     # classes the test split lacks or holds few images of


def evaluate_on_test(model: torch.nn.Module, paths: list[str], labels: list[int],
                     classes: list[str], preprocessing: dict, average: str = "auto",
                     batch_size: int = 256, decoded: tuple = ()) -> TestReport:
    """`decoded`: the sweep's stores of decoded images (read instead of decoding the files)."""
    from components.data.preprocessed import DecodedLookup

    c, size = preprocessing["channels"], preprocessing["image_size"]
    ds = ImageDataset(paths, labels, c, size,
                      build_eval_transform(c, preprocessing["mean"], preprocessing["std"]),
                      decoded=DecodedLookup(decoded, size, c) if decoded else None)
    idx, y, probs, _ = predict(model, DataLoader(ds, batch_size=batch_size), torch.device("cpu"))
    order = idx.argsort()
    y, probs = y[order].numpy(), probs[order].numpy()
    pred = probs.argmax(1)
    n = len(classes)
    avg = resolve_average(average, n)
    metrics = classification_metrics(y.tolist(), pred.tolist(), n, avg)
    frame = pd.DataFrame({
        "path": paths,
        "label": [classes[i] for i in y],
        "prediction": [classes[i] for i in pred],
        "probability": probs.max(1).round(6),
    })
    return TestReport(
        metrics=metrics, average=avg, predictions=frame,
        confusion=confusion_matrix(y, pred, labels=list(range(n))),
        report=classification_report(y, pred, labels=list(range(n)), target_names=classes,
                                     digits=4, zero_division=0),
        f1_interval=f1_interval(y, pred, n, avg), warnings=tuple(thin_classes(y, n, classes)))


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], title: str = "Test set"):
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(3.5, 0.6 * n + 1.5)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: confusion matrix ({cm.sum()} images)")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black", fontsize=8)
    fig.tight_layout()
    return fig


def leaderboard(trials) -> pd.DataFrame:
    """One row per trial, best first; hyperparameters as columns."""
    rows = []
    for t in trials:
        rows.append({"trial_id": t.trial_id, "status": t.status, "best_val_f1": t.best_val_f1,
                     "best_val_loss": t.best_val_loss, "best_epoch": t.best_epoch,
                     "epochs": t.epochs, **t.params, "mlflow_run_id": t.run_id,
                     "checkpoint": t.checkpoint_path})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values(["best_val_f1", "best_val_loss", "trial_id"],
                        ascending=[False, True, True], na_position="last")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def plot_trial_curves(trials, metric: str = "val_f1"):
    """Every trial's per-epoch validation curve on one chart: the search at a glance."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = 0
    for t in trials:
        values = t.history.get(metric)
        if values:
            plotted += 1
            label = " ".join(f"{v:.2g}" if isinstance(v, float) else str(v)
                             for v in t.params.values()) or t.trial_id
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label[:70])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    keys = ", ".join(k.split(".")[-1] for k in (trials[0].params if trials else {}))
    ax.set_title(f"{metric} per epoch, all trials" + (f"\n({keys})" if keys else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    if not plotted:   # e.g. k-fold CV: a trial reports its folds' mean, not epochs
        ax.text(0.5, 0.5, f"no per-epoch {metric} in the trials' results", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
    elif plotted <= 16:
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig
