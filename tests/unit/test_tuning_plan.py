import pytest

from components.config import Config, ConfigError, SearchConfig
from components.tuning.plan import TRIAL_RESOURCES, ResourceError, plan_resources, plan_sweep
from components.tuning.space import (
    GRID_POINT,
    check_search,
    check_space,
    count_trials,
    grid_points,
    parse_space,
    resolve_params,
    to_tune_space,
)

CFG = Config()
SECTIONS = {s: getattr(CFG, s) for s in ("data", "augment", "model", "train")}

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
    assert count_trials(parse_space(SPACE), mode, samples, SECTIONS) == expected
    assert count_trials(parse_space(SPACE), mode, samples, SECTIONS, max_trials=4) == 4


def test_tune_space_per_mode():
    from ray.tune.search.sample import Categorical, Float

    axes = parse_space(SPACE)
    grid, n = to_tune_space(axes, "grid", SECTIONS, 2)
    assert set(grid) == {GRID_POINT} and n == 1
    points = grid[GRID_POINT]["grid_search"]
    assert len(points) == 24 and points[0] == points[12]  # the grid repeated num_samples times
    assert set(points[0]) == {"train.optimizer", "model.initializer", "model.name"}
    both, _ = to_tune_space(axes, "grid+random", SECTIONS, 1)
    assert isinstance(both["train.lr"], Float) and len(both[GRID_POINT]["grid_search"]) == 12
    rnd, n = to_tune_space(axes, "random", SECTIONS, 5)
    assert isinstance(rnd["model.name"], Categorical) and n == 5
    capped, _ = to_tune_space(axes, "grid", SECTIONS, 1, max_trials=5)
    assert len(capped[GRID_POINT]["grid_search"]) == 5


def test_the_costliest_grid_points_are_launched_first_and_the_rest_keep_their_order():
    axes = parse_space(SPACE)
    plain = to_tune_space(axes, "grid", SECTIONS, 1)[0][GRID_POINT]["grid_search"]
    size = {"cnn": 1, "resnet18": 100}
    ordered = to_tune_space(axes, "grid", SECTIONS, 1,
                            cost=lambda p: size[p["model.name"]])[0][GRID_POINT]["grid_search"]
    assert sorted(map(repr, ordered)) == sorted(map(repr, plain))   # the same trials
    assert [p["model.name"] for p in ordered] == ["resnet18"] * 6 + ["cnn"] * 6
    # Stable: within one model, the config's order.
    assert [p for p in ordered if p["model.name"] == "cnn"] == \
        [p for p in plain if p["model.name"] == "cnn"]
    # max_trials picks the trials before they are ordered: the same trials as without cost.
    capped = to_tune_space(axes, "grid", SECTIONS, 1, max_trials=3,
                           cost=lambda p: size[p["model.name"]])[0][GRID_POINT]["grid_search"]
    assert sorted(map(repr, capped)) == sorted(map(repr, plain[:3]))
    assert capped[0]["model.name"] == "resnet18"


def test_trials_are_ordered_by_cost_only_when_they_run_side_by_side():
    from pipelines.steps.tune import _trial_cost

    sizes = {"cnn": 100_000, "resnet18": 11_000_000}
    side_by_side = plan_sweep({"CPU": 2}, 8, "auto", {"CPU": 1}, model_params=(1, 2))
    one_at_a_time = plan_sweep({"CPU": 2}, 8, 2, {"CPU": 1})
    cost = _trial_cost(CFG, sizes, side_by_side)
    assert cost({"model.name": "resnet18"}) > cost({"model.name": "cnn"})
    assert cost({}) == sizes[CFG.model.name]          # a point that does not set the model
    assert _trial_cost(CFG, sizes, one_at_a_time) is None
    assert _trial_cost(CFG, {"cnn": 1}, side_by_side) is None   # one model: nothing to order


CONDITIONAL = {
    "train.optimizer": {"grid": ["adam", "sgd_momentum", "nesterov"]},
    "train.momentum": {"grid": [0.8, 0.95], "when": {"train.optimizer": ["sgd_momentum",
                                                                         "nesterov"]}},
    "train.betas": {"choice": [[0.9, 0.999], [0.5, 0.9]], "when": {"train.optimizer": ["adam"]}},
    "model.name": {"grid": ["cnn", "resnet18"]},
    "model.freeze": {"grid": ["none", "backbone"], "when": {"model.name": ["resnet18"]}},
}


def test_conditional_grid_never_launches_invalid_or_duplicate_combinations():
    axes = parse_space(CONDITIONAL)
    points = grid_points(axes, "grid", SECTIONS)
    # optimizer: adam (1) + sgd_momentum x 2 + nesterov x 2 = 5; model: cnn (1) + resnet x 2 = 3
    assert len(points) == 15
    assert all("train.momentum" not in p for p in points if p["train.optimizer"] == "adam")
    assert all("model.freeze" not in p for p in points if p["model.name"] == "cnn")
    check_space(axes, SECTIONS, "grid")  # cnn never meets freeze=backbone


