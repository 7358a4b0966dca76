"""Which searched axes mattered (pure: numpy, pandas, Optuna's evaluator, matplotlib).

Two answers, each with what it rests on:
- importance: the share of the variance of the trials' best val F1 that each searched axis
  explains, by fANOVA (Optuna's `FanovaImportanceEvaluator`: a random forest fitted on the
  trials, its variance decomposed per axis), normalised to sum to 1, with a 95% bootstrap
  interval over the trials. Not ranked with fewer than `min_trials(axes)` trials with a score:
  a forest on fewer points than twice the axes ranks noise.
- marginal effects: for each axis, every value's mean best val F1 over the trials that share
  it, with a 95% t-interval (the course's question "which initializer?", answered by data).
  A continuous axis is cut into quartiles of the values the trials drew.

A conditional axis (`when:`) that did not apply to a trial is its own category ("n/a") for a
categorical axis; for a continuous one it is set to the axis's low end, and the axis it
depends on (also searched, or fixed) carries the difference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from components.evaluation.search_plots import METRIC, MISSING, _labels, _scored, _text  # noqa: E402

BOOTSTRAP = 40           # resamples for the importance interval
N_TREES = 32
MIN_TRIALS_FLOOR = 6


def min_trials(n_axes: int) -> int:
    """Trials with a score needed before axes are ranked: twice the axes, at least 6."""
    return max(MIN_TRIALS_FLOOR, 2 * n_axes)


@dataclass
class Importance:
    table: pd.DataFrame      # param, importance, low, high (best first); empty when not ranked
    effects: pd.DataFrame    # param, value, n, mean_val_f1, low, high
    trials: int              # trials with a score it rests on
    note: str                # one line: what it rests on, or why it does not rank

    @property
    def ranked(self) -> bool:
        return not self.table.empty


def searched_axes(board: pd.DataFrame, axes) -> list:
    """The axes (objects with .key, .kind, .args) whose value differs between scored trials."""
    df = _scored(board, [a.key for a in axes])
    return [a for a in axes if _text(df[a.key]).nunique() > 1]


def _distribution(axis, values: pd.Series):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    if axis.is_categorical:
        return CategoricalDistribution(sorted(set(_text(values))))
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    low = min([float(axis.args[0]), *numbers]) if len(axis.args) else float(numbers.min())
    high = max([float(axis.args[1]), *numbers]) if len(axis.args) > 1 else float(numbers.max())
    if axis.kind == "randint":
        return IntDistribution(int(low), int(high))
    return FloatDistribution(low, high, log=axis.kind == "loguniform")


def _encode(df: pd.DataFrame, axes) -> tuple[list[dict], dict]:
    """Each trial's parameters as Optuna values (inactive axes filled as the module says)."""
    dists = {a.key: _distribution(a, df[a.key]) for a in axes}
    rows = []
    for _, row in df.iterrows():
        params = {}
        for a in axes:
            d, v = dists[a.key], row[a.key]
            if a.is_categorical:
                params[a.key] = MISSING if pd.isna(v) else str(v)
            elif pd.isna(v):
                params[a.key] = d.low
            else:
                params[a.key] = int(v) if a.kind == "randint" else float(v)
        rows.append(params)
    return rows, dists


