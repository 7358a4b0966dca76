"""Planning a sweep to a budget (components.tuning.budget) and holding it to the plan while it
runs (components.tuning.gate), without Ray running: trials are stand-ins with a config and a
last result, as Tune hands them to callbacks and schedulers."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from components.config import Config, ConfigError, SearchConfig, from_dict
from components.durations import parse_duration
from components.tuning.budget import (
    FamilyCost,
    FamilyPlan,
    from_json,
    halving_cutoff,
    plan_budget,
    planned_points,
    simulate,
    spread,
    to_json,
)
from components.tuning.gate import FamilyHalving, SweepGate, TrialShape, ended_status
from components.tuning.space import TRIAL_SECTIONS, grid_points, parse_space

CNN, RESNET = FamilyCost(epoch_s=3.0, start_s=2.5), FamilyCost(epoch_s=18.0, start_s=3.0)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("4m", 240), ("2h", 7200),
                                          ("2m30s", 150), ("1.5h", 5400), (45, 45), ("45", 45)])
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "4 minutes", "m", "-3m", "0s", "3d"])
def test_a_bad_duration_is_one_config_line(text):
    with pytest.raises(ConfigError, match="search.budget"):
        from_dict(SearchConfig, {"budget": text}, "search.")


def test_the_plan_keeps_every_trial_when_the_budget_holds_them():
    plan = plan_budget(600, 2, {"cnn": 4, "resnet18": 4}, 6, {"cnn": CNN, "resnet18": RESNET})
    assert [(f.family, f.trials, f.epochs, f.rungs()) for f in plan.families] == [
        ("cnn", 4, 6, []), ("resnet18", 4, 6, [])]
    # slot A: resnet18 (111 s) at 0, 111; slot B: the four cnn trials (20.5 s each) until
    # 82, then resnet18 at 82 and 193: the last ends at 82 + 2 x 111
    assert plan.estimate_s == pytest.approx(4 * 20.5 + 2 * 111.0)
    assert plan.estimate_s <= 600 * 0.9


def test_a_tight_budget_halves_the_costly_family_and_leaves_the_cheap_one_whole():
    plan = plan_budget(150, 2, {"cnn": 4, "resnet18": 4}, 6, {"cnn": CNN, "resnet18": RESNET})
    cnn, resnet = plan.of("cnn"), plan.of("resnet18")
    assert (cnn.trials, cnn.epochs, cnn.rungs()) == (4, 6, [])
    assert resnet.rungs() and resnet.epochs == 6 and resnet.trials >= 2
    assert plan.estimate_s <= 150 * 0.9
    # every family gets at least one trial of one epoch, whatever the budget
    tiny = plan_budget(10, 2, {"cnn": 4, "resnet18": 4}, 6, {"cnn": CNN, "resnet18": RESNET})
    assert {f.family for f in tiny.families} == {"cnn", "resnet18"}
    assert all(f.trials >= 1 and f.epochs >= 1 for f in tiny.families)


def test_capacity_left_over_draws_more_trials_only_when_the_space_draws():
    costs = {"cnn": CNN, "resnet18": RESNET}
    grown = plan_budget(1200, 2, {"cnn": 4, "resnet18": 4}, 6, costs, can_draw_more=True)
    fixed = plan_budget(1200, 2, {"cnn": 4, "resnet18": 4}, 6, costs, can_draw_more=False)
    assert grown.of("cnn").trials > 4 and grown.of("cnn").trials % 4 == 0
    assert fixed.trials == 8
    assert grown.estimate_s <= 1200 * 0.9
    capped = plan_budget(1200, 2, {"cnn": 4, "resnet18": 4}, 6, costs, can_draw_more=True,
                         max_trials=10)
    assert capped.trials <= 10


def test_successive_halving_depths_match_an_independent_count():
    """n trials, rungs r, r*eta, ...: after each rung max(1, n // eta) go on."""
    for n, epochs, rung, eta in [(8, 8, 1, 2), (9, 9, 1, 3), (4, 6, 1, 2), (5, 6, 2, 2)]:
        plan = FamilyPlan("f", n, epochs, rung, CNN, eta)
        depths = plan.trial_epochs()
        survivors, expected = n, []
        r = rung
        while r < epochs:
            going_on = max(1, survivors // eta)
            expected += [r] * (survivors - going_on)
            survivors, r = going_on, r * eta
        expected = [epochs] * survivors + sorted(expected, reverse=True)
        assert sorted(depths, reverse=True) == expected


def test_spread_covers_every_value_it_can():
    axes = parse_space({"train.optimizer": {"grid": ["sgd_momentum", "adam"]},
                        "model.initializer": {"grid": ["xavier_uniform", "kaiming_normal"]}})
    sections = {s: getattr(Config(), s) for s in TRIAL_SECTIONS}
    points = grid_points(axes, "grid", sections)
    two = spread(points, 2)
    assert {p["train.optimizer"] for p in two} == {"sgd_momentum", "adam"}
    assert {p["model.initializer"] for p in two} == {"xavier_uniform", "kaiming_normal"}


def test_the_launch_takes_families_in_turn_with_the_plans_trials():
    axes = parse_space({"train.optimizer": {"grid": ["sgd_momentum", "adam"]},
                        "model.name": {"grid": ["cnn", "resnet18"]}})
    sections = {s: getattr(Config(), s) for s in TRIAL_SECTIONS}
    shape = TrialShape(axes, sections, 6)
    plan = plan_budget(150, 2, {"cnn": 2, "resnet18": 2}, 6, {"cnn": CNN, "resnet18": RESNET})
    points = planned_points(plan, grid_points(axes, "grid", sections), shape.family)
    families = [shape.family({"grid_point": p}) for p in points]
    assert families[:2] == ["resnet18", "cnn"]      # the costliest family first
    # a family's next trial waits for a free slot beside no trial of its own family
    order, _ = simulate(plan.families, 2)
    assert [f for f, _ in order] == families
    assert families.count("resnet18") == plan.of("resnet18").trials
    assert families.count("cnn") == plan.of("cnn").trials


def test_the_plan_reads_back_as_it_was_saved():
    plan = plan_budget(150, 2, {"cnn": 4, "resnet18": 4}, 6, {"cnn": CNN, "resnet18": RESNET})
    assert from_json(to_json(plan)) == plan


def test_the_deadline_keeps_one_trial_start_back_for_the_sweep_to_end():
    """The gate's deadline is the budget's end less the costliest family's measured start:
    what docs/performance.md promises (budget + one epoch + one start) then holds when the
    wind-down takes up to a start itself."""
    plan = plan_budget(150, 2, {"cnn": 4, "resnet18": 4}, 6, {"cnn": CNN, "resnet18": RESNET})
    assert plan.wind_down_s == RESNET.start_s
    only_cnn = plan_budget(150, 2, {"cnn": 4}, 6, {"cnn": CNN})
    assert only_cnn.wind_down_s == CNN.start_s


def test_one_long_trial_is_cut_to_the_wall_however_many_epochs_it_loses():
    """A budget of 41 s on 2 CPUs and 300 configured epochs of 0.19 s: one trial, cut to the
    wall (90% of the budget). The cut used to stop after 64 epochs, which left a 47 s trial
    that the gate then refused to start: the run ended with no trial at all."""
    cost = FamilyCost(epoch_s=0.19, start_s=2.0)
    plan = plan_budget(40.7, 2, {"cnn": 6}, 300, {"cnn": cost}, draws=3, can_draw_more=True)
    (family,) = plan.families
    assert family.trials == 1
    assert cost.start_s + family.epochs * cost.epoch_s <= 40.7 * 0.9
    assert cost.start_s + (family.epochs + 1) * cost.epoch_s > 40.7 * 0.9   # no more cut
    assert plan.estimate_s <= 40.7 * 0.9


def test_the_halving_cutoff_is_numpys_percentile():
    rng = np.random.default_rng(0)
    for eta in (2, 3, 4):
        for n in (1, 2, 5, 12):
            scores = list(rng.random(n))
            assert halving_cutoff(scores, eta) == pytest.approx(
                np.percentile(scores, (1 - 1 / eta) * 100))
    assert halving_cutoff([], 2) is None


def _trial(tid, name, **result):
    return SimpleNamespace(trial_id=tid, config={"grid_point": {"model.name": name}},
                           last_result=result)


def _shape(by_family=None, first_rung=1):
    axes = parse_space({"model.name": {"grid": ["cnn", "resnet18"]}})
    sections = {s: getattr(Config(), s) for s in TRIAL_SECTIONS}
    return TrialShape(axes, sections, 6, first_rung, 2, by_family or {})


def test_halving_compares_a_trial_only_with_its_own_family():
    """A slow-starting ResNet-18 at epoch 1 (val F1 0.30) is not stopped by the CNN's 0.90;
    a second ResNet-18 below the first at the same rung is."""
    sched = FamilyHalving("t", _shape())
    go, stop = "CONTINUE", "STOP"
    cnn = _trial("c1", "cnn")
    assert sched.on_trial_result(None, cnn, {"epoch": 1, "best_val_f1": 0.90}) == go
    r1 = _trial("r1", "resnet18")
    assert sched.on_trial_result(None, r1, {"epoch": 1, "best_val_f1": 0.30}) == go
    r2 = _trial("r2", "resnet18")
    assert sched.on_trial_result(None, r2, {"epoch": 1, "best_val_f1": 0.20}) == stop
    r3 = _trial("r3", "resnet18")
    assert sched.on_trial_result(None, r3, {"epoch": 1, "best_val_f1": 0.60}) == go
    # per-family rungs from a budget's plan: resnet18 halves, cnn trains its 6 epochs
    planned = FamilyHalving("t", _shape({"cnn": (6, 6), "resnet18": (6, 1)}))
    planned.on_trial_result(None, _trial("c1", "cnn"), {"epoch": 1, "best_val_f1": 0.9})
    assert planned.on_trial_result(
        None, _trial("c2", "cnn"), {"epoch": 1, "best_val_f1": 0.1}) == go


def test_the_gate_stops_at_the_deadline_on_an_epoch_boundary():
    from components.tuning import gate as g

    shape = _shape({"cnn": (6, 6), "resnet18": (6, 1)})
    gate = SweepGate("t-deadline", shape, deadline=time.time() + 5)
    gate.epoch_s["resnet18"] = 10.0
    sched = FamilyHalving("t-deadline", shape)
    with g.gate_for(gate):
        r1 = _trial("r1", "resnet18")
        # its next epoch (10 s) would end after the deadline (5 s): stopped now
        assert sched.on_trial_result(None, r1, {"epoch": 2, "best_val_f1": 0.5}) == "STOP"
        assert gate.budget_stopped == 1 and "budget" in gate.reason
        # its last planned epoch: it finishes by itself, nothing to stop
        assert not gate.past_deadline(r1, {"epoch": 6})
        # no new trial once the budget is spent
        assert not gate.admits(_trial("c9", "cnn").config)
    assert ended_status({"epoch": 2}, shape.epochs_of(r1.config)) == "KILLED"
    assert ended_status({"epoch": 6}, 6) == "FINISHED"


def test_the_gate_admits_a_trial_only_when_its_first_rung_fits():
    shape = _shape({"cnn": (6, 6), "resnet18": (6, 1)})
    gate = SweepGate("t", shape, deadline=time.time() + 30)
    gate.epoch_s.update({"cnn": 6.0, "resnet18": 20.0})
    assert gate.admits({"grid_point": {"model.name": "resnet18"}})   # 1 epoch of 20 s fits
    assert not gate.admits({"grid_point": {"model.name": "cnn"}})    # 6 epochs of 6 s do not
    assert "first 6 epoch(s)" in gate.reason


def test_the_first_trial_of_a_sweep_needs_one_epoch_to_fit_not_its_first_rung():
    """Seen under load: the probe and Ray's start took 32 of 45 s, the plan's one trial (24
    epochs, no halving) no longer fit whole, and the sweep ran no trial at all ("no trial
    produced a checkpoint"). The first trial is admitted when one epoch fits; the deadline
    then stops it at an epoch boundary."""
    shape = _shape({"cnn": (24, 24)})
    gate = SweepGate("t", shape, deadline=time.time() + 13)
    gate.epoch_s["cnn"] = 0.6                                       # 24 epochs: 14.4 s
    assert gate.admits({"grid_point": {"model.name": "cnn"}})       # 1 epoch fits
    assert not gate.admits({"grid_point": {"model.name": "cnn"}})   # a second: its rung
    assert "first 24 epoch(s)" in gate.reason
    resumed = SweepGate("t", shape, deadline=time.time() + 13, first_needs_one_epoch=False)
    resumed.epoch_s["cnn"] = 0.6
    assert not resumed.admits({"grid_point": {"model.name": "cnn"}})  # earlier trials exist
    spent = SweepGate("t", shape, deadline=time.time() + 0.3)
    spent.epoch_s["cnn"] = 0.6
    assert not spent.admits({"grid_point": {"model.name": "cnn"}})    # not even one epoch


def test_stop_at_f1_and_stop_no_improvement_close_the_gate_with_the_reason():
    gate = SweepGate("t", _shape(), stop_at_f1=0.95)
    gate.on_trial_result(0, [], _trial("a", "cnn"), {"val_f1": 0.94})
    assert gate.admits({})
    gate.on_trial_result(0, [], _trial("a", "cnn"), {"val_f1": 0.951})
    assert not gate.admits({}) and "0.9510 >= search.stop_at_f1=0.95" in gate.reason

    gate = SweepGate("t", _shape(), stop_no_improvement=2)
    for tid, f1 in [("a", 0.80), ("b", 0.85), ("c", 0.84), ("d", 0.85)]:
        gate.on_trial_complete(0, [], _trial(tid, "cnn", best_val_f1=f1))
    assert not gate.admits({})
    assert gate.reason.startswith("2 finished trials in a row did not beat the best val F1 "
                                  "0.8500")
    # a trial that improves resets the count
    gate = SweepGate("t", _shape(), stop_no_improvement=2)
    for tid, f1 in [("a", 0.80), ("b", 0.79), ("c", 0.81), ("d", 0.80)]:
        gate.on_trial_complete(0, [], _trial(tid, "cnn", best_val_f1=f1))
    assert gate.admits({})


def test_optuna_asks_the_gate_before_each_new_trial():
    from ray.tune.search import Searcher

    from components.tuning import gate as g
    from components.tuning.driver import build_search_alg
    from components.tuning.plan import ResourcePlan
    from components.tuning.space import to_tune_space

    sections = {s: getattr(Config(), s) for s in TRIAL_SECTIONS}
    axes = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}})
    space, _ = to_tune_space(axes, "random", sections, 5)
    alg = build_search_alg(SearchConfig(algorithm="optuna", mode="random"), axes,
                           ResourcePlan(5, 1, {"CPU": 1.0}, 2, {"CPU": 2}), 0, "t-optuna")
    assert alg.set_search_properties("best_val_f1", "max", space)
    gate = SweepGate("t-optuna", TrialShape(axes, sections, 2), stop_at_f1=0.9)
    with g.gate_for(gate):
        assert isinstance(alg.suggest("t0"), dict)
        gate.on_trial_result(0, [], _trial("t0", "cnn"), {"val_f1": 0.95})
        assert alg.suggest("t1") == Searcher.FINISHED
    assert gate.started == 1 and gate.not_started == 1


