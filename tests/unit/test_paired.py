"""The paired decision behind `promote`, against independent computations written out here:
scipy's exact binomial test for McNemar, scikit-learn's f1_score over every swap for the
permutation test, a plain bootstrap loop, and the floor's hypothetical challengers rebuilt with
scikit-learn."""

import hashlib
import json
import time

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from components.evaluation.paired import (
    TOO_CLOSE,
    decide,
    derive_seed,
    floor_line,
    mcnemar_exact,
    mcnemar_favours,
    min_images,
    min_images_line,
    permutation_p,
    plot_bootstrap,
)

FAST = dict(resamples=1000, permutations=2000)   # the floor grid: many decisions


def _models(n, k, acc_a, acc_b, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    a = np.where(rng.random(n) < acc_a, y, rng.integers(0, k, n))
    b = np.where(rng.random(n) < acc_b, y, rng.integers(0, k, n))
    return y, a, b


def _labels(y, a, b, average):
    return [1] if average == "binary" else sorted(set(y) | set(a) | set(b))


def _f1(y, p, labels, average):
    return f1_score(y, p, labels=labels, average="macro" if average == "binary" else average,
                    zero_division=0)


def _plain_bootstrap(y, a, b, k, average, resamples, seed, confidence):
    """The textbook paired bootstrap, one resample at a time: the same drawn images for both
    models, scikit-learn's F1 over the classes of the images and predictions (0/0 = 0),
    percentile interval; and the resampled differences."""
    rng = np.random.default_rng(seed)
    labels = _labels(y, a, b, average)
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, len(y), len(y))
        diffs.append(_f1(y[i], a[i], labels, average) - _f1(y[i], b[i], labels, average))
    tail = (1 - confidence) / 2 * 100
    return np.percentile(diffs, [tail, 100 - tail]), np.array(diffs)


def _swapped(a, b, where):
    a2, b2 = a.copy(), b.copy()
    a2[where], b2[where] = b[where], a[where]
    return a2, b2


def _brute_permutation_p(y, a, b, average):
    """Every one of the 2**k ways to swap the two answers of the k images where they differ,
    scored with scikit-learn: the share at least as favourable to `a` as the observed one."""
    labels, d = _labels(y, a, b, average), np.flatnonzero(a != b)
    observed = _f1(y, a, labels, average) - _f1(y, b, labels, average)
    hits = 0
    for mask in range(2 ** len(d)):
        a2, b2 = _swapped(a, b, d[[(mask >> i) & 1 == 1 for i in range(len(d))]])
        hits += _f1(y, a2, labels, average) - _f1(y, b2, labels, average) >= observed - 1e-12
    return hits / 2 ** len(d)


def _macro_f1_rows(y, p, labels):
    """Macro F1 of each row of predictions `p` (rows x images), class by class."""
    f1 = []
    for c in labels:
        tp = ((p == c) & (y == c)).sum(axis=1)
        den = (p == c).sum(axis=1) + (y == c).sum()
        f1.append(np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0))
    return np.mean(f1, axis=0)


def _numpy_permutation_p(y, a, b, draws=None, seed=0):
    """Macro F1 permutation p with plain numpy: every assignment (draws=None) or `draws`
    random ones, p = (1 + hits) / (1 + draws)."""
    labels, d = _labels(y, a, b, "macro"), np.flatnonzero(a != b)
    observed = _macro_f1_rows(y, a[None], labels)[0] - _macro_f1_rows(y, b[None], labels)[0]
    rng, hits, total = np.random.default_rng(seed), 0, 2 ** len(d) if draws is None else draws
    for start in range(0, total, 1 << 15):
        m = min(1 << 15, total - start)
        swap = ((np.arange(start, start + m)[:, None] >> np.arange(len(d))) & 1).astype(bool) \
            if draws is None else rng.random((m, len(d))) < 0.5
        pa, pb = np.tile(a, (m, 1)), np.tile(b, (m, 1))
        pa[:, d], pb[:, d] = np.where(swap, b[d], a[d]), np.where(swap, a[d], b[d])
        hits += int(np.sum(_macro_f1_rows(y, pa, labels) - _macro_f1_rows(y, pb, labels)
                           >= observed - 1e-12))
    return hits / total if draws is None else (1 + hits) / (1 + draws)


# ----------------------------------------------------------------------------- McNemar

