"""One source of defaults: the typed config (components/config.py). `Config()` is the run
`visiontune run` starts with no options, and no file of conf/ restates one of its values, so
code, tests and the command line cannot drift apart again."""

import dataclasses
import operator
import os
import subprocess
import sys

import pytest
import yaml

from components.config import Config, from_dict, to_dict
from pipelines.compose import SECTION_GROUPS, conf_dir, load_config, load_yaml, resolve_paths

CONF = conf_dir()
DEFAULT = Config()
DEFAULT_PICKS = load_yaml(CONF / "config.yaml")["defaults"]


def _keys(tree: dict, typed, prefix: str = ""):
    """The dotted keys `tree` sets, down to the leaves of the config (a mapping-valued key
    such as search.space is one key)."""
    for name, value in tree.items():
        sub = getattr(typed, name)
        if dataclasses.is_dataclass(sub):
            yield from _keys(value, sub, f"{prefix}{name}.")
        else:
            yield prefix + name


def _restated(tree: dict, *bases: Config) -> list[str]:
    """The keys `tree` (nested like the config) sets to the value every one of `bases` has
    already, compared after validation (a YAML `1` for a float key is 1.0)."""
    typed = from_dict(Config, tree)
    return [key for key in _keys(tree, typed)
            if all(operator.attrgetter(key)(typed) == operator.attrgetter(key)(b) for b in bases)]


def test_the_default_run_is_the_config_built_in_code(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "VISIONTUNE_CONF_DIR")}
    printed = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--print-config"],
                             cwd=tmp_path, env=env, capture_output=True, text=True,
                             check=True).stdout
    expected = to_dict(resolve_paths(Config(), tmp_path))   # where this run would write
    assert yaml.safe_load(printed) == expected
    assert printed == yaml.safe_dump(expected, sort_keys=False) + "\n"
    assert load_config([], resolve=False) == Config()


def test_the_options_config_yaml_picks_set_nothing():
    assert set(load_yaml(CONF / "config.yaml")) == {"defaults"}
    for group, option in DEFAULT_PICKS.items():
        assert load_yaml(CONF / group / f"{option}.yaml") == {}, f"{group}/{option}.yaml"


GROUP_FILES = sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name != "experiment")


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_group_file_restates_a_default(path):
    body = load_yaml(path)
    tree = {path.parent.name: body} if path.parent.name in SECTION_GROUPS else body
    assert _restated(tree, DEFAULT) == [], f"{path} restates defaults of components/config.py"


@pytest.mark.parametrize("path", sorted(CONF.glob("experiment/*.yaml")), ids=lambda p: p.stem)
def test_no_experiment_restates_a_default(path):
    """An experiment's key may repeat its groups' value when it differs from the default
    (it then holds with other group picks too), never the default itself."""
    body = load_yaml(path)
    picks = body.pop("defaults", None) or {}
    assert [g for g, o in picks.items() if DEFAULT_PICKS.get(g) == o] == []
    groups = load_config([f"{g}={o}" for g, o in picks.items()], resolve=False)
    assert _restated(body, DEFAULT, groups) == [], f"{path} restates defaults"


def test_a_restated_default_is_found():
    tree = {"train": {"epochs": DEFAULT.train.epochs, "lr": DEFAULT.train.lr * 2,
                      "cpus_per_worker": int(DEFAULT.train.cpus_per_worker)},
            "data": {"mean": list(DEFAULT.data.mean)}, "search": {"space": {}}}
    assert _restated(tree, DEFAULT) == ["train.epochs", "train.cpus_per_worker", "data.mean"]
