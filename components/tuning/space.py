"""The search-space language of conf/search/*.yaml.

`space` maps a dotted config key to one distribution:
  {grid: [a, b]}            every value, crossed with the other grid axes
  {choice: [a, b]}          one value drawn per trial
  {uniform: [lo, hi]}  {loguniform: [lo, hi]}  {randint: [lo, hi]}  {quniform: [lo, hi, q]}

Any axis may add `when: {other.key: [values]}`: it applies only to trials where the other
key (searched or fixed in the config) has one of those values (momentum only for the SGD
family, freezing only for transfer models). A trial never receives, nor logs, a parameter
whose condition fails, and grid points that differ only in such a parameter are launched once.

Modes: `grid` crosses the grid axes only (random axes keep their config values); `random`
draws every axis (grid axes become choices) `num_samples` times; `grid+random` crosses the
grid and draws the random axes `num_samples` times per grid point.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.config import Config, ConfigError, check_model, from_dict, validate_config
from components.models import check_model_input

RANDOM_KINDS = {"choice": None, "uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3}
KINDS = ("grid", *RANDOM_KINDS)
# The config sections a search may set, and those a trial trains with (what a trial's
# parameters are applied to; evaluation is the pipeline's, after the sweep).
TUNABLE_SECTIONS = ("data", "augment", "model", "train", "evaluation")
TRIAL_SECTIONS = ("data", "augment", "model", "train")
GRID_POINT = "grid_point"  # the Tune config key holding one (already filtered) grid point


@dataclass(frozen=True)
class Axis:
    key: str        # dotted config key, e.g. "train.lr"
    kind: str       # one of KINDS
    args: tuple
    when: tuple = ()  # ((other_key, (allowed values...)), ...)

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    @property
    def is_categorical(self) -> bool:
        return self.kind in ("grid", "choice")


def parse_space(space: dict) -> list[Axis]:
    axes = []
    for key, spec in (space or {}).items():
        where = f"search.space.{key}"
        if isinstance(spec, dict):
            spec = dict(spec)
            when = spec.pop("when", None) or {}
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where} must be one of {{kind: values}} with kind in "
                              f"{', '.join(KINDS)}, optionally with when:; got {spec!r}")
        if not isinstance(when, dict) or not all(isinstance(v, list) for v in when.values()):
            raise ConfigError(f"{where}.when must map keys to lists of values, e.g. "
                              "when: {train.optimizer: [sgd_momentum, nesterov]}")
        (kind, args), = spec.items()
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown distribution {kind!r}; choose one of: "
                              f"{', '.join(KINDS)}")
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list")
        arity = RANDOM_KINDS.get(kind)
        if arity is not None:
            if len(args) != arity:
                raise ConfigError(f"{where}: {kind} needs {arity} numbers, got {list(args)}")
            try:
                args = [float(a) for a in args]
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {kind} bounds must be numbers, got {args}") from None
            if not args[0] < args[1]:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args[:2]}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0")
            if kind == "randint":
                args = [int(a) for a in args]
        axes.append(Axis(key, kind, tuple(args),
                         tuple((k, tuple(v)) for k, v in when.items())))
    keys = {a.key for a in axes}
    for a in axes:
        for other, _ in a.when:
            if other == a.key:
                raise ConfigError(f"search.space.{a.key}.when cannot refer to itself")
            if a.is_grid and other in keys and not next(b for b in axes if b.key == other).is_grid:
                raise ConfigError(f"search.space.{a.key}: a grid axis can only depend on grid "
                                  f"axes or fixed config keys, not on random axis {other}")
    return axes


def config_value(sections: dict[str, Any], key: str) -> Any:
    section, _, rest = key.partition(".")
    node = dataclasses.asdict(sections[section]) if section in sections else {}
    for part in rest.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"search.space: `when` refers to unknown config key {key}")
        node = node[part]
    return node


def _holds(axis: Axis, params: dict, sections: dict[str, Any]) -> bool:
    return all((params[k] if k in params else config_value(sections, k)) in allowed
               for k, allowed in axis.when)


def resolve_params(config: dict, axes: list[Axis], sections: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial config -> the dotted parameters this trial really uses: the grid point
    flattened, then every axis whose `when` fails removed (in axis order, so a condition sees
    the final values of the keys it depends on)."""
    flat = {**config.get(GRID_POINT, {}), **{k: v for k, v in config.items() if k != GRID_POINT}}
    params = {}
    for a in axes:
        if a.key in flat:
            params[a.key] = flat[a.key]
    for a in axes:
        if a.key in params and not _holds(a, params, sections):
            del params[a.key]
    return params