@pytest.mark.parametrize("b,c", [(0, 0), (3, 2), (8, 4), (0, 6), (6, 0), (17, 40), (250, 190),
                                 (1, 1500), (4321, 4500), (9000, 11000), (9950, 10050),
                                 (10000, 10000), (9999, 10001), (300, 19700), (0, 20000)])
def test_mcnemar_is_scipys_exact_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.timed
def test_mcnemar_is_fast_at_ten_thousand_each_way_and_says_which_side_it_favours():
    start = time.perf_counter()
    p = mcnemar_exact(10_000, 10_000), mcnemar_exact(9_700, 10_300)
    assert time.perf_counter() - start < 1.0
    assert p[0] == 1.0 and p[1] == pytest.approx(binomtest(9_700, 20_000, 0.5).pvalue, rel=1e-9)
    assert [mcnemar_favours(*bc) for bc in ((5, 2), (2, 5), (3, 3))] == [
        "challenger", "champion", "neither"]


# ----------------------------------------------------------------------------- permutation

@pytest.mark.parametrize("average,k,differing,seed", [("macro", 4, 8, 1), ("weighted", 5, 8, 2),
                                                      ("binary", 2, 8, 3), ("macro", 6, 8, 4)])
def test_exact_permutation_p_is_every_swap_scored_by_scikit_learn(average, k, differing, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, 50)
    b = np.where(rng.random(50) < 0.7, y, rng.integers(0, k, 50))
    a = b.copy()
    where = rng.choice(50, differing, replace=False)
    a[where] = np.where(rng.random(differing) < 0.6, y[where], (b[where] + 1) % k)
    a[where] = np.where(a[where] == b[where], (b[where] + 1) % k, a[where])
    assert np.sum(a != b) == differing
    p, used, exact = permutation_p(y, a, b, k, average)
    assert exact and used == 2 ** differing
    assert p == pytest.approx(_brute_permutation_p(y, a, b, average), abs=1e-15)


def test_monte_carlo_permutation_p_is_within_its_error_of_the_exact_value():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 60)
    b = np.where(rng.random(60) < 0.6, y, (y + rng.integers(1, 3, 60)) % 3)
    a = b.copy()
    fixed = rng.choice(np.flatnonzero(b != y), 12, replace=False)
    broken = rng.choice(np.flatnonzero(b == y), 8, replace=False)
    a[fixed], a[broken] = y[fixed], (y[broken] + 1) % 3
    exact = _numpy_permutation_p(y, a, b)           # all 2**20 assignments
    assert 0.02 < exact < 0.5
    p, used, is_exact = permutation_p(y, a, b, 3, "macro", permutations=20_000, seed=9)
    assert not is_exact and used == 20_000
    assert abs(p - exact) < 3 * np.sqrt(exact * (1 - exact) / used) + 1 / used


def test_the_smallest_number_of_images_the_permutation_test_needs():
    for confidence in (0.8, 0.9, 0.95, 0.99, 0.999):
        alpha = (1 - confidence) / 2
        brute = next(k for k in range(1, 100)
                     if binomtest(k, k, 0.5, alternative="greater").pvalue < alpha)
        assert min_images(alpha) == brute
    assert min_images(0.025) == 6
    assert min_images_line(270, 0.95) == (
        "270 images: at least 6 must differ, all in the challenger's favour, before anything "
        "can be promoted (exact permutation p = 2^-6 = 0.01562 < 0.025)")


def test_four_images_one_way_never_promote_six_can():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, 270)
    b = np.where(rng.random(270) < 0.9, y, (y + 1) % 4)
    wrong = np.flatnonzero(b != y)
    promoted = {4: 0, 5: 0, 6: 0}
    for trial in range(8):
        for j in promoted:
            a = b.copy()
            fixed = rng.choice(wrong, j, replace=False)
            a[fixed] = y[fixed]
            d = decide(y, a, b, 4, "macro", **FAST)
            assert d.permutation_exact and d.p_value == pytest.approx(2.0 ** -j)
            promoted[j] += d.promote
    assert promoted[4] == promoted[5] == 0 and promoted[6] > 0


# ----------------------------------------------------------------------------- the floor

