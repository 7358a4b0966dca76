"""Extending a finished sweep: what is left to run, which evaluation is the latest, what a
seeded Optuna is told, and the refusals (no Ray, no MLflow)."""

from __future__ import annotations

import pytest

from components.config import ConfigError
from pipelines.compose import _check_larger, load_config
from pipelines.steps.extend import Extension, best_prefix, grid_left

pytestmark = pytest.mark.integration   # opens a SQLite MLflow store


def test_grid_left_subtracts_what_ran_as_a_multiset_keeping_the_order():
    a, b, c = {"x": 1}, {"x": 2}, {"x": 3}
    assert grid_left([a, b, c, a, b, c], [a, b, c]) == [a, b, c]      # num_samples 1 -> 2
    assert grid_left([a, b, c], [c]) == [a, b]                           # max_trials 1 -> 3
    assert grid_left([a, b], [a, b]) == []
    assert grid_left([{"x": 0.2}], [{"x": 0.20}]) == []                  # the same value


def test_extension_names_and_draw_streams():
    ext = Extension("vt-1", 2)
    assert ext.suffix == "-x2" and ext.experiment == "vt-1-x2"
    assert ext.earlier == ("vt-1", "vt-1-x1")
    assert Extension("vt-1", 0).experiment == "vt-1" and Extension("vt-1", 0).suffix == ""
    assert len({Extension("vt-1", k).seed(0) for k in range(3)}) == 3


def test_the_latest_evaluation_names_the_best_trial():
    params = {"best_trial_id": "a", "best.train.lr": "0.1", "x1.search.num_samples": "4",
              "x2.best_trial_id": "c", "x2.best.train.lr": "0.3"}
    assert best_prefix(params) == "x2."
    assert best_prefix({"best_trial_id": "a"}) == ""
    from pipelines.training import best_params_of

    assert best_params_of(params) == {"train.lr": "0.3"}


def _cfg(*over):
    return load_config(["search.mode=random", "search.budget=null",
                        "search.space={train.lr: {loguniform: [0.001, 0.1]}}", *over])


def test_an_extension_must_add_trials_or_time():
    _check_larger("vt-1", _cfg("search.num_samples=4"), _cfg("search.num_samples=2"))
    with pytest.raises(ConfigError, match="planned 2 trials and this budget plans 2"):
        _check_larger("vt-1", _cfg("search.num_samples=2"), _cfg("search.num_samples=2"))
    _check_larger("vt-1", _cfg("search.budget=5m"), _cfg("search.budget=2m"))
    with pytest.raises(ConfigError, match="search.budget=1m is not larger than the run's 2m"):
        _check_larger("vt-1", _cfg("search.budget=1m"), _cfg("search.budget=2m"))


def test_seeded_optuna_is_told_the_trials_inside_its_space():
    from ray import tune

    from components.tuning.seeded import SeededOptuna

    seeds = (({"train.lr": 0.01, "train.optimizer": "adam"}, 0.9),
             ({"train.lr": 0.5, "train.optimizer": "adam"}, 0.8),       # lr outside: left out
             ({"train.lr": 0.002}, 0.7))                                # optimizer n/a: filled
    searcher = SeededOptuna(seeds, metric="best_val_f1", mode="max", seed=0)
    assert searcher.set_search_properties(
        "best_val_f1", "max", {"train.lr": tune.loguniform(0.001, 0.1),
                               "train.optimizer": tune.choice(["adam", "sgd"])})
    assert searcher.told == [({"train.lr": 0.01, "train.optimizer": "adam"}, 0.9),
                             ({"train.lr": 0.002, "train.optimizer": "adam"}, 0.7)]
    assert searcher.suggest("t1")["train.lr"] > 0   # and it goes on suggesting