def test_conditional_random_parameter_is_dropped_where_it_does_not_apply():
    axes = parse_space(CONDITIONAL)
    sgd = resolve_params({GRID_POINT: {"train.optimizer": "sgd_momentum", "model.name": "cnn"},
                          "train.betas": [0.5, 0.9]}, axes, SECTIONS)
    assert sgd == {"train.optimizer": "sgd_momentum", "model.name": "cnn"}
    adam = resolve_params({GRID_POINT: {"train.optimizer": "adam", "model.name": "cnn"},
                           "train.betas": [0.5, 0.9]}, axes, SECTIONS)
    assert adam["train.betas"] == [0.5, 0.9]


def test_condition_on_a_fixed_config_key():
    axes = parse_space({"model.freeze": {"choice": ["backbone"],
                                         "when": {"model.name": ["resnet18"]}}})
    assert resolve_params({"model.freeze": "backbone"}, axes, SECTIONS) == {}  # config: cnn


def test_unconditional_invalid_combination_is_refused_before_launch():
    axes = parse_space({"model.name": {"grid": ["cnn", "resnet18"]},
                        "model.freeze": {"grid": ["backbone"]}})
    with pytest.raises(ConfigError, match="transfer models"):
        check_space(axes, SECTIONS, "grid")


def test_optuna_with_a_grid_is_a_clear_error():
    axes = parse_space(SPACE)
    with pytest.raises(ConfigError, match="optuna .* cannot search grid axes"):
        check_search(SearchConfig(algorithm="optuna", mode="random"), axes)
    check_search(SearchConfig(algorithm="optuna", mode="random"),
                 parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}}))


def test_quniform_and_randint():
    from ray.tune.search.sample import Float, Integer

    space, _ = to_tune_space(parse_space({"train.batch_size": {"randint": [8, 64]},
                                          "model.dropout": {"quniform": [0.0, 0.5, 0.1]}}),
                             "random", SECTIONS, 3)
    assert isinstance(space["train.batch_size"], Integer)
    assert isinstance(space["model.dropout"], Float)


CPU1 = {"CPU": 1.0}


def test_plan_fits_many_trials():
    plan = plan_resources({"CPU": 16}, num_trials=12, num_workers=2,
                          per_worker=CPU1)
    assert plan.concurrent_trials == 8 and plan.cpus_per_trial == 2


def test_plan_partially_fits_and_respects_caps():
    plan = plan_resources({"CPU": 2}, 12, 2, CPU1)
    assert plan.concurrent_trials == 1
    assert "12 trials" in plan.describe(5) and "12 wave(s)" in plan.describe(5)
    gpu = {"CPU": 1.0, "GPU": 1.0}
    assert plan_resources({"CPU": 64, "GPU": 4}, 12, 2, gpu).concurrent_trials == 2
    assert plan_resources({"CPU": 64}, 3, 1, CPU1).concurrent_trials == 3
    assert plan_resources({"CPU": 64}, 30, 1, CPU1, max_concurrent=4).concurrent_trials == 4
    big = {"CPU": 4.0, "memory": 8e9}
    assert plan_resources({"CPU": 64, "memory": 40e9}, 30, 2, big).concurrent_trials == 2


@pytest.mark.parametrize("cluster,workers,per_worker,missing", [
    ({"CPU": 2}, 4, {"CPU": 1.0}, "4 CPU (cluster has 2)"),
    ({"CPU": 8, "GPU": 0}, 2, {"CPU": 1.0, "GPU": 1.0}, "2 GPU (cluster has 0)"),
    ({"CPU": 8}, 2, {"CPU": 1.0, "accelerator_type:A100": 1.0},
     "2 accelerator_type:A100 (cluster has 0)"),
])
def test_plan_never_fits_says_what_is_missing(cluster, workers, per_worker, missing):
    with pytest.raises(ResourceError, match=missing.replace("(", r"\(").replace(")", r"\)")):
        plan_resources(cluster, 4, workers, per_worker)


def test_plan_counts_workers_per_node():
    """A worker fits on one node or not at all: the cluster's sum is not enough."""
    gpu = {"CPU": 1.0, "GPU": 1.0}
    head = {"CPU": 8.0, "memory": 16e9}   # no GPU: the job driver and trials only
    gpu_node = {"CPU": 8.0, "GPU": 1.0}
    # 2 GPUs in the cluster, one per node: two 1-GPU workers fit, on two nodes.
    assert plan_resources([head, gpu_node, gpu_node], 6, 2, gpu).concurrent_trials == 1
    # 3 CPUs per worker on 2-CPU nodes: 4 CPUs in all, but no node can hold one worker.
    with pytest.raises(ResourceError, match="must fit on one node.*largest has 2 CPU"):
        plan_resources([{"CPU": 2.0}, {"CPU": 2.0}], 4, 1, {"CPU": 3.0})
    # Leftover CPUs on two nodes do not make a third worker: 3 + 3 CPUs, 2 CPUs per worker.
    assert plan_resources([{"CPU": 3.0}, {"CPU": 3.0}], 4, 2, {"CPU": 2.0}).concurrent_trials == 1
    with pytest.raises(ResourceError, match="hold 2 such worker"):
        plan_resources([{"CPU": 3.0}, {"CPU": 3.0}], 4, 3, {"CPU": 2.0})
    # Two 2-CPU nodes, 2-worker trials of 1 CPU: one trial per node at once.
    assert plan_resources([{"CPU": 2.0}, {"CPU": 2.0}], 4, 2, CPU1).concurrent_trials == 2