def _greedy_fixes(y, b, average, j):
    """The champion with j errors fixed, each next one the fix that raises scikit-learn's F1
    least given the ones before (ties: the lowest (label, answer), then the lowest image)."""
    labels, a = _labels(y, b, b, average), b.copy()
    for _ in range(j):
        wrong = np.flatnonzero(a != y)
        kinds = sorted({(y[i], b[i]) for i in wrong})
        firsts = [wrong[(y[wrong] == ky) & (b[wrong] == kb)][0] for ky, kb in kinds]
        gains = []
        for i in firsts:
            trial = a.copy()
            trial[i] = y[i]
            gains.append(_f1(y, trial, labels, average))
        pick = firsts[next(t for t, g in enumerate(gains) if g <= min(gains) + 1e-12)]
        a[pick] = y[pick]
    return a


def _champion(n, supports, acc, seed):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(len(supports)), supports))
    wrong = rng.random(n) > acc
    b = np.where(wrong, (y + rng.integers(1, len(supports), n)) % len(supports), y)
    return rng, y, b


def _scaled(shares, n):
    counts = np.maximum(1, np.round(np.array(shares) / sum(shares) * n)).astype(int)
    counts[0] += n - counts.sum()
    return counts


@pytest.mark.parametrize("n,shares,average,acc", [
    (60, [1, 1, 1, 1], "macro", 0.8), (60, [975, 975, 25, 25], "macro", 0.85),
    (270, [1, 1, 1, 1], "weighted", 0.9), (270, [975, 975, 25, 25], "macro", 0.9),
    (2000, [1, 1, 1, 1], "macro", 0.95), (2000, [975, 975, 25, 25], "macro", 0.97),
    (2000, [975, 975, 25, 25], "weighted", 0.9)])
def test_the_floor_is_reached_and_no_improvement_below_it_is_promoted(n, shares, average, acc):
    """Challengers that fix some of the champion's errors (from fewer than the floor's count
    to many more), some also getting right images wrong or moving wrong answers to another
    class: none promoted below the floor decide reports for the pair; the floor's own
    hypothetical challenger (rebuilt here with scikit-learn) is promoted at exactly the
    floor, one image fewer is not."""
    rng, y, b = _champion(n, _scaled(shares, n), acc, seed=n + len(average))
    floor = decide(y, b, b, 4, average, **FAST)
    assert floor.floor is not None and floor.floor > 0
    j = floor.floor_images
    reached = decide(y, _greedy_fixes(y, b, average, j), b, 4, average, **FAST)
    assert reached.promote and reached.difference == pytest.approx(floor.floor, abs=1e-12)
    assert not decide(y, _greedy_fixes(y, b, average, j - 1), b, 4, average, **FAST).promote
    assert floor.floor_line().startswith(f"smallest difference this rule can promote on these "
                                         f"{n:,} images against this champion")
    wrong, right, promoted = np.flatnonzero(b != y), np.flatnonzero(b == y), 0
    for trial in range(12):
        a = b.copy()
        fixed = rng.choice(wrong, min(len(wrong), int(rng.integers(j - 1, j + 8))), replace=False)
        a[fixed] = y[fixed]
        if trial % 3 == 1:     # also breaks one or two right images
            broken = rng.choice(right, int(rng.integers(1, 3)), replace=False)
            a[broken] = (y[broken] + 1) % 4
        elif trial % 3 == 2:   # also moves some still-wrong answers to another wrong class
            still = np.setdiff1d(wrong, fixed)
            moved = rng.choice(still, min(len(still), 3), replace=False)
            a[moved] = np.where((b[moved] + 1) % 4 == y[moved], (b[moved] + 2) % 4,
                                (b[moved] + 1) % 4)
        d = decide(y, a, b, 4, average, **FAST)
        assert (d.floor, d.floor_images) == (floor.floor, j)
        if d.promote:
            promoted += 1
            assert d.difference >= floor.floor - 1e-12
    assert promoted > 0


def test_a_challenger_that_passes_both_tests_below_the_floor_is_not_promoted():
    """Found by search: at 270 images a challenger that fixes the champion's 6 errors and gets
    one cheap image wrong passes the permutation test and the interval with a difference below
    the greedy floor; the floor is a clause of the rule, so the printed floor stays true."""
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(4), [67, 68, 67, 68]))
    b = y.copy()
    wrong = rng.choice(270, 6, replace=False)
    b[wrong] = (y[wrong] + rng.integers(1, 4, 6)) % 4
    floor = decide(y, b, b, 4, "macro", **FAST)
    candidates = []   # all 6 errors fixed and one right image broken, scored by scikit-learn
    for i in np.flatnonzero(b == y):
        for w in range(1, 4):
            a = y.copy()
            a[i] = (y[i] + w) % 4
            candidates.append((f1_score(y, a, average="macro")
                               - f1_score(y, b, average="macro"), i, w))
    gain, i, w = max(candidates)   # the cheapest break
    a = y.copy()
    a[i] = (y[i] + w) % 4
    assert 0 < gain < floor.floor
    d = decide(y, a, b, 4, "macro", **FAST)
    assert d.p_value < d.alpha and d.ci_low > 0        # both tests pass ...
    assert not d.promote and d.reason.startswith("below the floor")   # ... the floor does not
    assert d.floor == floor.floor and d.difference == pytest.approx(gain)


