"""The search-space language of conf/search/*.yaml.

`space` maps a dotted config key to one distribution:
  {grid: [a, b]}            every value, crossed with the other grid axes
  {choice: [a, b]}          one value drawn per trial
  {uniform: [lo, hi]}  {loguniform: [lo, hi]}  {randint: [lo, hi]}  {quniform: [lo, hi, q]}

Modes: `grid` crosses the grid axes only (random axes keep their config values); `random`
draws every axis (grid axes become choices) `num_samples` times; `grid+random` crosses the
grid and draws the random axes `num_samples` times per grid point.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from components.config import ConfigError, from_dict

RANDOM_KINDS = {"choice": None, "uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3}
KINDS = ("grid", *RANDOM_KINDS)
TUNABLE_SECTIONS = ("data", "augment", "model", "train", "evaluation")


@dataclass(frozen=True)
class Axis:
    key: str        # dotted config key, e.g. "train.lr"
    kind: str       # one of KINDS
    args: tuple

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
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where} must be one of {{kind: values}} with kind in "
                              f"{', '.join(KINDS)}; got {spec!r}")
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
        axes.append(Axis(key, kind, tuple(args)))
    return axes


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
    return out


def check_space(axes: list[Axis], sections: dict[str, Any]) -> None:
    """Try every categorical value and both ends of every range against the config."""
    for axis in axes:
        values = axis.args if axis.is_categorical else axis.args[:2]
        for v in values:
            set_params(sections, {axis.key: v})


def active_axes(axes: list[Axis], mode: str) -> list[Axis]:
    return [a for a in axes if a.is_grid] if mode == "grid" else list(axes)


def count_trials(axes: list[Axis], mode: str, num_samples: int) -> int:
    if mode == "random":
        return num_samples
    grid = math.prod(len(a.args) for a in axes if a.is_grid)
    return grid * num_samples


def to_tune_space(axes: list[Axis], mode: str) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for a in active_axes(axes, mode):
        if a.kind == "grid":
            space[a.key] = (tune.choice(list(a.args)) if mode == "random"
                            else tune.grid_search(list(a.args)))
        elif a.kind == "choice":
            space[a.key] = tune.choice(list(a.args))
        elif a.kind == "uniform":
            space[a.key] = tune.uniform(*a.args)
        elif a.kind == "loguniform":
            space[a.key] = tune.loguniform(*a.args)
        elif a.kind == "randint":
            space[a.key] = tune.randint(a.args[0], a.args[1] + 1)  # inclusive upper bound
        elif a.kind == "quniform":
            space[a.key] = tune.quniform(*a.args)
    return space
