"""Holding a running sweep to its plan: the budget's deadline, successive halving within each
model family, and the rules that stop launching trials once the answer is in.

- `SweepGate` (a Tune callback) decides whether a new trial may start: not past the deadline,
  nor when the trial could not reach its first comparison before it (a new sweep's first
  trial: its first epoch); not once a trial reached `search.stop_at_f1`; not after
  `search.stop_no_improvement` finished trials in a row that did not beat the best. Running
  trials always go on (to the deadline).
- `FamilyHalving` (a Tune scheduler) compares a trial only with trials of its own family at
  the same epoch (asynchronous successive halving, one set of rungs per family: ResNet-18
  from scratch learns later than the small CNN, and Tune's ASHA, comparing them with each
  other, stops the slow starters that would have won), stops a trial only when it is behind
  the rung's cutoff by more than the validation split can resolve (`TrialShape.margin`), and
  stops a trial at an epoch boundary when its next epoch would end past the deadline: it ends
  KILLED with its history intact.
- `GatedVariantGenerator` / `GatedLimiter`: Tune's generator and Optuna's concurrency limiter,
  asking the gate before each new trial, and admitting at once only the trials the live
  cluster holds (`SweepGate.watch_cluster`, `components.tuning.cluster_watch`); the generator
  also keeps a copy of the sweep's saved state (`components.tuning.sweep_state`).

Tune pickles its scheduler and search algorithm into the experiment state and calls the
unpickled copies on `Tuner.restore`; they hold only the sweep's name and find the live gate of
this process under it (`_GATES`), as `SweepCallbacks` does for the callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator

from components.durations import format_duration
from components.tuning.budget import BudgetPlan, halving_cutoff, rungs
from components.tuning.cluster_watch import ClusterWatch
from components.tuning.plan import ResourcePlan
from components.tuning.space import Axis, resolve_params
from components.tuning.sweep_state import keep_copy

_GATES: dict[str, SweepGate] = {}


@dataclass
class TrialShape:
    """A trial's family (its `model.name`) and its epochs: those of the plan for its family
    (`search.budget`), else `train.epochs`. Picklable: Tune keeps it with its scheduler."""

    axes: list[Axis]
    sections: dict
    epochs: int
    first_rung: int = 0                  # 0: no halving
    eta: int = 2
    by_family: dict[str, tuple[int, int]] = field(default_factory=dict)  # (epochs, first rung)
    val_images: int = 0                  # the validation split's size: a score's noise

    @classmethod
    def of(cls, axes, sections, epochs: int, plan: BudgetPlan | None, halving: bool,
           first_rung: int, eta: int, val_images: int = 0) -> TrialShape:
        # asked-for halving (search.scheduler=asha) halves every family from its first rung
        by_family = {f.family: (f.epochs, min(f.first_rung, first_rung) if halving else
                                f.first_rung) for f in plan.families} if plan else {}
        return cls(axes, sections, epochs, first_rung if halving else 0, eta, by_family,
                   val_images)

    def margin(self, score: float) -> float:
        """One binomial standard error of a score near `score` on the validation split: two
        trials closer than this are not told apart by it, so halving does not stop the one
        below (a coin flip that, measured, stopped the full search's winner)."""
        if self.val_images <= 0:
            return 0.0
        p = min(max(score, 0.0), 1.0)
        return math.sqrt(p * (1 - p) / self.val_images)

    def family(self, config: dict) -> str:
        params = resolve_params(config or {}, self.axes, self.sections)
        return str(params.get("model.name", getattr(self.sections.get("model"), "name", "")))

    def epochs_of(self, config: dict) -> int:
        if not self.by_family:
            return self.epochs
        return self.by_family.get(self.family(config), (self.epochs, 0))[0]

    def rungs_of(self, config: dict) -> list[int]:
        epochs, first = self.by_family.get(self.family(config), (self.epochs, self.first_rung))
        return rungs(first, epochs, self.eta)


def ended_status(metrics: dict | None, planned_epochs: int) -> str:
    """FINISHED when a trial ran all its epochs or stopped itself (patience); KILLED when
    something else (the scheduler, the budget) stopped it earlier."""
    m = metrics or {}
    done = int(m.get("epoch", 0) or 0) >= planned_epochs or bool(m.get("early_stopped"))
    return "FINISHED" if done else "KILLED"


class SweepGate(Callback):
    """Whether a new trial may start, and why not (module docstring); what the sweep's end
    reports (`reason`, trials not started, trials stopped by the budget)."""

    def __init__(self, name: str, shape: TrialShape, *, deadline: float | None = None,
                 plan: BudgetPlan | None = None, stop_at_f1: float | None = None,
                 stop_no_improvement: int | None = None, first_needs_one_epoch: bool = True):
        self.name, self.shape, self.plan = name, shape, plan
        self.deadline = deadline          # time.time() by which trials end: the budget's end
                                          # less the plan's wind-down (BudgetPlan.wind_down_s)
        # A sweep with no trial yet (not a resume or an extension, whose earlier trials have
        # checkpoints) admits its first trial when one epoch fits, not its first rung: with
        # none, nothing could be registered (the deadline still stops it at an epoch boundary).
        self.first_needs_one_epoch = first_needs_one_epoch
        self.stop_at_f1, self.stop_no_improvement = stop_at_f1, stop_no_improvement
        self.reason: str | None = None    # why no new trial starts
        self.by_rule = False              # closed by stop_at_f1 / stop_no_improvement
        self.best: float | None = None
        self.streak = 0                   # finished trials in a row that did not beat the best
        self.epoch_s: dict[str, float] = {}   # measured, per family
        self.started = 0
        self.not_started = 0
        self.budget_stopped = 0           # trials stopped at an epoch boundary by the deadline
        self.began: dict[str, float] = {}
        self.durations: list[float] = []  # wall seconds of each trial that ended
        self.cluster: ClusterWatch | None = None  # the live nodes, once watched
        self.trials_ended: float | None = None     # time.time() when Tune had stopped them all
        self.loop_began: float | None = None       # time.time() of Tune's first step
        self.first_result: float | None = None     # ... and of the sweep's first epoch result

    def watch_cluster(self, plan: ResourcePlan) -> None:
        """From now on, admit at once only the trials the live nodes hold (never more than
        `plan` says), and `halt` when they hold none (`components.tuning.cluster_watch`)."""
        self.cluster = ClusterWatch(plan)

    @property
    def halt(self) -> str | None:
        """Why the whole sweep must stop now, running trials too; None while it may go on."""
        return self.cluster.halt if self.cluster is not None else None

    def at_once(self) -> int | None:
        """The trials that may run at once now; None when the cluster is not watched."""
        return self.cluster.at_once if self.cluster is not None else None

    def close(self, reason: str, by_rule: bool = False) -> None:
        if self.reason is None:
            self.reason, self.by_rule = reason, by_rule

    def _epoch_s(self, family: str) -> float:
        if family in self.epoch_s:
            return self.epoch_s[family]
        planned = self.plan.of(family) if self.plan else None
        return planned.cost.epoch_s if planned else 0.0

    def admits(self, config: dict) -> bool:
        """May a trial with this config start now?"""
        if self.reason is None and self.deadline is not None:
            family = self.shape.family(config)
            planned = self.plan.of(family) if self.plan else None
            start = planned.cost.start_s if planned else 0.0
            rungs = self.shape.rungs_of(config)
            first = rungs[0] if rungs else self.shape.epochs_of(config)
            if self.first_needs_one_epoch and self.started == 0:
                first = 1
            needs = start + first * self._epoch_s(family)
            if time.time() + needs > self.deadline:
                self.close("the budget is spent" if time.time() >= self.deadline else
                           f"the budget's {format_duration(self.deadline - time.time())} left "
                           f"would not hold a {family} trial's first {first} epoch(s) "
                           f"({format_duration(needs)})")
        if self.reason is not None:
            self.not_started += 1
            return False
        self.started += 1
        return True

    def past_deadline(self, trial, result: dict) -> bool:
        """Stop this trial now, at an epoch boundary, because its next epoch would end after
        the deadline?"""
        if self.deadline is None or "epoch" not in result:
            return False
        if int(result["epoch"]) >= self.shape.epochs_of(trial.config):
            return False  # its last epoch: it finishes by itself
        family = self.shape.family(trial.config)
        if time.time() + self._epoch_s(family) <= self.deadline:
            return False
        self.close("the budget is spent")
        self.budget_stopped += 1
        return True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.first_result is None and "val_f1" in result:
            self.first_result = time.time()
        if "time_this_iter_s" in result and "val_f1" in result:
            self.epoch_s[self.shape.family(trial.config)] = float(result["time_this_iter_s"])
        f1 = result.get("val_f1")
        if self.stop_at_f1 is not None and f1 is not None and f1 >= self.stop_at_f1:
            self.close(f"a trial reached val F1 {f1:.4f} >= search.stop_at_f1="
                       f"{self.stop_at_f1:g}", by_rule=True)

    def on_step_begin(self, iteration, trials, **info):
        if self.loop_began is None:
            self.loop_began = time.time()
        if self.cluster is None:
            return
        self.cluster.check()
        if self.cluster.halt is not None:
            self.close(self.cluster.halt)

    def on_experiment_end(self, trials, **info):
        self.trials_ended = time.time()   # Tune calls this once its trials are torn down
        if self.cluster is not None:
            self.cluster.release()   # nothing of the sweep left waiting for room

    def on_trial_start(self, iteration, trials, trial, **info):
        self.began.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id in self.began:
            self.durations.append(time.time() - self.began[trial.trial_id])
        f1 = (trial.last_result or {}).get("best_val_f1")
        if f1 is None:
            return
        if self.best is None or f1 > self.best:
            self.best, self.streak = f1, 0
            return
        self.streak += 1
        k = self.stop_no_improvement
        if k and self.streak >= k:
            self.close(f"{k} finished trials in a row did not beat the best val F1 "
                       f"{self.best:.4f} (search.stop_no_improvement={k})", by_rule=True)


def live_gate(name: str) -> SweepGate | None:
    return _GATES.get(name)


@contextlib.contextmanager
def gate_for(gate: SweepGate):
    """While the sweep runs in this process, its scheduler and search algorithm see `gate`."""
    _GATES[gate.name] = gate
    try:
        yield gate
    finally:
        _GATES.pop(gate.name, None)


class FamilyHalving(FIFOScheduler):
    """Asynchronous successive halving with one set of rungs per model family, on the trial's
    best val F1 so far, and the budget's stop at an epoch boundary (module docstring)."""

    def __init__(self, name: str, shape: TrialShape):
        super().__init__()
        self.name, self.shape = name, shape
        self.recorded: dict[tuple[str, int], dict[str, float]] = {}
        self.stopped = 0

    def on_trial_result(self, tune_controller, trial, result):
        gate = live_gate(self.name)
        if gate is not None and gate.past_deadline(trial, result):
            return TrialScheduler.STOP
        if "epoch" not in result or "best_val_f1" not in result:
            return TrialScheduler.CONTINUE
        epoch, score = int(result["epoch"]), float(result["best_val_f1"])
        family = self.shape.family(trial.config)
        for rung in reversed(self.shape.rungs_of(trial.config)):
            seen = self.recorded.setdefault((family, rung), {})
            if epoch < rung or trial.trial_id in seen:
                continue
            cutoff = halving_cutoff(list(seen.values()), self.shape.eta)
            seen[trial.trial_id] = score
            if cutoff is not None and score < cutoff - self.shape.margin(cutoff):
                self.stopped += 1
                return TrialScheduler.STOP
            break
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"FamilyHalving: {self.stopped} trial(s) stopped at a rung"


class GatedVariantGenerator(BasicVariantGenerator):
    """Tune's grid/random generator; a trial the gate refuses is never started. With
    `keep_at` (the sweep's experiment folder), each time Tune saves the sweep's state the
    generator keeps a copy of it there that a full disk cannot tear
    (`components.tuning.sweep_state`)."""

    def __init__(self, name: str, keep_at: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.gate_name, self.keep_at = name, keep_at

    def save_to_dir(self, dirpath, session_str):
        # Tune wrote the experiment state to `dirpath` just before: the two make one pair.
        saved = super().save_to_dir(dirpath, session_str)
        if saved is not False and getattr(self, "keep_at", None):
            keep_copy(dirpath, session_str, self.keep_at)
        return saved

    def next_trial(self):
        gate = live_gate(self.gate_name)
        at_once = gate.at_once() if gate is not None else None
        if at_once == 0:
            return None  # nothing fits now: wait (the gate closes if that lasts)
        if at_once is not None:
            self.max_concurrent = at_once
        while True:
            trial = super().next_trial()
            if trial is None or gate is None or gate.admits(trial.config):
                return trial
            if gate.reason is not None:
                self.set_finished()
                return None


class GatedLimiter(ConcurrencyLimiter):
    """Optuna (or any searcher) behind Tune's concurrency limiter, asking the gate first."""

    def __init__(self, name: str, searcher: Searcher, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.gate_name = name

    def suggest(self, trial_id: str):
        gate = live_gate(self.gate_name)
        at_once = gate.at_once() if gate is not None else None
        if at_once == 0:
            return None  # nothing fits now: wait (the gate closes if that lasts)
        if at_once is not None:
            self.max_concurrent = at_once
        config = super().suggest(trial_id)
        if isinstance(config, dict) and gate is not None and not gate.admits(config):
            super().on_trial_complete(trial_id, None, error=True)
            return Searcher.FINISHED
        return config