def test_no_floor_for_a_perfect_champion_too_few_errors_or_non_inferiority():
    y = np.repeat(np.arange(3), 30)
    perfect = decide(y, (y + 1) % 3, y, 3, "macro", **FAST)
    assert perfect.floor is None and perfect.floor_images is None
    assert floor_line(perfect) == ("the champion is right on all 90 images: nothing can be "
                                   "promoted on them")
    b = y.copy()
    b[:4] = 1                      # four errors: 2**-4 > 0.025 whatever is fixed
    few = decide(y, y, b, 3, "macro", **FAST)
    assert few.floor is None and not few.promote
    assert floor_line(few).startswith("nothing can be promoted on these 90 images")
    ni = decide(y, y, b, 3, "macro", non_inferior=0.02, **FAST)
    assert ni.floor is None and floor_line(ni).startswith("non-inferiority has no floor")


# ----------------------------------------------------------------------------- the decision

def test_the_issue_rare_classes_fixed_common_ones_broken():
    """2,000 images, classes 975/975/25/25: the challenger gets 24 rare-class images right
    that the champion gets wrong and 50 common-class images wrong. Macro F1 and its
    permutation test favour the challenger; McNemar (accuracy) favours the champion."""
    rng = np.random.default_rng(7)
    y = rng.permutation(np.repeat(np.arange(4), [975, 975, 25, 25]))
    b = y.copy()
    rare, common = np.flatnonzero(y >= 2), np.flatnonzero(y < 2)
    missed = rng.choice(rare, 24, replace=False)
    b[missed] = rng.integers(0, 2, 24)                 # the champion calls them common
    a = b.copy()
    a[missed] = y[missed]
    broken = rng.choice(common, 50, replace=False)
    a[broken] = 1 - y[broken]
    d = decide(y, a, b, 4, "macro", seed=derive_seed("v2", "v1", "images"))
    assert d.p_test == "permutation" and not d.permutation_exact and d.p_value < 0.001
    independent = _numpy_permutation_p(y, a, b, draws=2000, seed=1)
    assert independent < 0.005
    assert d.difference == pytest.approx(f1_score(y, a, average="macro")
                                         - f1_score(y, b, average="macro")) and d.difference > 0
    assert d.promote and "the challenger is better: permutation p" in d.reason
    assert (d.challenger_only, d.champion_only) == (24, 50)
    assert d.mcnemar_favours == "champion"
    assert d.mcnemar_p == pytest.approx(binomtest(24, 74, 0.5).pvalue, rel=1e-9)


@pytest.mark.parametrize("n,k,average,confidence", [(270, 10, "macro", 0.95),
                                                     (120, 2, "binary", 0.9),
                                                     (200, 4, "weighted", 0.99)])
