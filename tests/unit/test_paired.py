"""The paired decision behind `promote`, against independent computations: scipy's exact
binomial test for McNemar, a plain bootstrap loop with scikit-learn's f1_score, and the power
floor found by brute force."""

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from components.evaluation.paired import (
    decide,
    detectable_difference,
    detectable_images,
    mcnemar_exact,
    power_line,
)


def _models(n, k, acc_a, acc_b, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    a = np.where(rng.random(n) < acc_a, y, rng.integers(0, k, n))
    b = np.where(rng.random(n) < acc_b, y, rng.integers(0, k, n))
    return y, a, b


def _plain_bootstrap(y, a, b, k, average, resamples, seed, confidence):
    """The textbook paired bootstrap, one resample at a time: the same drawn images for both
    models, scikit-learn's F1 over the classes of the images and predictions (0/0 = 0),
    percentile interval."""
    rng = np.random.default_rng(seed)
    labels = [1] if average == "binary" else sorted(set(y) | set(a) | set(b))
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, len(y), len(y))
        kw = dict(labels=labels, average="macro" if average == "binary" else average,
                  zero_division=0)
        diffs.append(f1_score(y[i], a[i], **kw) - f1_score(y[i], b[i], **kw))
    tail = (1 - confidence) / 2 * 100
    return np.percentile(diffs, [tail, 100 - tail])


@pytest.mark.parametrize("b,c", [(0, 0), (3, 2), (8, 4), (0, 6), (6, 0), (17, 40), (250, 190),
                                 (1, 1500)])
def test_mcnemar_is_scipys_exact_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("n,k,average,confidence", [(270, 10, "macro", 0.95),
                                                     (120, 2, "binary", 0.9),
                                                     (200, 4, "weighted", 0.99)])
def test_interval_and_table_match_an_independent_computation(n, k, average, confidence):
    y, a, b = _models(n, k, 0.93, 0.9, seed=n)
    d = decide(y, a, b, k, average, confidence=confidence, resamples=1000, seed=7)
    low, high = _plain_bootstrap(y, a, b, k, average, 1000, 7, confidence)
    assert (d.ci_low, d.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    kw = dict(labels=[1] if average == "binary" else list(range(k)),
              average="macro" if average == "binary" else average, zero_division=0)
    assert d.f1_challenger == pytest.approx(f1_score(y, a, **kw))
    assert d.difference == pytest.approx(f1_score(y, a, **kw) - f1_score(y, b, **kw))
    right_a, right_b = a == y, b == y
    assert (d.both_right, d.challenger_only, d.champion_only, d.both_wrong) == (
        np.sum(right_a & right_b), np.sum(right_a & ~right_b), np.sum(~right_a & right_b),
        np.sum(~right_a & ~right_b))
    assert d.mcnemar_p == pytest.approx(binomtest(d.challenger_only, d.challenger_only
                                                  + d.champion_only, 0.5).pvalue)
    assert d.n == n and d.resamples == 1000 and len(d.differences) == 1000


def test_a_class_no_image_has_and_no_model_predicts_does_not_shrink_the_difference():
    """Images gathered for `promote --data` may lack a class both models know: macro F1 over
    the classes that occur (scikit-learn's default labels), not 0/0 = 0 for the others."""
    y, a, b = _models(300, 3, 0.95, 0.8, seed=3)      # classes 0-2 only
    d = decide(y, a, b, 5, "macro", resamples=1000, seed=1)   # the models know 5
    assert d.f1_challenger == pytest.approx(f1_score(y, a, average="macro"))
    assert d.difference == pytest.approx(f1_score(y, a, average="macro")
                                         - f1_score(y, b, average="macro"))
    low, high = _plain_bootstrap(y, a, b, 5, "macro", 1000, 1, 0.95)
    assert (d.ci_low, d.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    # a class a model predicts though no image has it counts (F1 0), as scikit-learn counts it
    a2 = a.copy()
    a2[:5] = 4
    d2 = decide(y, a2, b, 5, "macro", resamples=200, seed=1)
    assert d2.f1_challenger == pytest.approx(f1_score(y, a2, average="macro"))


def test_power_floor_is_the_fewest_one_sided_images_that_can_be_significant():
    for confidence in (0.8, 0.9, 0.95, 0.99, 0.999):
        alpha = 1 - confidence
        brute = next(k for k in range(1, 100) if binomtest(k, k, 0.5).pvalue < alpha)
        assert detectable_images(confidence) == brute
    assert detectable_images(0.95) == 6
    assert detectable_difference(270, 0.95) == pytest.approx(6 / 270)
    assert power_line(270, 0.95) == ("270 images: differences below about 0.022 (6 images) "
                                     "cannot be told from noise at 95% confidence")


def test_the_rule():
    # Two equally good models: the interval straddles 0, nothing is promoted.
    y, a, b = _models(270, 10, 0.96, 0.96, seed=1)
    same = decide(y, a, b, 10, "macro")
    assert same.ci_low < 0 < same.ci_high and not same.promote
    assert "not shown to be better" in same.reason and same.rule == "superiority"
    # Clearly better on 600 images: promoted, and McNemar agrees.
    y, a, b = _models(600, 10, 0.97, 0.80, seed=2)
    better = decide(y, a, b, 10, "macro")
    assert better.promote and better.ci_low > 0 and better.mcnemar_p < 1e-6
    assert "the challenger is better" in better.reason
    # ... but not by a required gain larger than the whole interval's lower bound.
    picky = decide(y, a, b, 10, "macro", min_gain=better.ci_low + 0.001)
    assert not picky.promote and picky.threshold == pytest.approx(better.ci_low + 0.001)
    # Non-inferiority: a slightly worse challenger passes a margin, not superiority.
    y, a, b = _models(2000, 5, 0.945, 0.95, seed=3)
    assert not decide(y, a, b, 5, "macro").promote
    ni = decide(y, a, b, 5, "macro", non_inferior=0.03)
    assert ni.promote and ni.rule == "non-inferiority" and ni.threshold == -0.03
    assert "non-inferiority, not superiority" in ni.reason
    assert not decide(y, a, b, 5, "macro", non_inferior=0.0001).promote
    # Forced: promoted, and it says it went against the evidence.
    forced = decide(y, a, b, 5, "macro", force=True)
    assert forced.promote and forced.rule == "forced" and "against the evidence" in forced.reason


def test_seeded_and_identical_models():
    y, a, b = _models(300, 3, 0.9, 0.88, seed=4)
    one, two = decide(y, a, b, 3, seed=11), decide(y, a, b, 3, seed=11)
    assert (one.ci_low, one.ci_high) == (two.ci_low, two.ci_high)
    assert (one.ci_low, one.ci_high) != (decide(y, a, b, 3, seed=12).ci_low,
                                         decide(y, a, b, 3, seed=12).ci_high)
    same = decide(y, a, a, 3)
    assert (same.ci_low, same.ci_high, same.mcnemar_p) == (0.0, 0.0, 1.0) and not same.promote


def test_bad_inputs():
    with pytest.raises(ValueError, match="same non-zero number"):
        decide([0, 1], [0], [1], 2)
    with pytest.raises(ValueError, match="confidence"):
        decide([0, 1], [0, 1], [1, 0], 2, confidence=1.0)
