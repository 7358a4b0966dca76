"""Compose conf/ YAML groups, an experiment file and CLI overrides into a validated `Config`.

Precedence, lowest first: the typed defaults (`Config()`, components/config.py: the one place
defaults live), group files chosen by conf/config.yaml's `defaults`, the body of
conf/config.yaml, the experiment file (`--config`, whose own `defaults` may pick other group
options), CLI group picks (`model=resnet18`), CLI dotted overrides (`train.epochs=3`).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from components import storage
from components.config import (
    Config,
    ConfigError,
    check_no_credentials,
    from_dict,
    validate_config,
)

# Groups whose files hold one section's keys; `cluster` files hold top-level keys.
SECTION_GROUPS = ("data", "augment", "model", "train", "search")
TOP_LEVEL_GROUPS = ("cluster",)
GROUPS = SECTION_GROUPS + TOP_LEVEL_GROUPS
# Mappings replaced wholesale rather than merged key by key: an experiment's search space
# replaces the default one instead of adding axes to it.
_REPLACED_MAPPINGS = {"space"}


def conf_dir() -> Path:
    """$VISIONTUNE_CONF_DIR, else conf/ of this checkout (editable install, Ray job
    working_dir), of the current folder, or the copy a `pip install .` or a wheel installs
    (`<prefix>/share/visiontune/conf`, pyproject.toml's data-files)."""
    env = os.environ.get("VISIONTUNE_CONF_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[1] / "conf", Path.cwd() / "conf",
                   Path(sys.prefix) / "share" / "visiontune" / "conf"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise ConfigError(f"cannot find conf/config.yaml (looked in {', '.join(map(str, candidates))});"
                      " set VISIONTUNE_CONF_DIR")


def experiment_file(name: str | Path, root: Path | None = None) -> Path:
    """`--config`: a YAML file, or the name of one of conf/experiment/ (`quick`): how an
    installed visiontune, run from any folder, names the experiments it ships."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    return (root or conf_dir()) / "experiment" / f"{name}.yaml"


def group_options(group: str, root: Path | None = None) -> list[str]:
    root = root or conf_dir()
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _REPLACED_MAPPINGS:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed YAML value). Keys under search.space keep
    their dots: `search.space.train.lr={loguniform: [1e-4, 1e-2]}`."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.epochs=3)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    if key.startswith("search.space."):
        return ["search", "space", key[len("search.space."):]], value
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _load_group(root: Path, group: str, option: str) -> dict:
    path = root / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={option!r} is not valid; choose one of: "
                          f"{', '.join(group_options(group, root))}")
    body = load_yaml(path)
    body.pop("defaults", None)
    return {group: body} if group in SECTION_GROUPS else body


def compose(overrides: list[str] | None = None, config_file: str | Path | None = None,
            root: Path | None = None) -> dict:
    """Return the merged config as a nested dict (not yet validated)."""
    root = root or conf_dir()
    base = load_yaml(root / "config.yaml")
    choices: dict[str, str] = dict(base.pop("defaults", {}) or {})
    experiment = load_yaml(experiment_file(config_file, root)) if config_file else {}
    choices.update(experiment.pop("defaults", {}) or {})
    dotted = []
    for text in overrides or []:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] in GROUPS:
            choices[path[0]] = str(value)
        else:
            dotted.append((path, value))
    for group in choices:
        if group not in GROUPS:
            raise ConfigError(f"unknown config group {group!r}; groups: {', '.join(GROUPS)}")
    merged: dict = {}
    for group, option in choices.items():
        if option not in (None, "null", "None"):
            merged = deep_merge(merged, _load_group(root, group, option))
    merged = deep_merge(merged, base)
    merged = deep_merge(merged, experiment)
    for path, value in dotted:
        _set_path(merged, path, value)
    return merged


def load_config(overrides: list[str] | None = None, config_file: str | Path | None = None,
                root: Path | None = None, resolve: bool = True) -> Config:
    cfg = validate_config(from_dict(Config, compose(overrides, config_file, root)))
    return resolve_paths(cfg) if resolve else cfg


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or storage.is_uri(path):
        return path
    return str((base / Path(path).expanduser()).resolve())


def resolve_paths(cfg: Config, base: Path | None = None) -> Config:
    """Make every path and the tracking URI absolute: Ray workers run in other directories."""
    base = base or Path.cwd()
    cfg = copy.deepcopy(cfg)
    cfg.data.path = _absolute(cfg.data.path, base)
    cfg.data.test_path = _absolute(cfg.data.test_path, base)
    cfg.data.cache_dir = _absolute(cfg.data.cache_dir, base)
    cfg.model.weights_path = _absolute(cfg.model.weights_path, base)
    cfg.ray.storage_path = _absolute(cfg.ray.storage_path or "ray_results", base)
    # MLflow's own convention: MLFLOW_TRACKING_URI names the server when the config does not
    # (a cluster image sets it once for every job).
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if not cfg.tracking.uri:
        check_no_credentials("MLFLOW_TRACKING_URI (tracking.uri)", uri)
    if uri is None:
        uri = f"sqlite:///{(base / 'mlflow.db').resolve()}"
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    elif not storage.is_uri(uri):  # a plain folder: MLflow's file store
        uri = str((base / uri).resolve())
    cfg.tracking.uri = uri
    if cfg.tracking.artifact_location is None and not uri.startswith(("http://", "https://")):
        cfg.tracking.artifact_location = str((base / "mlruns").resolve())
    else:
        cfg.tracking.artifact_location = _absolute(cfg.tracking.artifact_location, base)
    return cfg


# Overrides `visiontune run --resume ID` accepts: where things run and are recorded, never
# what is trained or how it is scored.
RESUME_OVERRIDES = ("tracking.uri", "ray.address", "ray.num_cpus")


def resume_config(pipeline_id: str, overrides: list[str] | None = None) -> Config:
    """The config a pipeline run logged (its config.yaml), with only `RESUME_OVERRIDES`
    applied on top. The run is looked up in tracking.uri (given, $MLFLOW_TRACKING_URI or the
    default ./mlflow.db)."""
    return _logged_config("--resume", pipeline_id, overrides, RESUME_OVERRIDES,
                          "--resume continues the run with its own config")[0]


# What `visiontune run --extend ID` may change: the budget, and where things run.
EXTEND_KEYS = ("search.num_samples", "search.max_trials", "search.budget")


def extend_config(pipeline_id: str, overrides: list[str] | None = None):
    """(the run's logged config with a larger budget, its logged config, its record) for
    `visiontune run --extend ID`: only `EXTEND_KEYS` (at least one) and `RESUME_OVERRIDES`
    may be given, and the run must have finished."""
    given = {".".join(parse_override(t)[0]) for t in overrides or []}
    if not given & set(EXTEND_KEYS):
        raise ConfigError(f"--extend {pipeline_id} needs a larger budget: "
                          f"{', '.join(k + '=...' for k in EXTEND_KEYS)}")
    cfg, record = _logged_config("--extend", pipeline_id, overrides,
                                 (*EXTEND_KEYS, *RESUME_OVERRIDES),
                                 "--extend adds trials to the run's own experiment")
    status = record.status()
    if record.run().data.tags.get("visiontune.extension_state") in ("running", "stopped"):
        raise ConfigError(f"--extend {pipeline_id}: its last extension did not finish; "
                          f"continue it with: visiontune run --resume {pipeline_id}")
    if status != "FINISHED":
        raise ConfigError(f"--extend {pipeline_id}: the run did not finish (status {status}); "
                          f"continue it with: visiontune run --resume {pipeline_id}")
    before = _logged_config("--extend", pipeline_id, [o for o in overrides or []
                                                       if o.split("=")[0] in RESUME_OVERRIDES],
                            RESUME_OVERRIDES, "")[0]
    _check_larger(pipeline_id, cfg, before)
    return cfg, before, record


def _check_larger(pipeline_id: str, cfg: Config, before: Config) -> None:
    """An extension must add something: more trials, or more time."""
    from components.durations import parse_duration
    from components.tuning.space import TRIAL_SECTIONS, count_trials, parse_space

    new, old = cfg.search, before.search
    if new.budget != old.budget:
        if old.budget is not None and (new.budget is None or parse_duration(new.budget)
                                       <= parse_duration(old.budget)):
            raise ConfigError(f"--extend {pipeline_id}: search.budget={new.budget} is not "
                              f"larger than the run's {old.budget}")
        return

    def count(c: Config) -> int:
        return count_trials(parse_space(c.search.space), c.search.mode, c.search.num_samples,
                            {s: getattr(c, s) for s in TRIAL_SECTIONS}, c.search.max_trials)
    if count(cfg) <= count(before):
        raise ConfigError(f"--extend {pipeline_id}: the run planned {count(before)} trials and "
                          f"this budget plans {count(cfg)}: nothing to add")


def _logged_config(flag: str, pipeline_id: str, overrides: list[str] | None,
                   allowed: tuple[str, ...], why: str):
    """(the config run `pipeline_id` logged with `overrides` of the `allowed` keys, its
    record)."""
    from components.tracking import PipelineRecord, Tracker, check_tracking_uri

    changes = []
    for text in overrides or []:
        path, value = parse_override(text)
        key = ".".join(path)
        if key not in allowed:
            raise ConfigError(f"{why}: {key} cannot be changed (it would change the "
                              f"experiment); allowed: {', '.join(allowed)}")
        changes.append((path, value))
    given = {".".join(p): v for p, v in changes}
    tracking = {"uri": given["tracking.uri"]} if "tracking.uri" in given else {}
    uri = resolve_paths(from_dict(Config, {"tracking": tracking})).tracking.uri
    check_tracking_uri(uri)
    record = PipelineRecord.find(Tracker(uri), pipeline_id)
    if record is None:
        raise ConfigError(f"{flag} {pipeline_id}: no pipeline run with that id in the MLflow "
                          f"store {uri} (the id is printed when a run starts; give "
                          "tracking.uri=... if the run was recorded elsewhere)")
    logged = yaml.safe_load(record.config_text()) or {}
    for path, value in changes:
        _set_path(logged, path, value)
    cfg = resolve_paths(validate_config(from_dict(Config, logged)))
    cfg.tracking.uri = uri  # where the run was found, even if it was logged under another
    return cfg, record
