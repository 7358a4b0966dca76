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
from dataclasses import dataclass
from typing import Any

from components.config import ConfigError, check_model, from_dict

RANDOM_KINDS = {"choice": None, "uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3}
KINDS = ("grid", *RANDOM_KINDS)
TUNABLE_SECTIONS = ("data", "augment", "model", "train", "evaluation")
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


def set_params(sections: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """New section objects with dotted `params` applied and re-validated: a value the config
    would reject is rejected here too, before anything is launched."""
    out = dict(sections)
    for key, value in params.items():
        section, _, rest = key.partition(".")
        if section not in TUNABLE_SECTIONS or section not in sections or not rest:
            raise ConfigError(f"search.space.{key}: not a tunable key; keys start with one of "
                              f"{', '.join(s + '.' for s in TUNABLE_SECTIONS)}")
        tree = dataclasses.asdict(out[section])
        node = tree
        parts = rest.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"search.space.{key}: {section}.{part} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"search.space.{key}: unknown key; {section} keys: "
                              f"{', '.join(tree)}")
        node[parts[-1]] = value
        out[section] = from_dict(type(out[section]), tree, section + ".")
    if "model" in out:
        check_model(out["model"])
    return out


def check_space(axes: list[Axis], sections: dict[str, Any], mode: str = "grid+random") -> None:
    """Every grid point as a whole, and every value of the random axes (categories, both ends
    of a range) against the config: what would fail in a trial fails here, before Ray starts."""
    points = grid_points(axes, mode, sections)
    for point in points:
        set_params(sections, point)
    searched = {a.key for a in axes}
    for axis in axes:
        for other, _ in axis.when:
            if other not in searched:
                config_value(sections, other)  # an unknown key fails here
        if axis.is_grid and mode != "random":
            continue  # checked above, in every combination it is launched in
        # A random value is checked on a grid point it is launched with (one that meets its
        # condition, if it has one), with its condition keys set.
        context = {k: allowed[0] for k, allowed in axis.when}
        base = next((p for p in points if _holds(axis, p, sections)), {})
        for v in axis.args if axis.is_categorical else axis.args[:2]:
            set_params(sections, {**base, **context, axis.key: v})


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
                  max_trials: int | None = None) -> tuple[dict[str, Any], int]:
    """(param_space, num_samples for TuneConfig). Grid points are expanded here, repeated
    `num_samples` times and cut at `max_trials`, so Tune sees one explicit grid and draws the
    random axes once per variant."""
    from ray import tune

    if mode == "random":
        return {a.key: _domain(a) for a in axes}, count_trials(axes, mode, num_samples,
                                                               sections, max_trials)
    space: dict[str, Any] = {a.key: _domain(a) for a in axes if not a.is_grid and mode != "grid"}
    points = grid_points(axes, mode, sections) * num_samples
    if max_trials:
        points = points[:max_trials]
    space[GRID_POINT] = tune.grid_search(points)
    return space, 1
