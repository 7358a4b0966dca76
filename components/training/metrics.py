"""Classification metrics with scikit-learn (pure: no torch, no Ray)."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, precision_recall_fscore_support


def resolve_average(average: str, num_classes: int) -> str:
    """`auto` is binary F1 (positive class = the second class) for 2 classes, macro otherwise."""
    if average == "auto":
        return "binary" if num_classes == 2 else "macro"
    if average == "binary" and num_classes != 2:
        raise ValueError(f"binary F1 needs 2 classes, the data has {num_classes}")
    return average


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
                           average: str = "auto") -> dict[str, float]:
    """accuracy, precision, recall, f1. Every class counts, also one missing from this split's
    predictions (labels=range(num_classes)); 0/0 counts as 0, as scikit-learn warns."""
    average = resolve_average(average, num_classes)
    labels = list(range(num_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=None if average == "binary" else labels, average=average,
        pos_label=1, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
