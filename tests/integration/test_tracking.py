"""The MLflow adapter on a SQLite store in a temp dir (no server, no Ray)."""

import pytest

from components.tracking import EpochLogger, Tracker, flatten

pytestmark = pytest.mark.integration   # opens a SQLite MLflow store


@pytest.fixture
def tracker(tmp_path):
    t = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp = t.ensure_experiment("unit", str(tmp_path / "artifacts"))
    parent = t.create_run(exp, "pipeline", {"visiontune.role": "pipeline"})
    return t, exp, parent


def test_retried_trial_continues_its_child_run(tracker):
    t, exp, parent = tracker
    first = t.get_or_create_trial_run(exp, parent, "trial_1", "vt_trial_1", {"train.lr": 0.1})
    t.end_run(first, "FAILED")
    again = t.get_or_create_trial_run(exp, parent, "trial_1", "vt_trial_1", {"train.lr": 0.1})
    assert again == first and t.run_status(first) == "RUNNING"
    other = t.get_or_create_trial_run(exp, parent, "trial_2", "vt_trial_2", {"train.lr": 0.2})
    assert other != first
    runs = t.child_runs(exp, parent)
    assert {r.info.run_id for r in runs} == {first, other}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs)
    assert t.client.get_run(first).data.params == {"train.lr": "0.1"}


def test_epoch_logger_never_logs_an_epoch_twice(tracker):
    t, exp, parent = tracker
    run = t.get_or_create_trial_run(exp, parent, "trial", "trial", {})
    logger = EpochLogger(t, run)
    assert logger.log_epoch(1, {"val_f1": 0.5}) and logger.log_epoch(2, {"val_f1": 0.6})
    # a restarted worker group resumes from the epoch-1 checkpoint and replays epoch 2
    restarted = EpochLogger(t, run)
    assert restarted.last_logged_epoch == 2
    assert not restarted.log_epoch(2, {"val_f1": 0.61})
    assert restarted.log_epoch(3, {"val_f1": 0.7})
    history = t.metric_history(run, "val_f1")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6), (3, 0.7)]


def test_closing_only_runs_left_running(tracker):
    t, exp, parent = tracker
    finished = t.get_or_create_trial_run(exp, parent, "a", "a", {})
    t.end_run(finished, "FINISHED")
    stopped = t.get_or_create_trial_run(exp, parent, "b", "b", {})
    t.end_run_if_running(finished, "KILLED")
    t.end_run_if_running(stopped, "KILLED")
    assert t.run_status(finished) == "FINISHED" and t.run_status(stopped) == "KILLED"


def test_params_are_flattened_and_batched(tracker):
    t, exp, parent = tracker
    params = {f"k{i}": i for i in range(250)} | {"nested": {"a": 1, "b": {"c": 2}}}
    t.log_params(parent, params)
    logged = t.client.get_run(parent).data.params
    assert len(logged) == 252 and logged["nested.b.c"] == "2"
    assert flatten({"search": {"space": {"train.lr": {"grid": [1]}}}}) == \
        {"search.space": {"train.lr": {"grid": [1]}}}


def test_artifact_location_is_absolute(tracker, tmp_path):
    t, exp, _ = tracker
    assert t.client.get_experiment(exp).artifact_location == (tmp_path / "artifacts").as_uri()


def test_store_watch_says_lost_only_after_failures_in_a_row(tmp_path):
    from components.tracking import StoreWatch
    from tests.conftest import free_port

    port = free_port()
    gone = StoreWatch(Tracker(f"http://127.0.0.1:{port}"), every_s=0, failures=2)
    assert gone.lost() is False  # one failed check is not yet "lost"
    assert gone.lost() is True
    here = StoreWatch(Tracker(f"sqlite:///{tmp_path}/mlflow.db"), every_s=0, failures=1)
    assert [here.lost() for _ in range(3)] == [False, False, False]
    paced = StoreWatch(Tracker(f"http://127.0.0.1:{port}"), every_s=3600, failures=1)
    assert paced.lost() is False  # no check before every_s has passed