def test_halving_stops_only_a_trial_behind_by_more_than_the_val_split_resolves():
    """266 validation images: at a cutoff of 0.97 one binomial standard error is
    sqrt(0.97 x 0.03 / 266) = 0.0105; a trial 0.005 behind goes on, one 0.02 behind stops."""
    axes = parse_space({"model.name": {"grid": ["cnn", "resnet18"]}})
    sections = {s: getattr(Config(), s) for s in TRIAL_SECTIONS}
    shape = TrialShape(axes, sections, 6, 1, 2, {}, val_images=266)
    assert shape.margin(0.97) == pytest.approx(np.sqrt(0.97 * 0.03 / 266))
    sched = FamilyHalving("t", shape)
    sched.on_trial_result(None, _trial("a", "cnn"), {"epoch": 1, "best_val_f1": 0.97})
    assert sched.on_trial_result(None, _trial("b", "cnn"),
                                 {"epoch": 1, "best_val_f1": 0.965}) == "CONTINUE"
    # recorded now: 0.97, 0.965 -> cutoff 0.9675 (the median of two)
    cutoff = np.percentile([0.97, 0.965], 50)
    assert sched.on_trial_result(None, _trial("c", "cnn"),
                                 {"epoch": 1, "best_val_f1": cutoff - 0.02}) == "STOP"