def _fanova(rows: list[dict], dists: dict, scores, seed: int) -> dict[str, float] | None:
    """Normalised fANOVA importances of one set of trials; None when the score is constant."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    if float(np.ptp(scores)) < 1e-12:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.add_trials([optuna.trial.create_trial(params=p, distributions=dists, value=float(s))
                      for p, s in zip(rows, scores)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = get_param_importances(study, params=list(dists), normalize=True,
                                    evaluator=FanovaImportanceEvaluator(n_trees=N_TREES,
                                                                        seed=seed))
    return {k: float(got.get(k, 0.0)) for k in dists}


def param_importance(board: pd.DataFrame, axes, seed: int = 0,
                     bootstrap: int = BOOTSTRAP) -> Importance:
    """Importance and marginal effects of the searched `axes` over the leaderboard's scored
    trials (see the module docstring for the rules)."""
    varied = searched_axes(board, axes)
    df = _scored(board, [a.key for a in axes]).reset_index(drop=True)
    effects = marginal_effects(df, varied)
    empty = pd.DataFrame(columns=["param", "importance", "low", "high"])
    need = min_trials(len(varied))
    if not varied:
        return Importance(empty, effects, len(df), "importance: no searched axis varies")
    if len(df) < need:
        return Importance(empty, effects, len(df),
                          f"importance: not ranked: {len(df)} trials with a val F1 for "
                          f"{len(varied)} searched axes, at least {need} needed")
    rows, dists = _encode(df, varied)
    scores = df[METRIC].to_numpy(float)
    point = _fanova(rows, dists, scores, seed)
    if point is None:
        return Importance(empty, effects, len(df),
                          f"importance: not ranked: all {len(df)} trials scored the same")
    rng = np.random.default_rng(seed)
    draws = []
    for b in range(bootstrap):
        pick = rng.integers(0, len(df), len(df))
        got = _fanova([rows[i] for i in pick], dists, scores[pick], seed + b + 1)
        if got is not None:
            draws.append([got[k] for k in dists])
    draws = np.array(draws) if draws else np.full((1, len(dists)), np.nan)
    table = pd.DataFrame({"param": list(dists), "importance": [point[k] for k in dists],
                          "low": np.nanpercentile(draws, 2.5, axis=0),
                          "high": np.nanpercentile(draws, 97.5, axis=0)})
    table = table.sort_values("importance", ascending=False).reset_index(drop=True)
    return Importance(table, effects, len(df),
                      f"importance (fANOVA over {len(df)} trials, 95% bootstrap interval): " +
                      ", ".join(f"{r.param} {r.importance:.2f}" for r in table.itertuples()))


def _groups(df: pd.DataFrame, axis) -> pd.Series:
    """The value label each trial has on `axis`: its category, or its quartile of a
    continuous axis with more than four distinct values."""
    values = df[axis.key]
    numbers = pd.to_numeric(values, errors="coerce")
    if axis.is_categorical or numbers.nunique() <= 4:
        return _text(values)
    bins = pd.qcut(numbers, 4, duplicates="drop")
    # named by the values drawn in each quartile (qcut's own edges reach below the smallest)
    span = numbers.groupby(bins, observed=True).agg(["min", "max"])
    names = {b: f"Q{i + 1}: {lo:.3g} to {hi:.3g}"        # numbered: never two alike
             for i, (b, (lo, hi)) in enumerate(span.iterrows())}
    labels = bins.map(lambda b: names.get(b, MISSING))
    return labels.astype(object).where(numbers.notna(), MISSING).astype(str)


def marginal_effects(df: pd.DataFrame, axes) -> pd.DataFrame:
    """param, value, n, mean_val_f1, low, high: a 95% t-interval of the mean over the n
    trials that share the value, clipped to [0, 1] where F1 lives (none with n = 1)."""
    from scipy import stats

    out = []
    for a in axes:
        groups = _groups(df, a)
        order = (_labels(groups) if a.is_categorical or groups.nunique() <= 4
                 else list(dict.fromkeys(groups.iloc[np.argsort(
                     pd.to_numeric(df[a.key], errors="coerce").fillna(-np.inf).to_numpy())])))
        for value in order:
            f1 = df.loc[groups == value, METRIC].to_numpy(float)
            n, mean = len(f1), float(f1.mean())
            half = (float(stats.t.ppf(0.975, n - 1) * f1.std(ddof=1) / np.sqrt(n))
                    if n > 1 else np.nan)
            out.append({"param": a.key, "value": value, "n": n, "mean_val_f1": mean,
                        "low": max(mean - half, 0.0), "high": min(mean + half, 1.0)})
    return pd.DataFrame(out, columns=["param", "value", "n", "mean_val_f1", "low", "high"])


def plot_importance(result: Importance):
    """Horizontal bars, most important on top, with the bootstrap interval; the note as the
    title. None when not ranked."""
    if not result.ranked:
        return None
    t = result.table.iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(t) + 1.6), layout="constrained")
    err = np.vstack([(t["importance"] - t["low"]).clip(lower=0),
                     (t["high"] - t["importance"]).clip(lower=0)])
    ax.barh(t["param"], t["importance"], xerr=err, color="#4c72b0", capsize=3)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the variance of best val F1 (fANOVA)")
    ax.set_title(f"which hyperparameters mattered: {result.trials} trials "
                 "(bars: 95% bootstrap interval)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_marginal_effects(result: Importance):
    """One panel per searched axis: each value's mean best val F1 with its 95% interval and
    the number of trials behind it. None when no axis varies."""
    e = result.effects
    if e.empty:
        return None
    params = list(dict.fromkeys(e["param"]))
    cols = min(3, len(params))   # rows of three: readable in MLflow's artifact preview
    rows = -(-len(params) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.8, 3.2 * rows + 0.6),
                             squeeze=False, sharey=True, layout="constrained")
    for ax in axes.flat[len(params):]:
        ax.set_visible(False)
    for ax, param in zip(axes.flat, params):
        part = e[e["param"] == param].reset_index(drop=True)
        x = np.arange(len(part))
        err = np.vstack([(part["mean_val_f1"] - part["low"]).fillna(0),
                         (part["high"] - part["mean_val_f1"]).fillna(0)])
        ax.errorbar(x, part["mean_val_f1"], yerr=err, fmt="o", capsize=4, color="#dd8452")
        for xi, row in zip(x, part.itertuples()):
            ax.annotate(f"n={row.n}", (xi, row.mean_val_f1), textcoords="offset points",
                        xytext=(6, -3), fontsize=7)
        ax.set_xticks(x, part["value"], rotation=30 if len(part) > 2 else 0, fontsize=8)
        ax.set_xlim(-0.5, len(part) - 0.5)
        ax.set_title(param, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("mean best val F1 (95% interval)")
    fig.suptitle(f"marginal effect of each searched axis over {result.trials} trials",
                 fontsize=10)
    return fig