def grid_points(axes: list[Axis], mode: str, sections: dict[str, Any]) -> list[dict]:
    """Every combination of the grid axes, conditions applied, duplicates removed."""
    grid = [a for a in axes if a.is_grid] if mode != "random" else []
    points, seen = [], set()
    for values in itertools.product(*(a.args for a in grid)):
        point = resolve_params(dict(zip((a.key for a in grid), values)), grid, sections)
        marker = tuple(sorted((k, repr(v)) for k, v in point.items()))
        if marker not in seen:
            seen.add(marker)
            points.append(point)
    return points


def _apply_params(sections: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    out = dict(sections)
    trees: dict[str, dict] = {}
    for key, value in params.items():
        section, _, rest = key.partition(".")
        if section not in TUNABLE_SECTIONS or section not in sections or not rest:
            raise ConfigError(f"search.space.{key}: not a tunable key; keys start with one of "
                              f"{', '.join(s + '.' for s in TUNABLE_SECTIONS)}")
        if section not in trees:
            trees[section] = dataclasses.asdict(out[section])
        tree = node = trees[section]
        parts = rest.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"search.space.{key}: {section}.{part} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"search.space.{key}: unknown key; {section} keys: "
                              f"{', '.join(tree)}")
        node[parts[-1]] = value
    # One validation per section, not per key: check_space runs this for every combination.
    for section, tree in trees.items():
        out[section] = from_dict(type(out[section]), tree, section + ".")
    return out


