"""The paired comparison behind `visiontune promote` (pure numpy: no torch, MLflow or Ray).

Both models classified the same labelled images. One number is tested: the difference of
one F1 averaging, challenger - champion, over `scored_labels` (the classes among the images
or either model's predictions). At confidence 0.95 every test below is one-sided at
alpha = (1 - confidence) / 2 = 0.025, the level of the interval's lower bound.

- superiority (default): promote when the paired permutation test of the F1 difference
  (`paired_tests.permutation_p`) gives p < alpha and the paired bootstrap interval's lower
  bound is above `min_gain`;
- non-inferiority (`non_inferior=MARGIN`, a smaller or faster challenger): promote when the
  lower bound is above -MARGIN; its p is the bootstrap's, the share of resampled differences
  at or below -MARGIN;
- Monte Carlo error cannot decide: draws double while alpha or the threshold lies within 3
  standard errors, and a decision still that close is "too close to call" (not promoted);
- the floor: the difference of the smallest improvement the tests above promote against
  this champion on these images: its errors fixed, the cheapest first (greedily), until both
  pass. It is also a clause of the rule: a difference below it is not promoted. Without the
  clause it would be no bound: a challenger that also changes other answers (gets a cheap
  image wrong, or moves wrong answers to a class where they cost less F1) can pass both
  tests with less (found by search: +0.0184 under a greedy floor of +0.0221 at 270 images);
  with it, the printed floor is exactly the smallest difference the rule promotes;
- `max_class_drop`: optionally, no class may lose more F1 than that;
- McNemar's exact test on the images only one model gets right: an accuracy check, reported,
  never deciding (a challenger can be right on fewer images and still have the better macro F1).

`decide` is the whole decision; the registry code only gathers predictions and records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from components.evaluation.paired_tests import (
    DEFAULT_PERMUTATIONS,
    DEFAULT_RESAMPLES,
    EXACT_MAX,
    FAIL,
    MC_CAP,
    PASS,
    UNSURE,
    CheapestFixes,
    FixedBootstrap,
    PairedBootstrap,
    bootstrap_differences,
    bootstrap_state,
    class_counts,
    derive_seed,
    f1_from_counts,
    mcnemar_exact,
    mcnemar_favours,
    min_images,
    permutation_p,
    permutation_state,
    scored_labels,
)
from components.training.metrics import resolve_average

__all__ = ["DEFAULT_PERMUTATIONS", "DEFAULT_RESAMPLES", "PairedDecision",
           "bootstrap_differences", "decide", "derive_seed", "floor_line", "mcnemar_exact",
           "mcnemar_favours", "min_images", "min_images_line", "permutation_p",
           "plot_bootstrap", "scored_labels"]

TOO_CLOSE = "too close to call: the threshold lies within the Monte Carlo error"


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
    p_value: float            # the decision's p (one-sided): see p_test
    p_test: str               # "permutation" (superiority) | "bootstrap" (non-inferiority)
    alpha: float              # (1 - confidence) / 2
    permutations: int         # assignments the permutation p used (2**k when exact)
    permutation_exact: bool
    mcnemar_p: float          # accuracy check only, two-sided
    mcnemar_favours: str      # "challenger" | "champion" | "neither"
    f1_challenger: float
    f1_champion: float
    difference: float         # f1_challenger - f1_champion
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int            # bootstrap resamples used (more than asked when close)
    mc_uncertain: bool        # still within Monte Carlo error at the cap: not promoted
    seed: int
    seed_set: bool            # set by the user (else derived from the versions and images)
    average: str
    floor: float | None       # smallest difference promotable by fixing errors (None: none)
    floor_images: int | None  # champion errors fixed to reach it
    max_class_drop: float | None
    per_class: list = field(default_factory=list)
    differences: np.ndarray = field(repr=False, compare=False, default=None)  # bootstrap

    def interval(self) -> str:
        return f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}]"

    def floor_line(self) -> str:
        return floor_line(self)

    def as_dict(self) -> dict:
        """Every number of the decision (not the resampled differences): JSON-ready."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if f.name != "differences"}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def min_images_line(n: int, confidence: float) -> str:
    """Before scoring: what any challenger needs on `n` images under the superiority rule."""
    alpha, k = (1 - confidence) / 2, min_images((1 - confidence) / 2)
    return (f"{n:,} images: at least {k} must differ, all in the challenger's favour, before "
            f"anything can be promoted (exact permutation p = 2^-{k} = {2.0 ** -k:.4g} < "
            f"{alpha:.3g})")


