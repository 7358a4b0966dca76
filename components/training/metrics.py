"""Classification metrics with scikit-learn (pure: no torch, no Ray)."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, precision_recall_fscore_support

AVERAGES = ("auto", "binary", "macro", "weighted")


def check_average(average: str, num_classes: int) -> str:
    """The F1 averaging `average` resolves to for `num_classes` classes, or a `ConfigError`
    naming evaluation.average. `auto` is binary F1 (positive class = the second class) for 2
    classes, macro otherwise. Called once the data's classes are known, before tuning starts."""
    problem = None
    if average not in AVERAGES:
        problem = (f"evaluation.average={average} is not valid; choose one of: "
                   f"{', '.join(AVERAGES)}")
    elif average == "binary" and num_classes != 2:
        problem = (f"evaluation.average=binary needs exactly 2 classes; the data has "
                   f"{num_classes} (use macro or weighted, or auto)")
    if problem:
        # Imported here: components.config pulls in torch (the model registry) and metrics
        # stays importable without it.
        from components.config import ConfigError

        raise ConfigError(problem)
    if average == "auto":
        return "binary" if num_classes == 2 else "macro"
    return average


# The name the metric code uses; one rule, so a trial can never accept what the check refuses.
resolve_average = check_average


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
