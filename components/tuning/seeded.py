"""Optuna told what earlier trials found: an extended run's own trials (`visiontune run
--extend`), or another run's (`--warm-start`), before it suggests anything."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class SeededOptuna(OptunaSearch):
    """Optuna's TPE, told the results of trials run before it starts (Ray's public
    `add_evaluated_point`, once Tune has given it the search space). A value a conditional
    axis did not take is given as the axis's first choice or low end (Optuna wants every
    parameter); a trial with a value outside this space is left out."""

    def __init__(self, seeds: tuple = (), **kwargs):
        super().__init__(**kwargs)
        self.seeds = tuple(seeds)
        self.told: list[tuple[dict, float]] = []

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = super().set_search_properties(metric, mode, config, **spec)
        if ok and self.seeds:
            space = self.convert_search_space(config)   # Tune's space as Optuna's
            for params, value in self.seeds:
                point = {}
                for key, dist in space.items():
                    v = params.get(key)
                    if v is None:
                        v = dist.choices[0] if hasattr(dist, "choices") else dist.low
                    if not _inside(dist, v):
                        break
                    point[key] = int(v) if type(dist).__name__ == "IntDistribution" else v
                else:
                    try:
                        self.add_evaluated_point(point, float(value))
                    except ValueError:   # whatever Optuna still refuses is left out
                        continue
                    self.told.append((point, float(value)))
        return ok


def _inside(dist, value) -> bool:
    """Whether an Optuna distribution holds `value`: a choice, or a number in range, on its
    step and an integer where the distribution is one."""
    if hasattr(dist, "choices"):
        return value in dist.choices
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    if not dist.low <= v <= dist.high:
        return False
    if type(dist).__name__ == "IntDistribution" and v != int(v):
        return False
    step = getattr(dist, "step", None)
    return not step or abs((v - dist.low) / step - round((v - dist.low) / step)) < 1e-9
