import pytest

from components.training.metrics import classification_metrics, resolve_average


def test_macro_metrics_match_hand_computed_values():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    # class 0: tp=1 fp=1 fn=1 -> p=1/2 r=1/2 f1=1/2
    # class 1: tp=2 fp=1 fn=0 -> p=2/3 r=1   f1=4/5
    # class 2: tp=1 fp=0 fn=1 -> p=1   r=1/2 f1=2/3
    m = classification_metrics(y_true, y_pred, 3, "macro")
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_binary_f1_uses_the_second_class_as_positive():
    y_true = [1, 1, 1, 0, 0]
    y_pred = [1, 0, 1, 1, 0]
    # positive=1: tp=2 fp=1 fn=1 -> p=r=f1=2/3
    m = classification_metrics(y_true, y_pred, 2, "auto")
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3)


def test_weighted_and_a_class_neither_present_nor_predicted_is_not_scored():
    # class 2 never appears in truth or prediction: scikit-learn's default label set leaves
    # it out (the label set promote uses too), instead of a 0 that would drag macro F1 down
    m = classification_metrics([0, 1], [0, 1], 3, "macro")
    assert m["f1"] == pytest.approx(1.0)
    # a class predicted but absent from the truth is scored (its F1 is 0)
    m = classification_metrics([0, 1, 1], [0, 1, 2], 3, "macro")
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    w = classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], 2, "weighted")
    # class 0: p=1 r=2/3 f1=0.8 (support 3); class 1: p=1/2 r=1 f1=2/3 (support 1)
    assert w["f1"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)


def test_average_resolution():
    assert resolve_average("auto", 2) == "binary"
    assert resolve_average("auto", 10) == "macro"
    with pytest.raises(ValueError, match="2 classes"):
        resolve_average("binary", 3)


@pytest.mark.parametrize("num_classes,average", [(2, "binary"), (2, "macro"), (2, "weighted"),
                                                 (5, "macro"), (5, "weighted")])
def test_metrics_equal_scikit_learns(num_classes, average):
    """Workers compute the metrics without scikit-learn; the numbers must stay its numbers
    with its default label set (the classes in truth or prediction; zero_division=0)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(num_classes)
    for trial in range(30):
        n = int(rng.integers(1, 40))
        # some draws use only part of the classes: empty rows and columns of the confusion
        high = int(rng.integers(1, num_classes + 1))
        y_true = rng.integers(0, high, n).tolist()
        y_pred = rng.integers(0, num_classes, n).tolist() if trial % 3 else list(y_true)
        m = classification_metrics(y_true, y_pred, num_classes, average)
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=None,   # scikit-learn's default: the classes present
            average=average, pos_label=1, zero_division=0)
        assert m == pytest.approx({"accuracy": accuracy_score(y_true, y_pred),
                                   "precision": p, "recall": r, "f1": f}), (y_true, y_pred)


@pytest.mark.parametrize("average,num_classes", [("macro", 4), ("weighted", 4), ("binary", 2)])
def test_f1_interval_is_the_percentile_bootstrap_written_out(average, num_classes):
    """Against an independent loop: scikit-learn's f1_score on each resample of the images
    (numpy's generator, rows of indices), the label set fixed to the full sample's."""
    import numpy as np
    from sklearn.metrics import f1_score

    from components.evaluation.paired_tests import f1_interval

    rng = np.random.default_rng(7)
    y = rng.integers(0, num_classes, 150)
    p = np.where(rng.random(150) < 0.8, y, rng.integers(0, num_classes, 150))
    low, high = f1_interval(y, p, num_classes, average, resamples=400, seed=3)
    idx = np.random.default_rng(3).integers(0, 150, size=(400, 150))
    labels = [1] if average == "binary" else sorted(set(y) | set(p))
    values = [f1_score(y[i], p[i], labels=labels, average=average, zero_division=0)
              for i in idx]
    assert (low, high) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])))
    point = f1_score(y, p, labels=labels, average=average, zero_division=0)
    assert low < point < high


def test_thin_classes_warns_on_a_missing_or_small_class():
    from components.training.metrics import thin_classes

    assert thin_classes([0] * 30 + [1] * 30, 2, ["a", "b"]) == []
    lines = thin_classes([0] * 30 + [1] * 5, 3, ["a", "b", "c"])
    assert "no image of c" in lines[0] and "b (5)" in lines[1]
