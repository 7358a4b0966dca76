import pytest

from components.evaluation import leaderboard, select_best_trial
from components.evaluation.scoring import NoUsableTrialError
from components.tuning.driver import TrialResult


def _t(tid, f1, loss, ckpt="/c", status="FINISHED"):
    return TrialResult(tid, {"train.lr": 0.1}, status, f"run-{tid}", f1, loss, 1, 2, ckpt)


def test_best_by_f1_then_lower_val_loss():
    trials = [_t("a", 0.9, 0.3), _t("b", 0.95, 0.4), _t("c", 0.95, 0.2), _t("d", 0.99, 0.1, None)]
    assert select_best_trial(trials).trial_id == "c"


def test_no_usable_trial_is_an_error():
    with pytest.raises(NoUsableTrialError, match="no trial produced a checkpoint"):
        select_best_trial([_t("a", None, None, None, "FAILED")])


def test_leaderboard_is_ranked():
    board = leaderboard([_t("a", 0.9, 0.3), _t("b", 0.95, 0.4), _t("c", 0.95, 0.2)])
    assert board["trial_id"].tolist() == ["c", "b", "a"]
    assert board["rank"].tolist() == [1, 2, 3] and "train.lr" in board


def test_trial_curves_with_and_without_per_epoch_history():
    """A CV search reports no per-epoch val F1: the chart says so instead of an empty plot
    (matplotlib warned 'No artists with labels found to put in legend')."""
    import warnings

    from components.evaluation.scoring import plot_trial_curves

    with_history = _t("a", 0.9, 0.3)
    with_history.history = {"val_f1": [0.5, 0.7, 0.9]}
    fig = plot_trial_curves([with_history, _t("b", 0.8, 0.4)])
    ax = fig.axes[0]
    assert len(ax.lines) == 1 and ax.get_legend() is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_trial_curves([_t("c", 0.9, 0.3)])
    ax = fig.axes[0]
    assert not ax.lines and ax.get_legend() is None
    assert [t.get_text() for t in ax.texts] == ["no per-epoch val_f1 in the trials' results"]
