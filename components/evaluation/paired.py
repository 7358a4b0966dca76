"""The paired comparison behind `visiontune promote` (pure numpy: no torch, MLflow or Ray).

Both models classified the same labelled images. From the per-image results:

- the exact McNemar test on the discordant pairs: `b` images only the challenger gets right,
  `c` images only the champion gets right; under "equally good" each discordant image is a
  fair coin, so the two-sided p-value is a binomial tail of min(b, c) in b + c;
- a seeded paired bootstrap of the F1 difference: the same resample of images scores both
  models, with one F1 averaging (the challenger's) over the classes that occur among the
  images or the predictions (`scored_labels`); its two-sided percentile interval at
  `confidence`;
- the rule: promote only when the interval's lower bound is above `min_gain` (superiority),
  or, for a challenger chosen for being smaller or faster, above `-margin` (non-inferiority):
  at confidence 0.95, a one-sided test at the 2.5% level;
- the floor: the smallest difference this many images can ever show at this confidence.

`decide` is the whole decision; the registry code only gathers predictions and records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from components.training.metrics import resolve_average

DEFAULT_RESAMPLES = 2000
_CHUNK = 250   # resamples scored at once: bounds memory at 5,000+ images


@dataclass(frozen=True)
class PairedDecision:
    promote: bool
    reason: str
    rule: str                 # "superiority" | "non-inferiority" | "forced"
    threshold: float          # the interval's lower bound must be above this
    n: int                    # images scored by both models
    both_right: int
    challenger_only: int      # b: the challenger right, the champion wrong
    champion_only: int        # c: the champion right, the challenger wrong
    both_wrong: int
    mcnemar_p: float
    f1_challenger: float
    f1_champion: float
    difference: float         # f1_challenger - f1_champion
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int
    seed: int
    average: str
    detectable: float         # the smallest difference this many images can show
    detectable_images: int
    differences: np.ndarray = field(repr=False, compare=False, default=None)  # bootstrap

    def interval(self) -> str:
        return f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}]"

    def power_line(self) -> str:
        return power_line(self.n, self.confidence)

    def as_dict(self) -> dict:
        """Every number of the decision (not the resampled differences): JSON-ready."""
        from dataclasses import fields

        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "differences"}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least as uneven as (b, c)) for b + c fair
    coins. Exact integers: no overflow at thousands of discordant images."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def detectable_images(confidence: float) -> int:
    """The fewest discordant images that can make McNemar's exact test significant at
    `confidence`: all of them going one way, 2 * 0.5**k < 1 - confidence."""
    alpha = 1.0 - confidence
    k = 1
    while 2 * 0.5 ** k >= alpha:
        k += 1
    return k


def detectable_difference(n: int, confidence: float) -> float:
    """About the smallest F1 (or accuracy) difference `n` images can show at `confidence`:
    one image moves either by about 1/n, and fewer than `detectable_images` images one way
    are indistinguishable from a coin."""
    return detectable_images(confidence) / max(n, 1)


def power_line(n: int, confidence: float) -> str:
    k, d = detectable_images(confidence), detectable_difference(n, confidence)
    return (f"{n:,} images: differences below about {d:.3f} ({k} images) cannot be told from "
            f"noise at {confidence:.0%} confidence")


def scored_labels(y, challenger, champion, num_classes: int, average: str) -> np.ndarray:
    """The classes an F1 averages over: the positive class (binary); otherwise every class
    that occurs among the images or either model's predictions, as scikit-learn's default
    `labels` (a class no image has and no model predicts would add 0/0 = 0 to both models'
    macro F1 and shrink their difference: images gathered with `--data` may lack some)."""
    if average == "binary":
        return np.array([1])
    present = np.unique(np.concatenate([np.asarray(v, dtype=np.int64).reshape(-1)
                                        for v in (y, challenger, champion)]))
    return present[(present >= 0) & (present < num_classes)]


def _f1_rows(weights: np.ndarray, y: np.ndarray, p: np.ndarray, labels: np.ndarray,
             average: str) -> np.ndarray:
    """F1 for each row of `weights` (how often each image is in that resample) over `labels`,
    as `classification_metrics` computes it (0/0 is 0)."""
    hit = (y[:, None] == labels) & (p[:, None] == labels)
    tp = weights @ hit.astype(np.float64)
    predicted = weights @ (p[:, None] == labels).astype(np.float64)
    actual = weights @ (y[:, None] == labels).astype(np.float64)
    den = predicted + actual
    f1 = np.divide(2 * tp, den, out=np.zeros_like(tp), where=den != 0)
    if average == "weighted":
        total = actual.sum(axis=1)
        return np.divide((f1 * actual).sum(axis=1), total, out=np.zeros_like(total),
                         where=total != 0)
    return f1.mean(axis=1)


def resample_indices(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """`count` resamples of n image indices with replacement, one per row: the same stream
    whether drawn at once or in chunks."""
    return rng.integers(0, n, size=(count, n))


def bootstrap_differences(y, challenger, champion, num_classes: int, average: str,
                          resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """F1(challenger) - F1(champion) on each of `resamples` paired resamples: both models are
    scored on the same drawn images (`np.random.default_rng(seed)`, `resample_indices`)."""
    y, a, b = (np.asarray(v, dtype=np.int64) for v in (y, challenger, champion))
    n, labels = len(y), scored_labels(y, challenger, champion, num_classes, average)
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        m = min(_CHUNK, resamples - start)
        idx = resample_indices(rng, n, m)
        weights = np.bincount((idx + n * np.arange(m)[:, None]).ravel(),
                              minlength=m * n).reshape(m, n).astype(np.float64)
        out[start:start + m] = (_f1_rows(weights, y, a, labels, average)
                                - _f1_rows(weights, y, b, labels, average))
    return out


def decide(labels, challenger, champion, num_classes: int, average: str = "auto", *,
           confidence: float = 0.95, min_gain: float = 0.0, non_inferior: float | None = None,
           resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
           force: bool = False) -> PairedDecision:
    """Promote or not, from per-image results: `labels`, and the class index each model
    predicted for the same images, in the same order.

    Superiority (default): promote when the interval's lower bound is above `min_gain`.
    `non_inferior=MARGIN`: promote when it is above -MARGIN (not worse by more than MARGIN).
    `force` promotes whatever the evidence, and says so."""
    y, a, b = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (labels, challenger, champion))
    if not (len(y) == len(a) == len(b)) or len(y) == 0:
        raise ValueError(f"need the same non-zero number of labels and predictions, got "
                         f"{len(y)}, {len(a)}, {len(b)}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    average = resolve_average(average, num_classes)
    right_a, right_b = a == y, b == y
    counts = dict(both_right=int(np.sum(right_a & right_b)),
                  challenger_only=int(np.sum(right_a & ~right_b)),
                  champion_only=int(np.sum(~right_a & right_b)),
                  both_wrong=int(np.sum(~right_a & ~right_b)))
    ones, labels = np.ones((1, len(y))), scored_labels(y, a, b, num_classes, average)
    f1_a = float(_f1_rows(ones, y, a, labels, average)[0])
    f1_b = float(_f1_rows(ones, y, b, labels, average)[0])
    diffs = bootstrap_differences(y, a, b, num_classes, average, resamples, seed)
    tail = (1 - confidence) / 2
    low, high = (float(q) for q in np.quantile(diffs, [tail, 1 - tail]))
    if non_inferior is not None:
        rule, threshold = "non-inferiority", -float(non_inferior)
    else:
        rule, threshold = "superiority", float(min_gain)
    interval = f"the {confidence:.0%} interval of the F1 difference [{low:+.4f}, {high:+.4f}]"
    promote = low > threshold
    if rule == "superiority":
        reason = (f"the challenger is better: {interval} lies above {threshold:+.4f}" if promote
                  else f"not shown to be better: {interval} reaches {threshold:+.4f} "
                       f"(registry.min_f1_gain) or below")
    else:
        reason = (f"not worse by more than {-threshold:.4f} (non-inferiority, not "
                  f"superiority): {interval} lies above {threshold:+.4f}" if promote
                  else f"may be worse by more than {-threshold:.4f}: {interval} reaches "
                       f"{threshold:+.4f} or below")
    if force and not promote:
        rule, promote, reason = "forced", True, f"forced against the evidence ({reason})"
    return PairedDecision(
        promote=promote, reason=reason, rule=rule, threshold=threshold, n=len(y), **counts,
        mcnemar_p=mcnemar_exact(counts["challenger_only"], counts["champion_only"]),
        f1_challenger=f1_a, f1_champion=f1_b, difference=f1_a - f1_b, ci_low=low,
        ci_high=high, confidence=confidence, resamples=resamples, seed=seed, average=average,
        detectable=detectable_difference(len(y), confidence),
        detectable_images=detectable_images(confidence), differences=diffs)


def plot_bootstrap(d: PairedDecision, title: str = ""):
    """The resampled F1 differences, the interval and the threshold the rule compares with:
    how far from "no difference" the evidence is, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(d.differences, bins=60, color="#8ab4d8", edgecolor="white", linewidth=0.3)
    ax.axvspan(d.ci_low, d.ci_high, color="#1f77b4", alpha=0.15,
               label=f"{d.confidence:.0%} interval {d.interval()}")
    ax.axvline(d.difference, color="#1f77b4", lw=2, label=f"observed {d.difference:+.4f}")
    ax.axvline(d.threshold, color="#d62728", ls="--", lw=1.5,
               label=f"{d.rule} threshold {d.threshold:+.4f}")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"{d.average} F1, challenger - champion ({d.resamples:,} paired resamples of "
                  f"{d.n:,} images)")
    ax.set_ylabel("resamples")
    verdict = "promote" if d.promote else "keep the champion"
    ax.set_title((title + "\n" if title else "") + f"{verdict}; McNemar p = {d.mcnemar_p:.3g} "
                 f"({d.challenger_only} vs {d.champion_only} discordant images)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