def test_a_slow_machine_still_gets_both_families_within_the_budget():
    """The 12-04 AVX2 machine's epochs (the CNN 6.2 s, ResNet-18 41 s with two trials side by
    side) and the default's 2m30s less a probe: both families kept, the wall estimate within
    the budget, and the cut-down ResNet-18 leaves room that the CNN's plan does not waste."""
    costs = {"cnn": FamilyCost(6.2, 2.5), "resnet18": FamilyCost(41.0, 3.0)}
    plan = plan_budget(130, 2, {"cnn": 4, "resnet18": 4}, 6, costs)
    assert {f.family for f in plan.families} == {"cnn", "resnet18"}
    assert plan.of("cnn").trials == 4           # every optimizer x initializer of the CNN
    assert plan.of("cnn").rungs()               # ... halved
    assert plan.of("resnet18").trials == 1      # and one ResNet-18 trial
    assert plan.estimate_s <= 130 * 0.9
    assert plan.estimate_s == pytest.approx(simulate(plan.families, 2)[1])
    # no more thorough shape of either family would fit: the plan is not wasteful
    from components.tuning.budget import _shapes

    for f in plan.families:
        other = [p for p in plan.families if p.family != f.family]
        better = next(s for s in _shapes(4, 6, 1, f.cost, 2))
        if better.slot_seconds() > f.slot_seconds():
            from dataclasses import replace
            assert simulate([*other, replace(better, family=f.family)], 2)[1] > 130 * 0.9