def test_extend_refuses_a_run_that_did_not_finish_in_one_line(tmp_path):
    """A KILLED run is continued with --resume, not extended; the message says how."""
    import yaml

    from components.config import to_dict
    from components.tracking import PipelineRecord, Tracker
    from pipelines.compose import extend_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg("search.num_samples=2", f"tracking.uri={uri}")
    tracker = Tracker(uri)
    exp = tracker.ensure_experiment("visiontune", str(tmp_path / "art"))
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    record = PipelineRecord.create(tracker, exp, "vt-killed", {}, {}, text)
    record.close("KILLED")
    with pytest.raises(ConfigError, match=r"^--extend vt-killed: the run did not finish "
                                          r"\(status KILLED\); continue it with: visiontune "
                                          r"run --resume vt-killed$"):
        extend_config("vt-killed", ["search.num_samples=4", f"tracking.uri={uri}"])
    with pytest.raises(ConfigError, match="needs a larger budget"):
        extend_config("vt-killed", [f"tracking.uri={uri}"])


def test_a_seed_off_the_grid_of_a_stepped_or_integer_axis_is_left_out():
    """Another run's uniform dropout 0.25 is not on this run's quniform 0.1 steps, a float
    batch size is not an integer: Optuna would refuse them and fail the sweep."""
    from ray import tune

    from components.tuning.seeded import SeededOptuna

    seeds = (({"model.dropout": 0.25, "train.batch_size": 16}, 0.9),
             ({"model.dropout": 0.3, "train.batch_size": 32.5}, 0.8),
             ({"model.dropout": 0.3, "train.batch_size": 32}, 0.7))
    searcher = SeededOptuna(seeds, metric="best_val_f1", mode="max", seed=0)
    assert searcher.set_search_properties(
        "best_val_f1", "max", {"model.dropout": tune.quniform(0.0, 0.5, 0.1),
                               "train.batch_size": tune.randint(8, 65)})
    assert [v for _, v in searcher.told] == [0.7]
    from pipelines.steps.extend import _holds

    dropout, batch = parse_space_axes()
    assert not _holds(dropout, 0.25) and _holds(dropout, 0.3)
    assert not _holds(batch, 32.5) and _holds(batch, 32) and _holds(batch, None)


def parse_space_axes():
    from components.tuning.space import parse_space

    return parse_space({"model.dropout": {"quniform": [0.0, 0.5, 0.1]},
                        "train.batch_size": {"randint": [8, 64]}})


def test_the_sampler_never_fails_the_trial_that_it_measures():
    from components.tracking.system_metrics import SystemSampler

    class Gone:
        def log_metrics(self, *a, **k):
            raise ConnectionError("tracking server gone")

    sampler = SystemSampler(Gone(), "r1", every_s=60).start()
    assert sampler.stop() >= 0.0        # no exception: one line on the trial's log instead


def _record(tmp_path, tags: dict, status: str = "FINISHED"):
    import yaml

    from components.config import to_dict
    from components.tracking import PipelineRecord, Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    exp = tracker.ensure_experiment("visiontune", str(tmp_path / "art"))
    cfg = _cfg("search.num_samples=2", f"tracking.uri={uri}")
    record = PipelineRecord.create(tracker, exp, "vt-x", {}, {"best_trial_id": "a"},
                                   yaml.safe_dump(to_dict(cfg), sort_keys=False))
    record.set_tags(tags)
    record.close(status)
    return record, uri


def test_the_best_so_far_is_the_trial_behind_the_registered_version(tmp_path):
    """An extension that evaluated a new best but was stopped before registering it has not
    replaced the registered one: its resume must register, not call it unchanged."""
    from pipelines.steps.extend import best_so_far

    record, _ = _record(tmp_path, {"visiontune.registered_version": "1"})
    assert best_so_far(record) == "a"           # a run from before the tag
    record.tracker.log_params(record.run_id, {"x1.best_trial_id": "b"})
    assert best_so_far(record) == "a"           # evaluated, not registered
    record.set_tags({"visiontune.registered_trial": "b"})
    assert best_so_far(record) == "b"


def test_extend_refuses_a_run_whose_extension_stopped(tmp_path):
    from pipelines.compose import extend_config

    _, uri = _record(tmp_path, {"visiontune.extension_state": "stopped",
                                "visiontune.extensions": "1"})
    with pytest.raises(ConfigError, match=r"its last extension did not finish; continue it "
                                          r"with: visiontune run --resume vt-x$"):
        extend_config("vt-x", ["search.num_samples=6", f"tracking.uri={uri}"])
