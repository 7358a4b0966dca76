"""Classification metrics (pure numpy: no torch, no Ray).

The numbers are scikit-learn's `accuracy_score` and `precision_recall_fscore_support`
(zero_division=0), computed from per-class counts: every Train worker computes them each
epoch, and importing scikit-learn cost each worker about 1 s of its start-up. A unit test
holds them equal to scikit-learn's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def scored_labels(num_classes: int, average: str, *arrays) -> np.ndarray:
    """The classes an F1 averages over, one rule for validation, the test split and promote:
    the positive class (binary); otherwise every class that occurs among the labels or the
    predictions in `arrays`, scikit-learn's default `labels`. A class no image has and no
    model predicts would add 0/0 = 0 to a macro F1: a test split lacking a class (a separate
    data.test_path, images given to promote) would score lower for no fault of the model, and
    shrink the difference between two models."""
    if average == "binary":
        return np.array([1])
    present = np.unique(np.concatenate([np.asarray(v, dtype=np.int64).reshape(-1)
                                        for v in arrays] or [np.zeros(0, np.int64)]))
    return present[(present >= 0) & (present < num_classes)]


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
                           average: str = "auto") -> dict[str, float]:
    """accuracy, precision, recall, f1 over `scored_labels` (the classes that occur among the
    labels or predictions); 0/0 counts as 0, as scikit-learn warns."""
    average = resolve_average(average, num_classes)
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    labels = scored_labels(num_classes, average, t, p)
    tp = np.array([np.sum((t == k) & (p == k)) for k in labels], dtype=np.float64)
    predicted = np.array([np.sum(p == k) for k in labels], dtype=np.float64)
    actual = np.array([np.sum(t == k) for k in labels], dtype=np.float64)
    precision = _divide(tp, predicted)
    recall = _divide(tp, actual)
    f1 = _divide(2 * tp, predicted + actual)
    if average == "weighted":
        weights = actual
        if weights.sum() == 0:  # no true sample of any class: scikit-learn gives 0
            return {"accuracy": _accuracy(t, p), "precision": 0.0, "recall": 0.0, "f1": 0.0}
    else:  # macro (binary: the one positive class)
        weights = np.ones_like(actual)
    return {
        "accuracy": _accuracy(t, p),
        "precision": float(np.average(precision, weights=weights)),
        "recall": float(np.average(recall, weights=weights)),
        "f1": float(np.average(f1, weights=weights)),
    }


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _accuracy(t: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(t == p)) if len(t) else 0.0


def thin_classes(y_true: Sequence[int], num_classes: int, classes: Sequence[str],
                 few: int = 20) -> list[str]:
    """Warnings about a test split that cannot measure every class: one lacking a class (its
    F1 is then not part of the score) or holding fewer than `few` images of one (its F1 moves
    by 1/support per image)."""
    counts = np.bincount(np.asarray(y_true, dtype=np.int64).reshape(-1),
                         minlength=num_classes)
    missing = [classes[i] for i in range(num_classes) if counts[i] == 0]
    small = [f"{classes[i]} ({counts[i]})" for i in range(num_classes) if 0 < counts[i] < few]
    out = []
    if missing:
        out.append(f"the test split has no image of {', '.join(missing)}: F1 averages over "
                   f"the other classes only")
    if small:
        out.append(f"the test split has fewer than {few} images of {', '.join(small)}: "
                   f"their F1 is measured coarsely")
    return out
