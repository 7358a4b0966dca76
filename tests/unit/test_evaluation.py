import pytest

from components.evaluation import leaderboard, select_best_trial
from components.evaluation.evaluate import NoUsableTrialError
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
