"""Which hyperparameters mattered: fANOVA importance and marginal effects, checked against
sums of squares and t-intervals written out here with numpy and scipy."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from components.evaluation.importance import (
    min_trials,
    param_importance,
    plot_importance,
    plot_marginal_effects,
)
from components.tuning.space import parse_space

COURSE = {"model.initializer": {"grid": ["zeros", "kaiming_normal"]},
          "train.optimizer": {"grid": ["adam", "nadam"]},
          "model.dropout": {"grid": [0.0, 0.2]}}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _course_board(seed=1) -> pd.DataFrame:
    """The course grid: zero weights cannot learn (chance F1), the optimizer a little, dropout
    nothing but noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, o, d in itertools.product(["zeros", "kaiming_normal"], ["adam", "nadam"], [0.0, 0.2]):
        rows.append({"trial_id": f"t{len(rows)}", "model.initializer": i,
                     "train.optimizer": o, "model.dropout": d,
                     "best_val_f1": (0.1 if i == "zeros" else 0.9)
                     + (0.03 if o == "adam" else 0.0) + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


def _main_effect_shares(board: pd.DataFrame, keys: list[str]) -> dict[str, float]:
    """Between-group sum of squares of each axis over a balanced grid, as shares."""
    y = board["best_val_f1"]
    ss = {k: sum(len(g) * (g.mean() - y.mean()) ** 2 for _, g in y.groupby(board[k]))
          for k in keys}
    total = sum(ss.values())
    return {k: v / total for k, v in ss.items()}


def test_the_course_grid_ranks_the_initializer_first_as_anova_does():
    board = _course_board()
    result = param_importance(board, parse_space(COURSE))
    assert result.ranked and result.trials == 8
    shares = _main_effect_shares(board, list(COURSE))
    assert list(result.table["param"]) == sorted(shares, key=shares.get, reverse=True)[:3]
    top = result.table.iloc[0]
    assert top["param"] == "model.initializer"
    assert abs(top["importance"] - shares["model.initializer"]) < 0.05
    assert result.table["importance"].sum() == pytest.approx(1.0, abs=1e-6)
    assert (result.table["low"] <= result.table["importance"] + 1e-9).all()
    assert (result.table["importance"] <= result.table["high"] + 1e-9).all()
    assert result.note.startswith("importance (fANOVA over 8 trials")


def test_marginal_effects_are_the_means_with_t_intervals_of_the_trials_sharing_a_value():
    board = _course_board()
    effects = param_importance(board, parse_space(COURSE)).effects
    for key in COURSE:
        for value, group in board.groupby(board[key].astype(str)):
            row = effects[(effects.param == key) & (effects.value == value)].iloc[0]
            f1 = group["best_val_f1"].to_numpy()
            half = stats.t.ppf(0.975, len(f1) - 1) * f1.std(ddof=1) / np.sqrt(len(f1))
            assert row.n == len(f1)
            assert row.mean_val_f1 == pytest.approx(f1.mean())
            assert row.low == pytest.approx(max(f1.mean() - half, 0.0))
            assert row.high == pytest.approx(min(f1.mean() + half, 1.0))


def test_too_few_trials_are_not_ranked_and_say_how_many_are_needed():
    board = _course_board().iloc[:5]
    result = param_importance(board, parse_space(COURSE))
    assert not result.ranked
    assert min_trials(3) == 6
    assert result.note == ("importance: not ranked: 5 trials with a val F1 for 3 searched "
                           "axes, at least 6 needed")
    assert plot_importance(result) is None
    assert not result.effects.empty   # the means are still shown, with their n


def test_failed_trials_and_unvaried_axes_are_left_out():
    board = _course_board()
    board.loc[0, "best_val_f1"] = np.nan
    board["train.batch_size"] = 32
    axes = parse_space({**COURSE, "train.batch_size": {"grid": [32]}})
    result = param_importance(board, axes)
    assert result.trials == 7
    assert "train.batch_size" not in set(result.table["param"])
    assert "train.batch_size" not in set(result.effects["param"])


def test_a_conditional_axis_that_did_not_apply_is_its_own_value():
    """momentum applies to SGD only: its 'n/a' rows are a category, not dropped trials; a
    continuous conditional axis is filled at its low end so every trial still counts."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(12):
        sgd = k % 2 == 0
        rows.append({"train.optimizer": "sgd_momentum" if sgd else "adam",
                     "train.momentum": (0.8, 0.9)[k // 2 % 2] if sgd else np.nan,
                     "train.lr": rng.uniform(1e-3, 1e-1) if sgd else np.nan,
                     "best_val_f1": (0.6 if sgd else 0.8) + rng.normal(0, 0.02)})
    axes = parse_space({"train.optimizer": {"choice": ["sgd_momentum", "adam"]},
                        "train.momentum": {"choice": [0.8, 0.9],
                                           "when": {"train.optimizer": ["sgd_momentum"]}},
                        "train.lr": {"loguniform": [1e-3, 1e-1],
                                     "when": {"train.optimizer": ["sgd_momentum"]}}})
    result = param_importance(pd.DataFrame(rows), axes)
    assert result.trials == 12 and result.ranked
    assert set(result.table["param"]) == {"train.optimizer", "train.momentum", "train.lr"}
    momentum = result.effects[result.effects.param == "train.momentum"]
    assert list(momentum["value"]) == ["0.8", "0.9", "n/a"]
    assert momentum["n"].sum() == 12
    # the continuous axis is cut into quartiles of the drawn values plus its 'n/a'
    lr = result.effects[result.effects.param == "train.lr"]
    assert lr["n"].sum() == 12 and "n/a" in set(lr["value"])
    assert not any(v.startswith("-") for v in lr["value"])   # named by the values drawn


def test_all_trials_scoring_the_same_are_not_ranked():
    board = _course_board().assign(best_val_f1=0.5)
    result = param_importance(board, parse_space(COURSE))
    assert not result.ranked and "all 8 trials scored the same" in result.note


def test_the_plots_name_every_axis_and_show_the_counts():
    result = param_importance(_course_board(), parse_space(COURSE))
    fig = plot_importance(result)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert sorted(labels) == sorted(COURSE)
    assert labels[-1] == "model.initializer"     # most important on top
    fig = plot_marginal_effects(result)
    assert [ax.get_title() for ax in fig.axes] == list(COURSE)
    assert all(t.get_text() == "n=4" for ax in fig.axes for t in ax.texts)