def test_asked_for_halving_stays_on_under_a_budget():
    """search.scheduler=asha with a budget that holds every trial: the plan still halves
    (what the user asked for), and the trials' rungs say so."""
    costs = {"cnn": CNN, "resnet18": RESNET}
    plan = plan_budget(3600, 2, {"cnn": 4, "resnet18": 4}, 6, costs, halve=True)
    assert all(f.rungs() == [1, 2, 4] for f in plan.families)
    axes = parse_space({"model.name": {"grid": ["cnn", "resnet18"]}})
    sections = {s: getattr(Config(), s) for s in TRIAL_SECTIONS}
    roomy = plan_budget(3600, 2, {"cnn": 4, "resnet18": 4}, 6, costs)
    assert all(not f.rungs() for f in roomy.families)
    shape = TrialShape.of(axes, sections, 6, roomy, True, 1, 2)
    assert shape.rungs_of({"grid_point": {"model.name": "resnet18"}}) == [1, 2, 4]


def _record_with(budget: str, spent: list[float], restarts: list[float]):
    """A parent run's record as `tune_budget` reads it: its config's budget, the attempts'
    `sweep_seconds` and the restarts they measured, in the order they were logged."""
    history = {"sweep_seconds": spent, "sweep_restart_seconds": restarts}

    def metric_history(run_id, key):
        return [SimpleNamespace(value=v, timestamp=1000 + i, step=0)
                for i, v in enumerate(history.get(key, []))]
    cfg = from_dict(Config, {"search": {"budget": budget}}) if budget else Config()
    return cfg, SimpleNamespace(run_id="r", tracker=SimpleNamespace(
        metric_history=metric_history))