def test_a_dataset_logged_by_two_runs_at_once_is_linked_to_both(tracker, monkeypatch):
    """The SQL store looks a dataset up, then inserts it: of two runs logging the same one at
    once, the slower insert fails on the unique key (the CI run of two concurrent promotes).
    Here the other run's insert lands first and the store answers as it did then."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    t, exp, first = tracker
    second = t.create_run(exp, "promotion", {})
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "label": [0, 1]})
    real, calls = t.client.log_inputs, []

    def racing(run_id, datasets=None, **kw):
        calls.append(run_id)
        if len(calls) == 1:
            t.log_datasets(first, [("images", "evaluation", frame)], "/data", "d" * 64)
            raise MlflowException("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint "
                                  "failed: datasets.experiment_id, datasets.name, datasets.digest")
        return real(run_id, datasets=datasets, **kw)

    monkeypatch.setattr(t.client, "log_inputs", racing)
    t.log_datasets(second, [("images", "evaluation", frame)], "/data", "d" * 64)
    assert calls == [second, first, second]
    for run in (first, second):
        inputs = t.client.get_run(run).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("images", "d" * 36)]

    def broken(run_id, datasets=None, **kw):
        calls.append(run_id)
        raise MlflowException("INVALID_PARAMETER_VALUE: something else")

    monkeypatch.setattr(t.client, "log_inputs", broken)
    calls.clear()
    with pytest.raises(MlflowException, match="something else"):
        t.log_datasets(second, [("images", "evaluation", frame)], "/data", "d" * 64)
    assert calls == [second]      # only a duplicate key is retried


def test_a_step_runs_once_and_a_resumed_run_reads_its_result_back(tracker):
    """`PipelineRecord.run_step`: computed and saved once, tagged done only after both; a
    resumed run loads the saved result (or recomputes it, unsaved, without `load`); a step
    that failed while saving runs again."""
    from components.tracking import PipelineRecord
    from tests.conftest import log_lines

    t, exp, parent = tracker
    record = PipelineRecord(t, exp, parent, "vt-test")
    calls = []

    def compute(x):
        calls.append(("compute", x))
        return x * 2

    def save(value):
        calls.append(("save", value))
        record.log_metrics({"doubled": value})

    assert record.run_step("double", lambda: compute(21), save,
                           load=lambda: "from the record") == 42
    assert calls == [("compute", 21), ("save", 42)] and record.step_done("double")
    # resumed: compute does not run again, nothing is saved twice
    with log_lines("components.tracking.record") as lines:
        assert record.run_step("double", lambda: compute(1), save,
                               load=lambda: "loaded") == "loaded"
    assert calls == [("compute", 21), ("save", 42)]
    assert "[visiontune] double: done before; its result read back from the run" in lines
    # without `load`: computed again, not saved
    assert record.run_step("double", lambda: compute(5), save) == 10
    assert calls[-1] == ("compute", 5) and ("save", 10) not in calls
    # ... and a failure while computing it again leaves the step done (saved once)
    with pytest.raises(ZeroDivisionError):
        record.run_step("double", lambda: 1 / 0, save)
    assert record.step_done("double")
    assert [m.value for m in t.metric_history(parent, "doubled")] == [42]

    def broken_save(value):
        raise OSError("store lost")

    with pytest.raises(OSError):
        record.run_step("fragile", lambda: compute(1), broken_save)
    assert not record.step_done("fragile")
    assert t.client.get_run(parent).data.tags["visiontune.step.fragile"] == "failed"
    assert record.run_step("fragile", lambda: compute(3), save) == 6


def test_a_table_is_logged_as_a_csv_artifact(tracker, tmp_path):
    import pandas as pd

    t, exp, parent = tracker
    frame = pd.DataFrame({"trial_id": ["a", "b"], "best_val_f1": [0.9, 0.8]})
    t.log_table(parent, frame, "evaluation/leaderboard.csv")
    t.log_table(parent, frame.head(1), "top.csv")
    got = pd.read_csv(t.client.download_artifacts(parent, "evaluation/leaderboard.csv",
                                                  str(tmp_path)))
    assert got.equals(frame)
    assert [a.path for a in t.client.list_artifacts(parent)] == ["evaluation", "top.csv"]