def test_worker_resources():
    from components.training.trainer import worker_resources

    assert worker_resources(1, False) == {"CPU": 1.0}
    assert worker_resources(2, True, {"memory": 4e9}) == {"CPU": 2.0, "GPU": 1.0, "memory": 4e9}
    assert worker_resources(1, True, {"GPU": 0.5}) == {"CPU": 1.0, "GPU": 0.5}


CNN, RESNET18 = 95_000, 11_200_000   # about the sizes of the two built-in choices
GPU1 = {"CPU": 1.0, "GPU": 1.0}


def test_auto_plan_on_a_laptop_runs_trials_side_by_side():
    plan = plan_sweep({"CPU": 2}, 8, "auto", CPU1, model_params=(CNN, RESNET18))
    assert (plan.in_trial, plan.workers_per_trial, plan.concurrent_trials) == (True, 1, 2)
    assert plan.trial_resources() == {"CPU": 1.0}
    assert "data parallelism would not pay" in plan.reason and "0.1 M-11.2 M" in plan.reason
    line = plan.describe(6)
    assert "in the trial's own process" in line and "4 wave(s)" in line and "why:" in line


def test_an_explicit_worker_count_is_ddp_as_before():
    plan = plan_sweep({"CPU": 2}, 8, 2, CPU1, model_params=(CNN,))
    assert (plan.in_trial, plan.workers_per_trial, plan.concurrent_trials) == (False, 2, 1)
    assert plan.trial_resources() == TRIAL_RESOURCES   # its Train workers hold the CPUs
    assert "train.num_workers=2" in plan.reason
    one = plan_sweep({"CPU": 2}, 8, 1, CPU1)
    assert (one.in_trial, one.workers_per_trial, one.concurrent_trials) == (False, 1, 2)


def test_auto_plan_on_four_nodes_of_eight_gpus():
    nodes = [{"CPU": 32.0, "GPU": 8.0}] * 4
    big = plan_sweep(nodes, 8, "auto", GPU1, model_params=(CNN, RESNET18))
    # fewer trials than GPUs and a model that keeps GPUs busy: DDP within a node
    assert (big.in_trial, big.workers_per_trial, big.concurrent_trials) == (False, 4, 8)
    small = plan_sweep(nodes, 8, "auto", GPU1, model_params=(CNN,))
    assert (small.in_trial, small.workers_per_trial, small.concurrent_trials) == (True, 1, 8)
    assert small.trial_resources() == GPU1 and "cannot keep more than one GPU" in small.reason
    many = plan_sweep(nodes, 100, "auto", GPU1, model_params=(RESNET18,))
    assert (many.in_trial, many.workers_per_trial, many.concurrent_trials) == (True, 1, 32)
    two = plan_sweep(nodes, 2, "auto", GPU1, model_params=(RESNET18,))
    assert two.workers_per_trial == 8   # a trial's workers stay on one node's GPUs


def test_auto_plan_gives_spare_cpus_to_trials_as_threads():
    plan = plan_sweep({"CPU": 16}, 2, "auto", CPU1, model_params=(RESNET18,))
    assert (plan.in_trial, plan.concurrent_trials) == (True, 2)
    assert plan.trial_resources() == {"CPU": 8.0} and "8 CPUs as torch threads" in plan.reason
    # threads never span nodes: two 4-CPU nodes give one trial 4 threads
    split = plan_sweep([{"CPU": 4}, {"CPU": 4}], 1, "auto", CPU1, model_params=(RESNET18,))
    assert split.trial_resources() == {"CPU": 4.0} and split.concurrent_trials == 1
    capped = plan_sweep({"CPU": 16}, 12, "auto", CPU1, max_concurrent=4)
    assert capped.concurrent_trials == 4 and capped.trial_resources() == {"CPU": 4.0}


def test_auto_plan_keeps_k_fold_on_ray_train_and_says_what_cannot_fit():
    kfold = plan_sweep({"CPU": 2}, 4, "auto", CPU1, k_fold=True)
    assert (kfold.in_trial, kfold.workers_per_trial, kfold.concurrent_trials) == (False, 1, 2)
    with pytest.raises(ResourceError, match="GPU"):
        plan_sweep({"CPU": 8}, 4, "auto", GPU1)
