import pytest

from components.tuning.plan import ResourceError, plan_resources
from components.tuning.space import count_trials, parse_space, to_tune_space

SPACE = {
    "train.optimizer": {"grid": ["sgd_momentum", "adam", "rmsprop"]},
    "model.initializer": {"grid": ["xavier_uniform", "kaiming_normal"]},
    "model.name": {"grid": ["cnn", "resnet18"]},
    "train.lr": {"loguniform": [1e-4, 1e-2]},
    "model.dropout": {"uniform": [0.0, 0.5]},
}


@pytest.mark.parametrize("mode,samples,expected", [
    ("grid", 1, 12), ("grid", 2, 24), ("grid+random", 3, 36), ("random", 5, 5)])
def test_count_trials(mode, samples, expected):
    assert count_trials(parse_space(SPACE), mode, samples) == expected


def test_tune_space_per_mode():
    from ray.tune.search.sample import Categorical, Float

    axes = parse_space(SPACE)
    grid = to_tune_space(axes, "grid")
    assert set(grid) == {"train.optimizer", "model.initializer", "model.name"}
    assert all(v == {"grid_search": list(SPACE[k]["grid"])} for k, v in grid.items())
    both = to_tune_space(axes, "grid+random")
    assert isinstance(both["train.lr"], Float) and "grid_search" in both["model.name"]
    rnd = to_tune_space(axes, "random")
    assert isinstance(rnd["model.name"], Categorical)


def test_plan_fits_many_trials():
    plan = plan_resources({"CPU": 16, "TRAIN_DRIVER": 16}, num_trials=12, num_workers=2,
                          cpus_per_worker=1, use_gpu=False)
    assert plan.concurrent_trials == 8


def test_plan_partially_fits_and_respects_caps():
    plan = plan_resources({"CPU": 2, "TRAIN_DRIVER": 2}, 12, 2, 1, False)
    assert plan.concurrent_trials == 1
    assert "12 trials" in plan.describe(5) and "12 wave(s)" in plan.describe(5)
    assert plan_resources({"CPU": 64, "GPU": 4}, 12, 2, 1, True).concurrent_trials == 2
    assert plan_resources({"CPU": 64}, 3, 1, 1, False).concurrent_trials == 3
    assert plan_resources({"CPU": 64}, 30, 1, 1, False, max_concurrent=4).concurrent_trials == 4


@pytest.mark.parametrize("cluster,workers,gpu,missing", [
    ({"CPU": 2}, 4, False, "4 CPUs (cluster has 2)"),
    ({"CPU": 8, "GPU": 0}, 2, True, "2 GPUs (cluster has 0)"),
])
def test_plan_never_fits_says_what_is_missing(cluster, workers, gpu, missing):
    with pytest.raises(ResourceError, match=missing.replace("(", r"\(").replace(")", r"\)")):
        plan_resources(cluster, 4, workers, 1, gpu)