def floor_line(d: PairedDecision) -> str:
    """The floor in words: the rule promotes no smaller difference on these images."""
    where = f"on these {d.n:,} images against this champion"
    if d.rule == "non-inferiority" or (d.rule == "forced" and d.p_test == "bootstrap"):
        return (f"non-inferiority has no floor {where}: the margin {-d.threshold:.4f} is the "
                f"number that matters")
    if d.floor is None:
        errors = d.challenger_only + d.both_wrong
        if errors == 0:
            return f"the champion is right on all {d.n:,} images: nothing can be promoted on them"
        return (f"nothing can be promoted {where}: even all {errors:,} images it gets wrong "
                f"fixed do not reach p < {d.alpha:.3g} one-sided and a lower bound above "
                f"{d.threshold:+.4f}")
    return (f"smallest difference this rule can promote {where}: {d.floor:+.4f} (the "
            f"champion's {d.floor_images} cheapest errors fixed reach p < {d.alpha:.3g} "
            f"one-sided; the rule promotes nothing below it)")


# float noise: the floor's own challenger computes its difference in another order
FLOOR_TOLERANCE = 1e-12


def _inputs(labels, challenger, champion, confidence):
    y, a, b = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (labels, challenger, champion))
    if not (len(y) == len(a) == len(b)) or len(y) == 0:
        raise ValueError(f"need the same non-zero number of labels and predictions, got "
                         f"{len(y)}, {len(a)}, {len(b)}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return y, a, b


def _permutation_seed(seed: int) -> int:
    # its own stream: the bootstrap's resamples stay those of `default_rng(seed)`
    return derive_seed(str(seed), "permutation")


def _resolve(boot, state_p: str, threshold: float, alpha: float, resamples: int):
    """The bootstrap's state at `resamples`, doubled while the threshold is within Monte Carlo
    error and the permutation test does not already refuse: (state, resamples used)."""
    used = resamples
    state = bootstrap_state(boot(used), alpha, threshold)
    while state == UNSURE and state_p != FAIL and used < MC_CAP * resamples:
        used *= 2
        state = bootstrap_state(boot(used), alpha, threshold)
    return state, used


def _floor(y, b, num_classes, average, threshold, alpha, resamples, permutations, seed):
    """(difference, j) for the first j where the champion with its j cheapest errors fixed
    (`CheapestFixes`) is promoted by the superiority rule, run as `decide` would run it on that
    challenger; (None, None) if none is. Any challenger's permutation p is at least 2**-j for
    j images in its favour, so fewer than `min_images` are skipped; and as fixing an error
    never lowers a resampled difference, a bootstrap that fails with every error fixed fails
    for all j."""
    labels = scored_labels(y, b, b, num_classes, average)
    fixes = CheapestFixes(y, b, labels, average)
    boot = FixedBootstrap(y, b, fixes, labels, average, seed)
    k = min_images(alpha)
    for j in range(k if k <= EXACT_MAX else 1, fixes.count + 1):
        if j == 64 and bootstrap_state(PairedBootstrap(y, y, b, labels, average, seed).first(
                resamples), alpha, threshold) == FAIL:
            break
        if bootstrap_state(boot.differences(j, resamples), alpha, threshold) == FAIL:
            continue
        a = b.copy()
        a[fixes.first(j)] = y[fixes.first(j)]
        p, used, exact = permutation_p(y, a, b, num_classes, average, permutations,
                                       _permutation_seed(seed), alpha)
        state_p = permutation_state(p, used, exact, alpha)
        state_b, _ = _resolve(lambda r: boot.differences(j, r), state_p, threshold, alpha,
                              resamples)
        if state_p == PASS and state_b == PASS:
            return fixes.differences[j - 1], j
    return None, None


def _per_class(y, a, b, labels, average, class_differences, confidence):
    tp_a, pred_a, actual = class_counts(y, a, labels)
    tp_b, pred_b, _ = class_counts(y, b, labels)
    f1_a = f1_from_counts(tp_a, pred_a, actual, average)[0]
    f1_b = f1_from_counts(tp_b, pred_b, actual, average)[0]
    tail = (1 - confidence) / 2
    low, high = np.quantile(class_differences, [tail, 1 - tail], axis=0)
    return [{"class": int(c), "support": int(actual[i]), "f1_challenger": float(f1_a[i]),
             "f1_champion": float(f1_b[i]), "difference": float(f1_a[i] - f1_b[i]),
             "ci_low": float(low[i]), "ci_high": float(high[i])} for i, c in enumerate(labels)]


def _reason(rule, states, p, alpha, exact, draws, low, high, threshold, confidence):
    """The decision in words; `draws`: (permutations, resamples) used."""
    interval = f"the {confidence:.0%} interval of the F1 difference [{low:+.4f}, {high:+.4f}]"
    state_p, state_b = states
    close = [f"the interval's lower bound {low:+.4f} against {threshold:+.4f} after "
             f"{draws[1]:,} resamples"] if state_b == UNSURE else []
    if rule == "non-inferiority":
        pb = f"bootstrap p = {p:.4g}"
        if state_b == PASS:
            return (f"not worse by more than {-threshold:.4f} (non-inferiority, not "
                    f"superiority): {interval} lies above {threshold:+.4f} ({pb})")
        if state_b == FAIL:
            return (f"may be worse by more than {-threshold:.4f}: {interval} reaches "
                    f"{threshold:+.4f} or below ({pb})")
        return f"{TOO_CLOSE}: {close[0]}; not promoted"
    sign = "<" if p < alpha else ">="
    pt = (f"permutation p = {p:.4g} {sign} {alpha:.3g} (one-sided, "
          f"{'exact' if exact else f'{draws[0]:,} random assignments'})")
    if state_p == PASS and state_b == PASS:
        return f"the challenger is better: {pt}, and {interval} lies above {threshold:+.4f}"
    if FAIL in states:
        failed = [pt] if state_p == FAIL else []
        if state_b == FAIL:
            failed.append(f"{interval} reaches {threshold:+.4f} (registry.min_f1_gain) or below")
        return "not shown to be better: " + "; ".join(failed)
    if state_p == UNSURE:
        se = (p * (1 - p) / draws[0]) ** 0.5
        close.insert(0, f"permutation p = {p:.4g} +- {3 * se:.2g} (3 standard errors, "
                        f"{draws[0]:,} random assignments) against {alpha:.3g}")
    return f"{TOO_CLOSE}: " + "; ".join(close) + "; not promoted"


def decide(labels, challenger, champion, num_classes: int, average: str = "auto", *,
           confidence: float = 0.95, min_gain: float = 0.0, non_inferior: float | None = None,
           resamples: int = DEFAULT_RESAMPLES, permutations: int = DEFAULT_PERMUTATIONS,
           seed: int = 0, seed_set: bool = False, max_class_drop: float | None = None,
           force: bool = False) -> PairedDecision:
    """Promote or not, from per-image results: `labels`, and the class index each model
    predicted for the same images, in the same order. `seed` drives every random draw (callers
    derive it with `derive_seed` unless the user set one: `seed_set`). `force` promotes
    whatever the evidence, and says so."""
    y, a, b = _inputs(labels, challenger, champion, confidence)
    average, alpha = resolve_average(average, num_classes), (1 - confidence) / 2
    right_a, right_b = a == y, b == y
    counts = dict(both_right=int(np.sum(right_a & right_b)),
                  challenger_only=int(np.sum(right_a & ~right_b)),
                  champion_only=int(np.sum(~right_a & right_b)),
                  both_wrong=int(np.sum(~right_a & ~right_b)))
    labs = scored_labels(y, a, b, num_classes, average)
    boot = PairedBootstrap(y, a, b, labs, average, seed)
    if non_inferior is not None:
        rule, threshold = "non-inferiority", -float(non_inferior)
        state_p, perms, exact = PASS, 0, False
    else:
        rule, threshold = "superiority", float(min_gain)
        p, perms, exact = permutation_p(y, a, b, num_classes, average, permutations,
                                        _permutation_seed(seed), alpha)
        state_p = permutation_state(p, perms, exact, alpha)
    state_b, used = _resolve(boot.first, state_p, threshold, alpha, resamples)
    diffs = boot.first(used)
    if rule == "non-inferiority":
        p = float(np.mean(diffs <= threshold))
    low, high = (float(q) for q in np.quantile(diffs, [alpha, 1 - alpha]))
    promote = state_p == PASS and state_b == PASS
    uncertain = not promote and FAIL not in (state_p, state_b)
    reason = _reason(rule, (state_p, state_b), p, alpha, exact, (perms, used), low, high,
                     threshold, confidence)
    per_class = _per_class(y, a, b, labs, average, boot.class_differences[:used], confidence)
    drops = [c for c in per_class
             if max_class_drop is not None and c["difference"] < -max_class_drop]
    if drops:
        promote = False
        reason = ("a class gets worse: " + ", ".join(
            f"class #{c['class']} F1 {c['difference']:+.4f}" for c in drops)
            + f" (more than registry.max_class_drop {max_class_drop:.4f}); {reason}")
    floor, floor_images = (None, None) if rule == "non-inferiority" else _floor(
        y, b, num_classes, average, threshold, alpha, resamples, permutations, seed)
    f1_a, f1_b = (float(f1_from_counts(*class_counts(y, m, labs), average)[1]) for m in (a, b))
    if promote and rule == "superiority" and (floor is None
                                              or f1_a - f1_b < floor - FLOOR_TOLERANCE):
        promote = False
        reason = ("below the floor: the difference is smaller than the least this rule "
                  "promotes on these images against this champion ("
                  + ("none can be promoted" if floor is None else f"{floor:+.4f}")
                  + f"), although {reason.removeprefix('the challenger is better: ')}")
    if force and not promote:
        rule, promote, reason = "forced", True, f"forced against the evidence ({reason})"
    return PairedDecision(
        promote=promote, reason=reason, rule=rule, threshold=threshold, n=len(y), **counts,
        p_value=float(p), p_test="bootstrap" if non_inferior is not None else "permutation",
        alpha=alpha, permutations=perms, permutation_exact=exact,
        mcnemar_p=mcnemar_exact(counts["challenger_only"], counts["champion_only"]),
        mcnemar_favours=mcnemar_favours(counts["challenger_only"], counts["champion_only"]),
        f1_challenger=f1_a, f1_champion=f1_b, difference=f1_a - f1_b, ci_low=low, ci_high=high,
        confidence=confidence, resamples=used, mc_uncertain=uncertain, seed=int(seed),
        seed_set=bool(seed_set), average=average, floor=floor, floor_images=floor_images,
        max_class_drop=max_class_drop, per_class=per_class, differences=diffs)


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
    ax.set_title((title + "\n" if title else "")
                 + f"{verdict}; {d.p_test} p = {d.p_value:.3g} (one-sided, alpha "
                 f"{d.alpha:.3g})\naccuracy check, McNemar p = {d.mcnemar_p:.3g} "
                 f"({d.challenger_only} vs {d.champion_only} images only one model gets right)",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