def set_params(sections: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """New section objects with dotted `params` applied and re-validated: a value the config
    would reject is rejected here too, before anything is launched."""
    out = _apply_params(sections, params)
    if "model" in out:
        check_model(out["model"])
    return out


# Above this many combinations check_space checks every pair of values instead (see
# _combinations): checking them all would hold up the start by minutes, and a failure that
# needs three particular values at once is rare enough to be left to the trial.
MAX_COMBINATIONS = 50_000


def _values(a: Axis) -> tuple:
    """The values a trial can receive from `a` that matter for validity: every category, the
    two ends of a range (quniform's rounded to its step, as Tune rounds them)."""
    if a.is_categorical:
        return a.args
    if a.kind == "quniform":
        low, high, q = a.args
        return (round(low / q) * q, round(high / q) * q)
    return a.args[:2]


def _combinations(axes: list[Axis], mode: str, sections: dict[str, Any]):
    """Every (grid point, drawn values) a sweep can launch, as the Tune config a trial gets.
    Past MAX_COMBINATIONS: every value of every dimension (the grid points count as one) next
    to every value of every other dimension, the rest at their first value (pairwise
    coverage: what fails only with three particular values at once is then left to the trial)."""
    points = grid_points(axes, mode, sections)
    drawn = [] if mode == "grid" else [a for a in axes if mode == "random" or not a.is_grid]
    dims = [points, *(_values(a) for a in drawn)]

    def config(index: tuple) -> dict:
        return {GRID_POINT: points[index[0]],
                **{a.key: a_values[i] for a, a_values, i in zip(drawn, dims[1:], index[1:])}}

    total = math.prod(len(d) for d in dims)
    if total <= MAX_COMBINATIONS:
        for index in itertools.product(*(range(len(d)) for d in dims)):
            yield config(index)
        return
    for i, j in itertools.combinations(range(len(dims)), 2):
        for vi, vj in itertools.product(range(len(dims[i])), range(len(dims[j]))):
            index = [0] * len(dims)
            index[i], index[j] = vi, vj
            yield config(tuple(index))


def _launched_params(axes: list[Axis], mode: str, sections: dict[str, Any]):
    """The distinct parameter sets trials can run with, conditions applied as a trial applies
    them (`resolve_params`)."""
    seen = set()
    for config in _combinations(axes, mode, sections):
        params = resolve_params(config, axes, sections)
        marker = _marker(params)
        if marker not in seen:
            seen.add(marker)
            yield params


def _marker(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _memo(cache: dict, key: tuple, check) -> tuple[Any, str | None]:
    """(check(), None) or (None, its ConfigError's message), computed once per key."""
    if key not in cache:
        try:
            cache[key] = (check(), None)
        except ConfigError as e:
            cache[key] = (None, str(e))
    return cache[key]


def _combination_problem(sections: dict[str, Any], params: dict[str, Any],
                         cache: dict) -> str | None:
    """Why a trial with `params` would fail before training its first batch, or None: what
    set_params checks, the data rules across keys and the model against the images. Each
    check runs once per distinct set of the values it reads (`cache`), so a space of many
    combinations costs little more than one of its few distinct models."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        by_section.setdefault(key.partition(".")[0], {})[key] = value
    out = dict(sections)
    for section, values in by_section.items():
        out[section], problem = _memo(cache, ("section", section, _marker(values)),
                                      lambda: _apply_params(sections, values)[section])
        if problem:
            return problem
    model_marker = _marker(by_section.get("model", {}))
    if "model" in out:
        _, problem = _memo(cache, ("model", model_marker), lambda: check_model(out["model"]))
        if problem:
            return problem
    data_marker = _marker({**by_section.get("data", {}), **by_section.get("augment", {})})
    if data_marker:
        # The data and augment rules across keys (a mean per channel, transforms that fit
        # the image size); the base config passed them already.
        _, problem = _memo(cache, ("data", data_marker), lambda: validate_config(
            Config(**{s: out[s] for s in ("data", "augment", "model") if s in out})))
        if problem:
            return problem
    if "model" in out and "data" in out:
        _, problem = _memo(cache, ("input", model_marker, data_marker), lambda: check_model_input(
            out["model"], out["data"].image_size, out["data"].channels))
        if problem:
            return problem
    return None


def _show(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def check_space(axes: list[Axis], sections: dict[str, Any], mode: str = "grid+random") -> None:
    """Refuse (ConfigError) a space with a trial that would fail before training: every value
    alone against its key's type and choices, then every combination a sweep can launch (grid
    points crossed with every category and both ends of every range of the drawn axes,
    `when` applied as in a trial) against the rules across keys and against the model, which
    must take the images (`check_model_input`). The error names the fewest searched values
    that fail together."""
    searched = {a.key for a in axes}
    for axis in axes:
        for other, _ in axis.when:
            if other not in searched:
                config_value(sections, other)  # an unknown key fails here
        for v in _values(axis):
            _apply_params(sections, {axis.key: v})  # type, choices, range: names the key alone
    cache: dict = {}
    for params in _launched_params(axes, mode, sections):
        problem = _combination_problem(sections, params, cache)
        if problem is None:
            continue
        # Drop the values the failure does not need (reverting them to the config's own), so
        # the message names the few that clash, not the whole trial.
        culprit = dict(params)
        for key in list(culprit):
            rest = {k: v for k, v in culprit.items() if k != key}
            if _combination_problem(sections, rest, cache) == problem:
                culprit = rest
        if not culprit:
            raise ConfigError(problem)  # the config itself, whatever the search draws
        if len(culprit) == 1:
            (key, value), = culprit.items()
            raise ConfigError(f"search.space.{key}={value}: {problem}")
        raise ConfigError(f"search.space: the combination {_show(culprit)} is invalid: {problem}")


def check_search(search, axes: list[Axis]) -> None:
    """Rules between the search settings and the space (a `SearchConfig`)."""
    grid = [a.key for a in axes if a.is_grid]
    if search.algorithm == "optuna" and grid:
        raise ConfigError(f"search.algorithm=optuna (TPE) cannot search grid axes "
                          f"({', '.join(grid)}): use choice instead of grid, or "
                          "search.algorithm=basic")
    if search.algorithm == "optuna" and search.mode != "random":
        raise ConfigError("search.algorithm=optuna draws every trial: set search.mode=random")


def count_trials(axes: list[Axis], mode: str, num_samples: int, sections: dict[str, Any],
                 max_trials: int | None = None) -> int:
    if mode == "random":
        n = num_samples
    else:
        n = len(grid_points(axes, mode, sections)) * num_samples
    return min(n, max_trials) if max_trials else n


def _domain(a: Axis):
    from ray import tune

    if a.kind in ("grid", "choice"):
        return tune.choice(list(a.args))
    if a.kind == "uniform":
        return tune.uniform(*a.args)
    if a.kind == "loguniform":
        return tune.loguniform(*a.args)
    if a.kind == "randint":
        return tune.randint(a.args[0], a.args[1] + 1)  # inclusive upper bound
    return tune.quniform(*a.args)


def to_tune_space(axes: list[Axis], mode: str, sections: dict[str, Any], num_samples: int,
                  max_trials: int | None = None,
                  cost: Callable[[dict], float] | None = None,
                  points: list[dict] | None = None) -> tuple[dict[str, Any], int]:
    """(param_space, num_samples for TuneConfig). Grid points are expanded here, repeated
    `num_samples` times and cut at `max_trials`, so Tune sees one explicit grid and draws the
    random axes once per variant. With `cost` (a grid point's expected training time), the
    costliest points are launched first (stable otherwise): trials side by side then end
    together instead of one long trial running alone at the end. `points`: the grid points
    to launch, repeats included, instead of every point `num_samples` times (a budget's
    plan)."""
    from ray import tune

    if mode == "random":
        return {a.key: _domain(a) for a in axes}, count_trials(axes, mode, num_samples,
                                                               sections, max_trials)
    space: dict[str, Any] = {a.key: _domain(a) for a in axes if not a.is_grid and mode != "grid"}
    if points is None:
        points = grid_points(axes, mode, sections) * num_samples
    if max_trials:
        points = points[:max_trials]
    if cost is not None:
        points = sorted(points, key=cost, reverse=True)
    space[GRID_POINT] = tune.grid_search(points)
    return space, 1
