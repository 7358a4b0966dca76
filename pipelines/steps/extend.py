"""More trials for a finished run (`visiontune run --extend ID search.num_samples=N`), and a
new run's searcher seeded from another run's trials (`--warm-start ID`).

An extension continues the same parent run as if it had been launched with the larger budget:
its trials so far are kept (read back from their Tune experiments, not retrained or logged
again), and a new Tune experiment `<id>-x<k>` runs only what the larger budget adds:
- grid modes: the grid points (repeats included, cut at `search.max_trials`) of the larger
  budget that have not run yet; with `search.budget`, the added time is planned over them;
- random draws: the difference in `num_samples`, from a draw stream of the extension's own (new
  points, not repeats of the first draws);
- Optuna: the difference, its TPE told every earlier trial's result first.
Its steps are recorded under their own names (`tune-x1`, `evaluate-x1`, `register-x1`), so a
Ctrl-C'd extension continues with `--resume ID` like any run. The best trial over all trials
is evaluated on the test split and registered only when it is not the one that already was.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

import yaml

from components.config import Config, ConfigError, to_dict
from components.data import (
    drop_near_copies_of_test,
    index_images,
    split_dataset,
    write_digits_folder,
)
from components.data.split import SplitManifest
from components.errors import first_line
from components.tracking import PipelineRecord
from components.tuning.driver import earlier_params
from components.tuning.space import _marker, grid_points, parse_space
from pipelines.steps.common import SearchPlan
from pipelines.steps.data import validated_images
from pipelines.steps.register import REGISTERED_TRIAL_TAG

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)

EXTENSIONS_TAG = "visiontune.extensions"   # how many times the run was extended
# running | stopped (interrupted or failed: `--resume ID` continues it) | done. A run whose
# extension stopped stays FINISHED: its registered version is still the one it finished with.
EXTENSION_STATE_TAG = "visiontune.extension_state"
WARM_START_TAG = "visiontune.warm_start"   # the pipeline id whose trials seeded this run
WARM_START_NEEDS = ("--warm-start seeds a model-based searcher with another run's trials: "
                    "set search.algorithm=optuna (with search.mode=random)")
SEED_STRIDE = 7919   # an extension's random draws: seed + k * SEED_STRIDE


@dataclass(frozen=True)
class Extension:
    """The k-th extension of run `pipeline_id` (0: the run's own first sweep)."""

    pipeline_id: str
    number: int

    @property
    def suffix(self) -> str:
        return f"-x{self.number}" if self.number else ""

    @property
    def experiment(self) -> str:
        return self.pipeline_id + self.suffix

    @property
    def earlier(self) -> tuple[str, ...]:
        """The Tune experiments of the sweeps before this one."""
        return tuple(Extension(self.pipeline_id, k).experiment for k in range(self.number))

    def seed(self, seed: int) -> int:
        return seed + self.number * SEED_STRIDE


def extension_of(record) -> Extension:
    """The sweep a (resumed) run is in: its latest extension, or its first sweep."""
    return Extension(record.pipeline_id,
                     int(record.run().data.tags.get(EXTENSIONS_TAG, "0") or 0))


def extension_pending(record) -> bool:
    """Whether the run's latest extension started and did not finish."""
    return record.run().data.tags.get(EXTENSION_STATE_TAG) in ("running", "stopped")


def begin_extension(cfg: Config, before: Config, record, manifest: SplitManifest,
                    plan: SearchPlan) -> Extension:
    """Check the data is what the run trained on, then record the extension on the parent
    run (its number, the larger budget as the run's config) and reopen it."""
    m = record.run().data.metrics
    check_data_unchanged(cfg, manifest, record.pipeline_id,
                         int(m["data_num_images"] + m.get("data_num_skipped", 0))
                         if "data_num_images" in m else None)
    ext = Extension(record.pipeline_id, extension_of(record).number + 1)
    try:
        ran = earlier_params(cfg.ray.storage_path, ext.earlier, plan.axes, plan.base)
    except Exception as e:   # the sweeps' own records are what an extension keeps
        raise ConfigError(f"--extend {record.pipeline_id}: its trials cannot be read back "
                          f"from ray.storage_path={cfg.ray.storage_path} ({first_line(e)}); "
                          "an extension needs the run's Tune experiments there") from None
    if not trials_left(cfg, plan, ran)["count"]:
        raise ConfigError(f"--extend {record.pipeline_id}: its {len(ran)} trials already cover "
                          "every point of this search; a larger budget adds nothing to run "
                          "(give search.num_samples=N to repeat the grid)")
    changed = {k: v for k, v in _budget(cfg).items() if _budget(before)[k] != v}
    record.reopen()
    try:
        record.set_tags({EXTENSIONS_TAG: str(ext.number), EXTENSION_STATE_TAG: "running"})
        record.log_params({f"x{ext.number}.{k}": v for k, v in changed.items()})
        # `--resume ID` of an interrupted extension reads the run's config: the larger budget
        record.log_text(yaml.safe_dump(to_dict(before), sort_keys=False),
                        f"config_before_x{ext.number}.yaml")
        record.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
    except BaseException:
        record.close("FINISHED")   # as it was: it still holds its first sweep and version
        raise
    log.info(f"[visiontune] extending pipeline {record.pipeline_id} (extension {ext.number}): "
             + ", ".join(f"{k} {_budget(before)[k]} -> {v}" for k, v in changed.items()))
    return ext


def best_prefix(params: dict[str, str]) -> str:
    """The parameter prefix of the run's latest evaluation: "x2." when its second extension
    found a new best trial, "" for the first sweep's."""
    rounds = [int(k[1:].split(".", 1)[0]) for k in params
              if re.fullmatch(r"x\d+\.best_trial_id", k)]
    return f"x{max(rounds)}." if rounds else ""


def best_so_far(record) -> str | None:
    """The trial behind the run's registered version (an extension that evaluated a new best
    but was stopped before registering it has not replaced it)."""
    data = record.run().data
    if REGISTERED_TRIAL_TAG in data.tags:
        return data.tags[REGISTERED_TRIAL_TAG]
    # a run registered before the tag: its first sweep's best is what it registered
    return data.params.get("best_trial_id") if "visiontune.registered_version" in data.tags \
        else None


def _budget(cfg: Config) -> dict:
    return {"search.num_samples": cfg.search.num_samples,
            "search.max_trials": cfg.search.max_trials, "search.budget": cfg.search.budget}


def check_data_unchanged(cfg: Config, manifest: SplitManifest, pipeline_id: str,
                         files_then: int | None = None) -> None:
    """Index, read and split the data again (the run's decoded store is found again, nothing
    is recorded) and compare the fingerprint with the run's: an extension's trials must be
    comparable with the first. `files_then`: the image files the run found (kept and
    skipped); a folder that grew or shrank is refused before anything is read."""
    d = cfg.data
    index = index_images(d.path or str(write_digits_folder(d.cache_dir)))
    test_index = index_images(d.test_path) if d.test_path else None
    files = len(index) + (len(test_index) if test_index is not None else 0)
    # grown or shrunk: refused before anything is read (with a separate test set, near-copies
    # of it were left out uncounted: the fingerprint below decides)
    if files_then is not None and test_index is None and files != files_then:
        raise ConfigError(f"--extend {pipeline_id}: the data changed since the run ({files} "
                          f"image files now, {files_then} then): its trials would not be "
                          "comparable; start a new run instead")
    # read as the run read them (its decoded store, found again, gives the same hashes)
    images = validated_images(cfg, index, 1, quiet=True)
    test = (validated_images(cfg, test_index, 1, quiet=True) if test_index is not None
            else None)
    if test is not None:
        images = drop_near_copies_of_test(images, test, d.near_copy_distance)
    seed = cfg.seed if d.split_seed is None else d.split_seed
    now = split_dataset(images, d.val_fraction, d.test_fraction, seed, test,
                        d.near_copy_distance).fingerprint
    if now != manifest.fingerprint:
        raise ConfigError(f"--extend {pipeline_id}: the data changed since the "
                          f"run (fingerprint {now[:12]} now, {manifest.fingerprint[:12]} then): "
                          "its trials would not be comparable; start a new run instead")


def grid_left(planned: list[dict], done: list[dict]) -> list[dict]:
    """The planned grid points (in order, repeats included) that the done ones do not
    already account for."""
    have = Counter(_marker(p) for p in done)
    left = []
    for p in planned:
        m = _marker(p)
        if have[m]:
            have[m] -= 1
        else:
            left.append(p)
    return left


def trials_left(cfg: Config, plan, earlier: list[dict]) -> dict:
    """What an extension adds to trials that ran with the `earlier` parameters: the grid
    points (repeats included, cut at max_trials) not run yet, or the random draws still to
    make; with a budget and every point run, another draw per point (grid+random)."""
    se = cfg.search
    if se.mode == "random":
        n = plan.num_trials - len(earlier) if se.budget is None else plan.num_trials
        return {"points": None, "num_samples": max(0, n), "count": max(0, n)}
    grid = (grid_points(plan.axes, se.mode, plan.base) or [{}]) * se.num_samples
    if se.budget is None:
        grid = grid[:se.max_trials or None]
    points = grid_left(grid, [_grid_part(p, plan) for p in earlier])
    if not points and se.budget is not None and se.mode == "grid+random":
        points = grid_points(plan.axes, se.mode, plan.base) or [{}]
    return {"points": points, "num_samples": None, "count": len(points)}


def _grid_part(params: dict, plan) -> dict:
    """A trial's values of the grid axes: its grid point."""
    grid = {a.key for a in plan.axes if a.is_grid}
    return {k: v for k, v in params.items() if k in grid}


def seeds_of(trials) -> tuple:
    """(params, best val F1) of the trials that have a score: what Optuna is told first."""
    return tuple((dict(t.params), t.best_val_f1) for t in trials
                 if t.best_val_f1 is not None and t.best_val_f1 >= 0)


def warm_start_seeds(cfg: Config, pipeline_id: str, record) -> tuple:
    """Another run's trials (its leaderboard) as seeds for this run's Optuna, recorded on
    this run; refused for a searcher that cannot use them."""
    import pandas as pd

    if cfg.search.algorithm != "optuna":
        raise ConfigError(WARM_START_NEEDS)
    other = PipelineRecord.find(record.tracker, pipeline_id)
    if other is None:
        raise ConfigError(f"--warm-start {pipeline_id}: no pipeline run with that id in the "
                          f"MLflow store {cfg.tracking.uri}")
    try:
        text = other.tracker.client.download_artifacts(other.run_id,
                                                       "evaluation/leaderboard.csv")
    except Exception as e:
        raise ConfigError(f"--warm-start {pipeline_id}: the run has no leaderboard (it did "
                          f"not finish its sweep): {e}") from None
    board = pd.read_csv(text)
    axes = _axes(cfg)
    seeds = []
    for _, row in board.iterrows():
        params = {a.key: row[a.key] for a in axes if a.key in board and pd.notna(row[a.key])}
        if pd.notna(row.get("best_val_f1")) and all(_holds(a, params.get(a.key))
                                                    for a in axes):
            seeds.append((params, float(row["best_val_f1"])))
    seeds = tuple(seeds)
    record.set_tags({WARM_START_TAG: pipeline_id})
    data = other.run().data.tags.get("visiontune.data_fingerprint", "?")[:12]
    log.info(f"  warm start: Optuna is told the {len(seeds)} trials of {pipeline_id} inside "
             f"this search space first (of {len(board)}; its data: fingerprint {data})")
    return seeds


def _holds(axis, value) -> bool:
    """Whether this run's `axis` can take another run's `value` (None: did not apply)."""
    if value is None:
        return True
    if axis.is_categorical:
        return value in axis.args
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    low, high = axis.args[0], axis.args[1]
    if axis.kind == "randint":
        return v == int(v) and low <= v <= high
    if axis.kind == "quniform":   # on its step, as Tune draws it
        k = (v - low) / axis.args[2]
        return abs(k - round(k)) < 1e-9 and low <= v <= high
    return low <= v <= high


def _axes(cfg: Config):

    return parse_space(cfg.search.space)