def test_interval_and_table_match_an_independent_computation(n, k, average, confidence):
    y, a, b = _models(n, k, 0.93, 0.9, seed=n)
    d = decide(y, a, b, k, average, confidence=confidence, resamples=200, seed=7)
    (low, high), _ = _plain_bootstrap(y, a, b, k, average, d.resamples, 7, confidence)
    assert (d.ci_low, d.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    labels = _labels(y, a, b, average)
    assert d.f1_challenger == pytest.approx(_f1(y, a, labels, average))
    assert d.difference == pytest.approx(_f1(y, a, labels, average) - _f1(y, b, labels, average))
    right_a, right_b = a == y, b == y
    assert (d.both_right, d.challenger_only, d.champion_only, d.both_wrong) == (
        np.sum(right_a & right_b), np.sum(right_a & ~right_b), np.sum(~right_a & right_b),
        np.sum(~right_a & ~right_b))
    assert d.mcnemar_p == pytest.approx(binomtest(d.challenger_only, d.challenger_only
                                                  + d.champion_only, 0.5).pvalue)
    assert d.n == n and d.resamples >= 200 and len(d.differences) == d.resamples
    assert d.alpha == pytest.approx((1 - confidence) / 2)


def test_a_class_no_image_has_and_no_model_predicts_does_not_shrink_the_difference():
    """Images gathered for `promote --data` may lack a class both models know: macro F1 over
    the classes that occur (scikit-learn's default labels), not 0/0 = 0 for the others."""
    y, a, b = _models(300, 3, 0.95, 0.8, seed=3)      # classes 0-2 only
    d = decide(y, a, b, 5, "macro", resamples=200, seed=1)   # the models know 5
    assert d.f1_challenger == pytest.approx(f1_score(y, a, average="macro"))
    assert d.difference == pytest.approx(f1_score(y, a, average="macro")
                                         - f1_score(y, b, average="macro"))
    (low, high), _ = _plain_bootstrap(y, a, b, 5, "macro", d.resamples, 1, 0.95)
    assert (d.ci_low, d.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    # a class a model predicts though no image has it counts (F1 0), as scikit-learn counts it
    a2 = a.copy()
    a2[:5] = 4
    d2 = decide(y, a2, b, 5, "macro", resamples=200, seed=1)
    assert d2.f1_challenger == pytest.approx(f1_score(y, a2, average="macro"))


def test_the_rule():
    # Two equally good models: nothing is promoted.
    y, a, b = _models(270, 10, 0.96, 0.96, seed=1)
    same = decide(y, a, b, 10, "macro")
    assert same.ci_low < 0 < same.ci_high and not same.promote and same.p_value > 0.025
    assert "not shown to be better" in same.reason and same.rule == "superiority"
    # Clearly better on 600 images: promoted, both the test and the interval agree.
    y, a, b = _models(600, 10, 0.97, 0.80, seed=2)
    better = decide(y, a, b, 10, "macro")
    assert better.promote and better.ci_low > 0 and better.p_value < better.alpha
    assert better.p_value == pytest.approx(1 / (1 + better.permutations))   # none as good
    assert better.mcnemar_p < 1e-6 and better.mcnemar_favours == "challenger"
    assert "the challenger is better" in better.reason
    # ... but not by a required gain larger than the whole interval's lower bound.
    picky = decide(y, a, b, 10, "macro", min_gain=better.ci_low + 0.001)
    assert not picky.promote and picky.threshold == pytest.approx(better.ci_low + 0.001)
    assert "registry.min_f1_gain" in picky.reason
    # Forced: promoted, and it says it went against the evidence.
    forced = decide(y, b, a, 10, "macro", force=True)
    assert forced.promote and forced.rule == "forced" and "against the evidence" in forced.reason


def test_non_inferiority_and_its_bootstrap_p():
    y, a, b = _models(2000, 5, 0.945, 0.95, seed=3)
    assert not decide(y, a, b, 5, "macro").promote
    ni = decide(y, a, b, 5, "macro", non_inferior=0.03, resamples=150, seed=4)
    assert ni.promote and ni.rule == "non-inferiority" and ni.threshold == -0.03
    assert "non-inferiority, not superiority" in ni.reason and ni.p_test == "bootstrap"
    (low, _), diffs = _plain_bootstrap(y, a, b, 5, "macro", ni.resamples, 4, 0.95)
    assert ni.ci_low == pytest.approx(low, abs=1e-12)
    assert ni.p_value == pytest.approx(np.mean(diffs <= -0.03))
    assert not decide(y, a, b, 5, "macro", non_inferior=0.0001).promote


def test_monte_carlo_error_cannot_decide():
    # The bootstrap: the threshold placed on the interval's lower bound itself.
    y, a, b = _models(600, 10, 0.97, 0.80, seed=2)
    first = decide(y, a, b, 10, "macro", resamples=1000, seed=3)
    d = decide(y, a, b, 10, "macro", min_gain=first.ci_low, resamples=1000, seed=3)
    assert d.resamples > 1000 or d.mc_uncertain
    if d.mc_uncertain:
        assert not d.promote and d.reason.startswith(TOO_CLOSE)
    else:
        assert d.promote == (d.ci_low > first.ci_low)
    # The permutation test: p close to alpha draws more assignments, up to 16x.
    y, a, b = _models(270, 10, 0.93, 0.9, seed=1)
    d = decide(y, a, b, 10, "macro", seed=3)
    assert not d.permutation_exact and abs(d.p_value - d.alpha) < 0.002
    assert d.permutations > 10_000 or d.mc_uncertain
    if d.mc_uncertain:
        assert not d.promote and TOO_CLOSE in d.reason
        assert d.permutations == 160_000 and d.ci_low > 0


def test_seeds():
    y, a, b = _models(300, 3, 0.9, 0.88, seed=4)
    one, two = decide(y, a, b, 3, seed=11), decide(y, a, b, 3, seed=11)
    assert (one.ci_low, one.ci_high, one.p_value) == (two.ci_low, two.ci_high, two.p_value)
    assert (one.ci_low, one.ci_high) != (decide(y, a, b, 3, seed=12).ci_low,
                                         decide(y, a, b, 3, seed=12).ci_high)
    assert one.seed == 11 and not one.seed_set
    assert decide(y, a, b, 3, seed=5, seed_set=True).seed_set
    seed = derive_seed("model", "3", "2", "abc123")
    digest = hashlib.sha256(b"model\x003\x002\x00abc123").digest()
    assert seed == int.from_bytes(digest[:8], "big") & (2 ** 63 - 1)
    assert seed == derive_seed("model", "3", "2", "abc123") and 0 <= seed < 2 ** 63
    assert len({seed, derive_seed("model", "2", "3", "abc123"), derive_seed("model", "32", "",
                                                                             "abc123")}) == 3


def test_identical_models():
    y, a, _ = _models(300, 3, 0.9, 0.88, seed=4)
    same = decide(y, a, a, 3)
    assert (same.ci_low, same.ci_high, same.mcnemar_p, same.p_value) == (0.0, 0.0, 1.0, 1.0)
    assert same.permutation_exact and same.permutations == 1 and not same.promote


def test_per_class_differences_and_the_class_guard():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 4, 800)
    b = np.where(rng.random(800) < 0.75, y, rng.integers(0, 4, 800))
    a = np.where((y < 3) & (rng.random(800) < 0.97), y, b)     # better on classes 0-2 ...
    a[(y == 3) & (b == 3) & (rng.random(800) < 0.25)] = 0     # ... worse on class 3
    d = decide(y, a, b, 4, "macro", resamples=150, seed=2)
    f1_a = f1_score(y, a, average=None, labels=[0, 1, 2, 3])
    f1_b = f1_score(y, b, average=None, labels=[0, 1, 2, 3])
    rng2, per_class = np.random.default_rng(2), []
    for _ in range(d.resamples):
        i = rng2.integers(0, 800, 800)
        per_class.append(f1_score(y[i], a[i], average=None, labels=[0, 1, 2, 3], zero_division=0)
                         - f1_score(y[i], b[i], average=None, labels=[0, 1, 2, 3],
                                    zero_division=0))
    low, high = np.percentile(per_class, [2.5, 97.5], axis=0)
    for row in d.per_class:
        c = row["class"]
        assert row["support"] == np.sum(y == c)
        assert row["f1_challenger"] == pytest.approx(f1_a[c])
        assert row["difference"] == pytest.approx(f1_a[c] - f1_b[c])
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low[c], abs=1e-12),
                                                   pytest.approx(high[c], abs=1e-12))
    drop = -d.per_class[3]["difference"]
    assert d.promote and drop > 0.05
    guarded = decide(y, a, b, 4, "macro", resamples=150, seed=2, max_class_drop=0.05)
    assert not guarded.promote and "class #3 F1 -" in guarded.reason
    assert decide(y, a, b, 4, "macro", resamples=150, seed=2, max_class_drop=drop + 0.01).promote
    out = json.loads(json.dumps(guarded.as_dict()))
    assert out["per_class"][3]["class"] == 3 and "differences" not in out
    assert out["max_class_drop"] == 0.05 and out["floor_images"] == guarded.floor_images


def test_bad_inputs():
    with pytest.raises(ValueError, match="same non-zero number"):
        decide([0, 1], [0], [1], 2)
    with pytest.raises(ValueError, match="confidence"):
        decide([0, 1], [0, 1], [1, 0], 2, confidence=1.0)


def test_the_figure_names_the_decisions_test_and_calls_mcnemar_a_check():
    import matplotlib.pyplot as plt

    y, a, b = _models(200, 3, 0.95, 0.85, seed=9)
    fig = plot_bootstrap(decide(y, a, b, 3, resamples=500), "m: v2 vs v1")
    title = fig.axes[0].get_title()
    assert "permutation p =" in title and "accuracy check, McNemar p =" in title
    plt.close(fig)