@pytest.mark.parametrize("budget,spent,restarts,restarted", [
    ("90s", [84.0], [31.0], False),        # 6 s left, a restart took 31 s: keep, as CI saw
    ("90s", [30.0], [24.0], True),         # 60 s left holds it
    ("90s", [30.0, 20.0], [24.0, 45.0], False),   # the latest measure decides: 40 s < 45 s
    ("90s", [30.0, 20.0], [50.0, 12.0], True),
    ("90s", [30.0], [], True),             # no trial reported an epoch: nothing to keep
    ("90s", [95.0], [10.0], False),        # spent beyond the budget: nothing left
    (None, [84.0], [31.0], True),          # no budget: every resume restarts
])
def test_a_resume_restarts_paused_trials_only_when_the_budget_left_holds_a_restart(
        budget, spent, restarts, restarted):
    """The rule docs/performance.md states, written out: left = budget - sum(sweep_seconds);
    restart when no restart was measured or left >= the last measured restart."""
    from pipelines.steps.tune_budget import no_room_to_restart

    cfg, record = _record_with(budget, spent, restarts)
    why = no_room_to_restart(cfg, record)
    assert (why is None) == restarted, why
    if not restarted:
        left = max(0.0, parse_duration(budget) - sum(spent))
        assert why.startswith(f"the budget's {int(round(left))} s left would not hold a "
                              f"restart of the paused trials ({int(round(restarts[-1]))} s"), why


def test_an_attempt_measures_its_restart_from_ray_to_its_first_epoch_and_its_wind_down():
    """sweep_restart_seconds = starting Ray + Tune's loop to the first epoch result + the
    attempt's wind-down; none when no trial reported."""
    from pipelines.steps.tune_budget import restart_seconds

    gate = SweepGate("s", TrialShape([], {}, 3))
    gate.on_step_begin(0, [])
    assert restart_seconds(gate, 4.0, 2.5) is None
    began = gate.loop_began
    gate.on_trial_result(0, [], SimpleNamespace(config={}), {"val_f1": 0.5, "epoch": 1})
    expected = 4.0 + (gate.first_result - began) + 2.5
    assert restart_seconds(gate, 4.0, 2.5) == pytest.approx(expected)
    assert gate.first_result >= began
