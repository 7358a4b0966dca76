"""The statistics behind `paired.decide` (pure numpy: no scipy, torch, MLflow or Ray).

- the paired permutation test of the F1 difference: under "exchangeable" each image's two
  answers are swapped with probability 1/2; exact over every assignment of the images where
  the answers differ when there are at most `EXACT_MAX`, seeded Monte Carlo otherwise;
- the paired bootstrap of the F1 difference (overall and per class) from one seeded stream of
  resamples that can be extended, so doubling the resamples keeps the first ones;
- the Monte Carlo checks: whether alpha (permutation) or the threshold (bootstrap) lies within
  3 standard errors of the estimate, so more draws could change the decision;
- the floor's hypothetical challengers: the champion with its errors fixed, the cheapest
  first (`CheapestFixes`), bootstrapped on the decision's own resamples (`FixedBootstrap`);
- McNemar's exact test, kept as an accuracy check (it tests accuracy, not F1);
- `derive_seed`: a seed from strings, so the same comparison always draws the same numbers.

F1 is scikit-learn's (zero_division=0) over `scored_labels`, from per-class counts: each image
moves at most one true-positive and two predicted counts, so both tests work on counts.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from components.training.metrics import scored_labels as metrics_labels

DEFAULT_RESAMPLES = 2000
DEFAULT_PERMUTATIONS = 10_000
EXACT_MAX = 16            # up to 2**16 assignments are enumerated, not sampled
MC_CAP = 16               # Monte Carlo draws double at most up to 16x the requested number
PASS, FAIL, UNSURE = "pass", "fail", "unsure"
_CHUNK = 250              # resamples at once: bounds memory at 5,000+ images
_CELLS = 1 << 20          # permutation rows x differing images at once
# F1 values are ratios of counts: distinct ones differ by far more than float rounding, so
# a permuted statistic within _TIE of the observed one is a tie, counted as "as extreme".
_TIE = 1e-12


def derive_seed(*parts: str) -> int:
    """A 63-bit seed from strings (e.g. both versions and the images' fingerprint): the same
    comparison draws the same resamples on any machine. NUL-joined, so ("ab", "c") and
    ("a", "bc") differ."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: 2 P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped
    at 1 (scipy's binomtest at p = 1/2). The binomial terms are summed relative to the largest
    one in log space: O(b + c) floats, no huge integers, no underflow before the end."""
    n, k = b + c, min(b, c)
    if n == 0 or 2 * k >= n:
        return 1.0
    j = np.arange(k, dtype=np.float64)
    # log pmf(j+1) - log pmf(j) = log((n-j)/(j+1)); summed backwards from the top term k
    steps = np.log((n - j) / (j + 1))
    below = -np.concatenate([np.cumsum(steps[::-1])[::-1], [0.0]])
    top = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
    return min(1.0, 2 * math.exp(top + math.log(np.exp(below).sum())))


def mcnemar_favours(b: int, c: int) -> str:
    """The side with more discordant images: "challenger", "champion" or "neither"."""
    return "challenger" if b > c else "champion" if c > b else "neither"


def min_images(alpha: float) -> int:
    """The fewest differing images that can make the exact permutation test significant: all
    of them in the challenger's favour give p = 2**-k at best (the observed assignment itself
    is one of the 2**k)."""
    k = 1
    while 2.0 ** -k >= alpha:
        k += 1
    return k


def scored_labels(y, challenger, champion, num_classes: int, average: str) -> np.ndarray:
    """The classes an F1 averages over, the one rule of `metrics.scored_labels`: the positive
    class (binary), otherwise the classes among the images or either model's predictions."""
    return metrics_labels(num_classes, average, y, challenger, champion)


def positions(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each value's column in `labels`; len(labels) (a column that is dropped) if absent."""
    at = np.searchsorted(labels, values)
    found = (at < len(labels)) & (labels[np.minimum(at, len(labels) - 1)] == values)
    return np.where(found, at, len(labels))


def onehot(pos: np.ndarray, size: int) -> np.ndarray:
    """Rows of indicators; position `size` (a class outside the label set) is all zeros."""
    return np.eye(size + 1)[pos][..., :size]


def f1_from_counts(tp, predicted, actual, average: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-class F1, averaged F1) for each row of class counts, as scikit-learn computes them
    (0/0 is 0; weighted by each class's true count)."""
    tp, den = np.broadcast_arrays(tp, predicted + actual)
    f1 = np.divide(2 * tp, den, out=np.zeros(den.shape), where=den != 0)
    f1 = np.ascontiguousarray(f1)
    if average == "weighted":
        actual = np.ascontiguousarray(np.broadcast_to(actual, f1.shape))
        total = actual.sum(axis=-1)
        return f1, np.divide((f1 * actual).sum(axis=-1), total, out=np.zeros(total.shape),
                             where=total != 0)
    return f1, f1.mean(axis=-1)


def class_counts(y, p, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, predicted, actual) per class of `labels` on the whole sample."""
    size = len(labels)
    py, pp = positions(y, labels), positions(p, labels)
    hit = np.where(py == pp, py, size)
    return tuple(np.bincount(v, minlength=size + 1)[:size].astype(np.float64)
                 for v in (hit, pp, py))


# ----------------------------------------------------------------------------- permutation

def _swap_effects(y, a, b, labels):
    """Counts of both models and, per image where they differ, how swapping its two answers
    moves the challenger's (true positive, predicted) counts; the champion's move the other
    way. The true counts never move."""
    size, d = len(labels), np.flatnonzero(a != b)
    tp_a, pred_a, actual = class_counts(y, a, labels)
    tp_b, pred_b, _ = class_counts(y, b, labels)
    py, pa, pb = (positions(v[d], labels) for v in (y, a, b))
    hit_a, hit_b = np.where(pa == py, py, size), np.where(pb == py, py, size)
    effect = np.hstack([onehot(hit_b, size) - onehot(hit_a, size),
                        onehot(pb, size) - onehot(pa, size)])
    return (tp_a, pred_a, tp_b, pred_b, actual), effect


def _swapped_differences(swaps, base, effect, average) -> np.ndarray:
    tp_a, pred_a, tp_b, pred_b, actual = base
    size = len(actual)
    move = swaps @ effect
    _, f1_a = f1_from_counts(tp_a + move[:, :size], pred_a + move[:, size:], actual, average)
    _, f1_b = f1_from_counts(tp_b - move[:, :size], pred_b - move[:, size:], actual, average)
    return f1_a - f1_b


def permutation_p(y, a, b, num_classes: int, average: str,
                  permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                  alpha: float | None = None) -> tuple[float, int, bool]:
    """One-sided p-value of the paired permutation test of F1(a) - F1(b) (alternative: `a` is
    better): (p, assignments used, exact). Exact over all 2**k assignments of the k images
    where the answers differ when k <= EXACT_MAX: p = #{difference >= observed} / 2**k.
    Otherwise `permutations` seeded draws, p = (1 + #{>= observed}) / (1 + draws); with
    `alpha`, the draws double (up to MC_CAP times) while alpha is within 3 standard errors."""
    y, a, b = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (y, a, b))
    labels = scored_labels(y, a, b, num_classes, average)
    base, effect = _swap_effects(y, a, b, labels)
    k = len(effect)
    observed = _swapped_differences(np.zeros((1, k)), base, effect, average)[0] - _TIE
    rows = max(1, _CELLS // max(k, 1))
    if k <= EXACT_MAX:
        bits, hits = np.arange(k), 0
        for start in range(0, 2 ** k, rows):
            swaps = (np.arange(start, min(start + rows, 2 ** k))[:, None] >> bits) & 1
            hits += int(np.sum(_swapped_differences(swaps.astype(np.float64), base, effect,
                                                    average) >= observed))
        return hits / 2 ** k, 2 ** k, True
    rng, words = np.random.default_rng(seed), -(-k // 32)
    used, hits, want = 0, 0, permutations
    while True:
        for start in range(used, want, rows):
            m = min(rows, want - start)
            # full-range uint32 draws: the same stream whatever the chunk sizes
            raw = rng.integers(0, 2 ** 32, size=(m, words), dtype=np.uint32)
            swaps = np.unpackbits(raw.view(np.uint8), axis=1, bitorder="little")[:, :k]
            hits += int(np.sum(_swapped_differences(swaps.astype(np.float64), base, effect,
                                                    average) >= observed))
        used = want
        p = (1 + hits) / (1 + used)
        if alpha is None or permutation_state(p, used, False, alpha) != UNSURE \
                or used >= MC_CAP * permutations:
            return p, used, False
        want = 2 * used


def permutation_state(p: float, used: int, exact: bool, alpha: float) -> str:
    """PASS (p < alpha), FAIL, or UNSURE: a Monte Carlo p within 3 standard errors of alpha."""
    if not exact and abs(p - alpha) <= 3 * math.sqrt(p * (1 - p) / used):
        return UNSURE
    return PASS if p < alpha else FAIL


# ----------------------------------------------------------------------------- bootstrap

def resample_indices(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """`count` resamples of n image indices with replacement, one per row: the same stream
    whether drawn at once or in chunks."""
    return rng.integers(0, n, size=(count, n))


def resampled_counts(rng, codes: np.ndarray, groups: int, count: int):
    """Per resample, how often each code (a group of interchangeable images) is drawn:
    one (count x groups) block per chunk of resamples."""
    n = len(codes)
    for start in range(0, count, _CHUNK):
        m = min(_CHUNK, count - start)
        drawn = codes[resample_indices(rng, n, m)] + groups * np.arange(m)[:, None]
        yield np.bincount(drawn.ravel(), minlength=m * groups).reshape(m, groups)


class PairedBootstrap:
    """Paired resamples of the images from one seeded stream: both models are scored on the
    same drawn images. `extend` continues the stream, so the first R of 2R resamples are the
    R drawn before. Images with the same (label, challenger, champion) answers are
    interchangeable, so a resample is counted per such group, not per image."""

    def __init__(self, y, a, b, labels: np.ndarray, average: str, seed: int):
        size = len(labels)
        py, pa, pb = (positions(v, labels) for v in (y, a, b))
        groups, self.codes = np.unique(np.stack([py, pa, pb], axis=1), axis=0,
                                       return_inverse=True)
        self.codes = self.codes.reshape(-1)
        gy, ga, gb = groups.T
        self.matrix = np.hstack([onehot(p, size) for p in (
            gy, np.where(ga == gy, gy, size), ga, np.where(gb == gy, gy, size), gb)])
        self.size, self.average = size, average
        self.rng = np.random.default_rng(seed)
        self.differences = np.empty(0)
        self.class_differences = np.empty((0, size))

    def extend(self, count: int) -> None:
        diffs, per_class = [self.differences], [self.class_differences]
        for drawn in resampled_counts(self.rng, self.codes, len(self.matrix), count):
            c = np.split(drawn @ self.matrix, 5, axis=1)
            class_a, f1_a = f1_from_counts(c[1], c[2], c[0], self.average)
            class_b, f1_b = f1_from_counts(c[3], c[4], c[0], self.average)
            diffs.append(f1_a - f1_b)
            per_class.append(class_a - class_b)
        self.differences = np.concatenate(diffs)
        self.class_differences = np.concatenate(per_class)

    def first(self, count: int) -> np.ndarray:
        if len(self.differences) < count:
            self.extend(count - len(self.differences))
        return self.differences[:count]


def f1_interval(y_true, y_pred, num_classes: int, average: str = "auto",
                confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                seed: int = 0) -> tuple[float, float]:
    """One model's F1 over resamples of its images, the same stream and counting as the
    paired bootstrap (the label set fixed to the point estimate's): the percentile interval of
    how far the test F1 could move on another draw of test images of this size."""
    from components.training.metrics import resolve_average

    average = resolve_average(average, num_classes)
    y, p = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (y_true, y_pred))
    if len(y) == 0:
        return 0.0, 0.0
    labels = metrics_labels(num_classes, average, y, p)
    size = len(labels)
    groups, codes = np.unique(np.stack([positions(y, labels), positions(p, labels)], axis=1),
                              axis=0, return_inverse=True)
    gy, gp = groups.T
    matrix = np.hstack([onehot(gy, size), onehot(np.where(gp == gy, gy, size), size),
                        onehot(gp, size)])
    values = []
    for drawn in resampled_counts(np.random.default_rng(seed), codes.reshape(-1), len(groups),
                                  resamples):
        actual, tp, predicted = np.split(drawn @ matrix, 3, axis=1)
        values.append(f1_from_counts(tp, predicted, actual, average)[1])
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(values), [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_differences(y, challenger, champion, num_classes: int, average: str,
                          resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """F1(challenger) - F1(champion) on each of `resamples` paired resamples
    (`np.random.default_rng(seed)`, `resample_indices`)."""
    y, a, b = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (y, challenger, champion))
    labels = scored_labels(y, a, b, num_classes, average)
    return PairedBootstrap(y, a, b, labels, average, seed).first(resamples)


def bootstrap_state(differences: np.ndarray, q: float, threshold: float) -> str:
    """PASS when the q-quantile is above `threshold` beyond Monte Carlo doubt, FAIL when at or
    below it, UNSURE when the threshold lies between the order statistics that bound the
    quantile's 3-sigma band (the number of resamples below the true quantile is binomial)."""
    r = len(differences)
    half = 3 * math.sqrt(r * q * (1 - q))
    lo, hi = max(0, math.floor(r * q - half)), min(r - 1, math.ceil(r * q + half))
    s = np.partition(differences, (lo, hi))
    if s[lo] > threshold:
        return PASS
    return FAIL if s[hi] <= threshold else UNSURE


class CheapestFixes:
    """The champion's wrong images in the order a least-gain challenger would fix them: each
    next one the error whose fix raises F1 the least given those fixed before. Greedy on the
    marginal gain, not on each fix alone: F1 is concave in a class's true positives, so fixes
    piled into one class gain less together than their gains alone add up to. Errors with the
    same (label, answer) are interchangeable, so the choice is among those kinds (ties: the
    lowest (label, answer), then the lowest image index). Greedy, so not always the least
    gain any j fixes can make: a few percent more at worst in a brute-force check."""

    def __init__(self, y, b, labels: np.ndarray, average: str):
        size, self.average = len(labels), average
        self.tp, self.pred, self.actual = class_counts(y, b, labels)
        self.f1_b = float(f1_from_counts(self.tp, self.pred, self.actual, average)[1])
        errors = np.flatnonzero(b != y)
        kinds, which = np.unique(np.stack([positions(y[errors], labels),
                                           positions(b[errors], labels)], axis=1),
                                 axis=0, return_inverse=True)
        which = which.reshape(-1)
        self.queues = [list(errors[which == i][::-1]) for i in range(len(kinds))]
        self.kind_tp = onehot(kinds[:, 0], size)
        self.kind_pred = self.kind_tp - onehot(kinds[:, 1], size)
        self.count, self.order, self.differences = len(errors), [], []

    def first(self, m: int) -> np.ndarray:
        """The first m errors to fix (all of them if fewer)."""
        while len(self.order) < min(m, self.count):
            f1 = f1_from_counts(self.tp + self.kind_tp, self.pred + self.kind_pred,
                                self.actual, self.average)[1]
            f1[[not q for q in self.queues]] = np.inf
            kind = int(np.flatnonzero(f1 <= f1.min() + _TIE)[0])
            self.order.append(self.queues[kind].pop())
            self.tp, self.pred = self.tp + self.kind_tp[kind], self.pred + self.kind_pred[kind]
            f1_a = f1_from_counts(self.tp, self.pred, self.actual, self.average)[1]
            self.differences.append(float(f1_a) - self.f1_b)
        return np.array(self.order[:m], dtype=np.int64)


class FixedBootstrap:
    """The bootstrap of hypothetical challengers: the champion with its first j errors (in the
    order of `fixes`) fixed, on the resamples of `PairedBootstrap` with the same seed, so each
    resampled difference is bit for bit the one `decide` would compute for that challenger.
    Per resample it keeps the champion's counts and how often each error image was drawn;
    fixing image i adds its draws to the true positives and predictions of its true class."""

    def __init__(self, y, b, fixes: CheapestFixes, labels: np.ndarray, average: str,
                 seed: int):
        self.size, self.average, self.seed, self.fixes = len(labels), average, seed, fixes
        self.py, self.pb = positions(y, labels), positions(b, labels)
        self.rows = self.cols = self.j = 0

    def _draw(self, rows: int, cols: int) -> None:
        size, errors = self.size, self.fixes.first(cols)
        groups, codes = np.unique(np.stack([self.py, self.pb], axis=1), axis=0,
                                  return_inverse=True)
        codes = codes.reshape(-1) + cols
        codes[errors] = np.arange(cols)
        gy, gb = np.concatenate([self.py[errors], groups[:, 0]]), \
            np.concatenate([self.pb[errors], groups[:, 1]])
        matrix = np.hstack([onehot(gy, size), onehot(np.where(gb == gy, gy, size), size),
                            onehot(gb, size)])
        drawn = np.concatenate(list(resampled_counts(np.random.default_rng(self.seed), codes,
                                                     len(matrix), rows)))
        self.drawn = drawn[:, :cols].astype(np.float64)
        self.fix_tp = onehot(self.py[errors], size)
        self.fix_pred = self.fix_tp - onehot(self.pb[errors], size)
        self.actual, self.tp_b, self.pred_b = np.split(drawn @ matrix, 3, axis=1)
        self.f1_b = f1_from_counts(self.tp_b, self.pred_b, self.actual, self.average)[1]
        self.tp_a, self.pred_a = self.tp_b.copy(), self.pred_b.copy()
        self.rows, self.cols, self.j = rows, cols, 0

    def differences(self, j: int, rows: int) -> np.ndarray:
        """The first `rows` resampled differences of the challenger with j errors fixed."""
        if rows > self.rows or j > self.cols or j < self.j:
            self._draw(max(rows, self.rows),
                       min(self.fixes.count, max(j, 2 * self.cols, 64)))
        if j > self.j:
            w = self.drawn[:, self.j:j]
            self.tp_a += w @ self.fix_tp[self.j:j]
            self.pred_a += w @ self.fix_pred[self.j:j]
            self.j = j
        f1_a = f1_from_counts(self.tp_a, self.pred_a, self.actual, self.average)[1]
        return (f1_a - self.f1_b)[:rows]
