"""Planning a sweep to a wall-time budget (`search.budget`).

Given what one epoch of each model family costs on this cluster (measured before the sweep by
`components.tuning.probe`) and how many trials run at once, the plan chooses, per family, how
many trials to launch, how many epochs the best of them train and from which epoch successive
halving may stop the others. The rule, in order:

1. Families share the budget equally; a family that needs less than its share passes the rest
   on to the costlier ones (the cheap CNN never starves ResNet-18, nor the reverse).
2. Within its share a family keeps, as long as it fits: every configured trial at every
   epoch; then every trial with successive halving (all train `first_rung` epochs, the best
   1/eta go on to eta x as many, up to the full epochs: more epochs for what is ahead); then
   fewer trials (spread over the grid's values), with halving; then one trial for fewer
   epochs. At least one trial of one epoch per family: a family is never silently dropped.
3. Capacity left over goes to more random draws (when the space draws any) of the families
   whose trials are complete, cheapest first.

The estimate simulates the launch (`simulate`: as many trials at once as the plan runs, the
next from the family with the fewest running), and the sweep is held to the budget while it
runs (`components.tuning.gate`). Pure: no Ray.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace

from components.durations import format_duration

# Plan to this share of the budget: the estimate's error and the trials' start-up spread.
PLAN_SHARE = 0.9
MAX_GROWTH = 4   # draws per grid point: at most this many times those configured


def rungs(first_rung: int, epochs: int, eta: int) -> list[int]:
    """The epochs at which successive halving compares a trial with its family's others:
    first_rung, first_rung x eta, ... below `epochs` (none when first_rung is 0)."""
    out, r = [], first_rung
    while 0 < r < epochs:
        out.append(r)
        r *= eta
    return out


@dataclass(frozen=True)
class FamilyCost:
    epoch_s: float   # one epoch of one trial, with the sweep's trials side by side
    start_s: float   # a trial's fixed cost: its model, run record, loaders and first batch


@dataclass(frozen=True)
class FamilyPlan:
    family: str
    trials: int
    epochs: int       # the most epochs one trial trains (its train.epochs)
    first_rung: int   # epochs every trial trains before halving may stop it (== epochs: none)
    cost: FamilyCost
    eta: int = 2

    def rungs(self) -> list[int]:
        return rungs(self.first_rung, self.epochs, self.eta)

    def trial_epochs(self) -> list[int]:
        """Epochs each trial is expected to train, deepest first (asynchronous halving lets
        the early trials through: a rung with nothing recorded yet stops no one)."""
        depth = [self.epochs] * self.trials
        survivors = self.trials
        for rung in self.rungs():
            going_on = max(1, survivors // self.eta)
            depth[going_on:survivors] = [rung] * (survivors - going_on)
            survivors = going_on
        return depth

    def durations(self) -> list[float]:
        return [self.cost.start_s + e * self.cost.epoch_s for e in self.trial_epochs()]

    def slot_seconds(self) -> float:
        return sum(self.durations())

    def describe(self) -> str:
        text = f"{self.family} {self.trials} trial(s) x {self.epochs} epoch(s)"
        if self.rungs():
            text = (f"{self.family} {self.trials} trial(s) x {self.first_rung} epoch(s), then "
                    f"up to {self.epochs} for the best (halving at epochs "
                    f"{', '.join(map(str, self.rungs()))})")
        return text


def simulate(plans, slots: int) -> tuple[list[tuple[str, int]], float]:
    """The launch order and the wall time of running the plans' trials on `slots` slots.
    Whenever a slot frees, the next trial comes from the family with the fewest trials
    running (the costliest on a tie): trials of one family then seldom run side by side, so
    each reaches a halving rung after the family's earlier trials recorded theirs (two trials
    at a rung at once both go on: nothing recorded there stops either). Returns
    [(family, index of its trial)] in launch order, and the simulated makespan."""
    queues = {p.family: list(enumerate(p.durations())) for p in plans}
    cost = {p.family: p.cost.epoch_s for p in plans}
    running: list[tuple[float, str]] = []
    count = {f: 0 for f in queues}
    order, now, free = [], 0.0, max(1, slots)
    while any(queues.values()):
        while free and any(queues.values()):
            family = min((f for f in queues if queues[f]), key=lambda f: (count[f], -cost[f]))
            index, duration = queues[family].pop(0)
            order.append((family, index))
            heapq.heappush(running, (now + duration, family))
            count[family] += 1
            free -= 1
        now, family = heapq.heappop(running)
        count[family] -= 1
        free += 1
    return order, max([now] + [end for end, _ in running])


@dataclass(frozen=True)
class BudgetPlan:
    budget_s: float
    slots: int
    eta: int
    families: tuple[FamilyPlan, ...]
    estimate_s: float
    devices: str = "CPUs"

    def of(self, family: str) -> FamilyPlan | None:
        return next((f for f in self.families if f.family == family), None)

    @property
    def trials(self) -> int:
        return sum(f.trials for f in self.families)

    @property
    def wind_down_s(self) -> float:
        """What the gate keeps back from the deadline for the sweep to end once its trials
        stop (the last trial torn down, Tune's state saved, Ray shut down): one trial's
        measured start, the costliest family's."""
        return max((f.cost.start_s for f in self.families), default=0.0)

    def describe(self) -> str:
        per = ", ".join(f.describe() for f in self.families)
        costs = ", ".join(f"{f.family} {f.cost.epoch_s:.1f} s/epoch" for f in self.families)
        return (f"budget {format_duration(self.budget_s)} on {self.slots} {self.devices}: "
                f"{per}; estimate {format_duration(self.estimate_s)}\n"
                f"    why: measured {costs} with {self.slots} trial(s) at once; families "
                f"share the budget, halving and fewer trials only where a family's share "
                f"does not hold every trial (docs/performance.md, \"A sweep planned to a "
                f"budget\")")


def _shapes(trials: int, epochs: int, first_rung: int, cost: FamilyCost, eta: int,
            halve: bool = False):
    """A family's candidate plans, most thorough first (module docstring, rule 2); `halve`
    (`search.scheduler=asha`): never without halving."""
    rung = min(first_rung, epochs)
    if not halve or rung >= epochs:
        yield FamilyPlan("", trials, epochs, epochs, cost, eta)
    n = trials
    while n >= 2:
        yield FamilyPlan("", n, epochs, rung, cost, eta)   # rung == epochs: no halving
        n = n // 2 if n > 2 else 1
    for e in range(epochs, 0, -1):
        yield FamilyPlan("", 1, e, e, cost, eta)


def _fit(family: str, trials: int, epochs: int, first_rung: int, cost: FamilyCost, eta: int,
         share: float, halve: bool) -> FamilyPlan:
    last = None
    for shape in _shapes(trials, epochs, first_rung, cost, eta, halve):
        last = replace(shape, family=family)
        if last.slot_seconds() <= share:
            return last
    return last  # one trial, one epoch: over its share, but a family is never dropped


def plan_budget(budget_s: float, slots: int, demand: dict[str, int], epochs: int,
                costs: dict[str, FamilyCost], *, first_rung: int = 1, eta: int = 2,
                draws: int = 1, can_draw_more: bool = False, max_trials: int | None = None,
                devices: str = "CPUs", halve: bool = False) -> BudgetPlan:
    """`demand`: trials configured per family (grid points x draws); `draws`: the configured
    draws per grid point; `can_draw_more`: the space draws random values, so more trials
    explore more (rule 3); `halve`: the user asked for halving (`search.scheduler=asha`),
    every family halves from `first_rung`."""
    capacity = budget_s * PLAN_SHARE * max(1, slots)
    order = sorted(demand, key=lambda f: costs[f].epoch_s)
    plans: dict[str, FamilyPlan] = {}
    left = capacity
    for i, family in enumerate(order):
        share = left / (len(order) - i)
        plans[family] = _fit(family, demand[family], epochs, first_rung, costs[family], eta,
                             share, halve)
        left -= plans[family].slot_seconds()
    if can_draw_more:
        _draw_more(plans, demand, draws, left, max_trials)
    plans = _within_wall(plans, budget_s * PLAN_SHARE, slots, halve)
    plans = _upgrade(plans, demand, epochs, first_rung, eta, budget_s * PLAN_SHARE, slots,
                     halve)
    return BudgetPlan(budget_s, slots, eta, tuple(plans[f] for f in order),
                      simulate(plans.values(), slots)[1], devices)


def _draw_more(plans: dict[str, FamilyPlan], demand: dict[str, int], draws: int, left: float,
               max_trials: int | None) -> None:
    """Rule 3: one more draw per grid point for each complete family, cheapest first, while
    capacity is left."""
    for family in list(plans):
        plan = plans[family]
        points = demand[family] // max(1, draws)
        if plan.trials < demand[family] or plan.first_rung < plan.epochs or points == 0:
            continue
        while plan.trials + points <= demand[family] * MAX_GROWTH:
            grown = replace(plan, trials=plan.trials + points)
            total = sum(p.trials for p in plans.values()) + points
            extra = grown.slot_seconds() - plan.slot_seconds()
            if extra > left or (max_trials and total > max_trials):
                break
            left -= extra
            plan = plans[family] = grown


def _within_wall(plans: dict[str, FamilyPlan], wall: float, slots: int,
                 halve: bool) -> dict[str, FamilyPlan]:
    """Slot-seconds that fit can still overrun the wall when one trial is longer than the
    rest together: shrink the family with the longest trial until the simulated launch fits
    (each step takes a strictly smaller shape of a finite list, so this ends)."""
    while True:
        if simulate(plans.values(), slots)[1] <= wall:
            break
        family = max(plans, key=lambda f: max(plans[f].durations()))
        plan = plans[family]
        smaller = next((replace(s, family=family) for s in _shapes(
            plan.trials, plan.epochs, plan.first_rung, plan.cost, plan.eta, halve)
            if replace(s, family=family).slot_seconds() < plan.slot_seconds()
            and max(s.durations()) < max(plan.durations())), None)
        if smaller is None:
            break
        plans[family] = smaller
    return plans


def _upgrade(plans: dict[str, FamilyPlan], demand: dict[str, int], epochs: int,
             first_rung: int, eta: int, wall: float, slots: int,
             halve: bool) -> dict[str, FamilyPlan]:
    """Shares count slot-seconds; the wall can still hold more once the costliest family is
    cut to fit it (one long trial leaves the other slot idle): give each family, cheapest
    first, the most thorough shape (rule 2's order) that keeps the simulated launch within
    the wall."""
    for family in sorted(plans, key=lambda f: plans[f].cost.epoch_s):
        current = plans[family]
        if current.trials >= demand[family] and current.epochs == epochs and (
                halve or not current.rungs()):
            continue  # every configured trial at every epoch already (or more draws)
        for shape in _shapes(demand[family], epochs, first_rung, current.cost, eta, halve):
            candidate = replace(shape, family=family)
            if candidate == current:
                break
            if simulate([*(p for f, p in plans.items() if f != family), candidate],
                        slots)[1] <= wall:
                plans[family] = candidate
                break
    return plans


def spread(points: list[dict], k: int) -> list[dict]:
    """`k` of the grid `points` that cover as many (key, value) pairs as possible: trials cut
    to a budget still try every optimizer and every initializer where they can."""
    chosen, seen = [], set()
    rest = list(points)
    while rest and len(chosen) < k:
        best = max(rest, key=lambda p: len({(key, repr(v)) for key, v in p.items()} - seen))
        rest.remove(best)
        chosen.append(best)
        seen |= {(key, repr(v)) for key, v in best.items()}
    return chosen


def halving_cutoff(scores: list[float], eta: int) -> float | None:
    """The score a trial must reach at a rung to go on: the top 1/eta of those recorded there
    (as Tune's ASHA computes it)."""
    if not scores:
        return None
    ordered = sorted(scores)
    q = (1 - 1 / eta) * (len(ordered) - 1)
    lo, hi = math.floor(q), math.ceil(q)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (q - lo)


def planned_points(plan: BudgetPlan, points: list[dict], family_of) -> list[dict]:
    """The grid points a grid sweep launches under `plan`, in the simulated launch order
    (`simulate`): per family, its trials spread over the family's points (`spread`), repeated
    when the plan draws more than once per point."""
    mine = {}
    for f in plan.families:
        own = [p for p in points if family_of(p) == f.family]
        chosen = spread(own, min(f.trials, len(own)))
        mine[f.family] = (chosen * math.ceil(f.trials / max(1, len(chosen))))[:f.trials]
    order, _ = simulate(plan.families, plan.slots)
    return [mine[family][i] for family, i in order if i < len(mine[family])]


def to_json(plan: BudgetPlan) -> dict:
    """What the parent run keeps of the plan, for `--resume` (the same plan, not a new probe)."""
    return {"budget_s": plan.budget_s, "slots": plan.slots, "eta": plan.eta,
            "estimate_s": plan.estimate_s, "devices": plan.devices,
            "families": [[f.family, f.trials, f.epochs, f.first_rung, f.cost.epoch_s,
                          f.cost.start_s] for f in plan.families]}


def from_json(data: dict) -> BudgetPlan:
    eta = int(data["eta"])
    families = tuple(FamilyPlan(name, int(n), int(e), int(r), FamilyCost(float(c), float(s)),
                                eta) for name, n, e, r, c, s in data["families"])
    return BudgetPlan(float(data["budget_s"]), int(data["slots"]), eta, families,
                      float(data["estimate_s"]), data.get("devices", "CPUs"))
