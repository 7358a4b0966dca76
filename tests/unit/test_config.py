import subprocess
import sys
from pathlib import Path

import pytest

from components.config import Config, ConfigError
from pipelines.cli import main
from pipelines.compose import GROUPS, compose, conf_dir, group_options, load_config

CONF = conf_dir()


def test_default_config_loads_and_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([])
    assert isinstance(cfg, Config)
    assert cfg.data.path is None and cfg.data.channels == 1
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cfg.tracking.artifact_location == str(tmp_path / "mlruns")
    assert cfg.ray.storage_path == str(tmp_path / "ray_results")
    assert "model.name" in cfg.search.space


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_loads(group, option):
    load_config([f"{group}={option}"], resolve=False)


def _check_search_space(cfg):
    """What the pipeline checks before Ray starts: the space against the config."""
    from components.tuning.space import check_search, check_space, parse_space

    axes = parse_space(cfg.search.space)
    check_space(axes, {s: getattr(cfg, s) for s in ("data", "augment", "model", "train")},
                cfg.search.mode)
    check_search(cfg.search, axes)


@pytest.mark.parametrize("path", sorted((CONF / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_loads_and_its_search_space_is_valid(path):
    _check_search_space(load_config([], config_file=path, resolve=False))


@pytest.mark.parametrize("option", group_options("search"))
def test_every_search_space_is_valid(option):
    _check_search_space(load_config([f"search={option}"], resolve=False))


def test_public_override_keys():
    cfg = load_config([
        "data.path=/data/cats", "data.image_size=64", "search.mode=random",
        "search.num_samples=4", "train.epochs=7", "train.num_workers=1", "train.use_gpu=true",
        "tracking.uri=http://mlflow:5000", "registry.model_name=cats", "ray.address=auto",
        "seed=3"])
    assert (cfg.data.path, cfg.data.image_size, cfg.search.mode, cfg.search.num_samples) == \
        ("/data/cats", 64, "random", 4)
    assert (cfg.train.epochs, cfg.train.num_workers, cfg.train.use_gpu) == (7, 1, True)
    assert cfg.tracking.uri == "http://mlflow:5000" and cfg.tracking.artifact_location is None
    assert (cfg.registry.model_name, cfg.ray.address, cfg.seed) == ("cats", "auto", 3)


def test_num_workers_is_auto_unless_a_number_is_given():
    assert load_config([], resolve=False).train.num_workers == "auto"
    assert load_config(["train.num_workers=auto"], resolve=False).train.num_workers == "auto"
    assert load_config(["train.num_workers=2"], resolve=False).train.num_workers == 2


def test_group_pick_and_experiment_precedence(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("defaults:\n  model: resnet18\ntrain:\n  epochs: 9\n")
    cfg = load_config(["train.epochs=4"], config_file=exp, resolve=False)
    assert cfg.model.name == "resnet18" and cfg.train.epochs == 4
    assert load_config([], config_file=exp, resolve=False).train.epochs == 9
    assert load_config(["search=quick"], resolve=False).search.mode == "grid"


def test_experiment_search_space_replaces_the_default_one():
    merged = compose(["search=quick"])
    assert list(merged["search"]["space"]) == ["train.optimizer"]


@pytest.mark.parametrize("override,message", [
    (["train.epoch=3"], "unknown key train.epoch; valid keys: train.epochs"),
    (["train.optimizer=adamx"], "train.optimizer='adamx' is not valid; choose one of: sgd"),
    (["train.epochs=three"], "train.epochs='three' must be an integer"),
    (["train.epochs=0"], "train.epochs=0 must be > 0"),
    (["search.mode=bayes"], "search.mode='bayes' is not valid; choose one of: grid, random"),
    (["model=transformer"], "model='transformer' is not valid; choose one of: cnn, resnet18"),
    (["model.name=resnet19"], "model.name='resnet19' is not valid"),
    (["bogus.key=1"], "unknown key bogus; valid keys: data, augment"),
    (["data.val_fraction=0.5", "data.test_fraction=0.45"], "must leave >= 10% for training"),
    (["augment.train=[{name: Sharpen}]"], "unknown augmentation 'Sharpen'"),
    (["train.epochs"], "must look like key=value"),
    (["train.num_workers=0"], "train.num_workers=0 must be auto or an integer > 0"),
    (["train.num_workers=many"], "train.num_workers='many' must be auto or an integer > 0"),
    (["train.num_workers=1.5"], "must be auto or an integer > 0"),
])
def test_bad_config_is_a_one_line_error(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(override, resolve=False)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("space,message", [
    ({"train.lr": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
    ({"train.lr": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
    ({"train.optimizer": {"grid": ["adam", "adamx"]}}, "train.optimizer='adamx' is not valid"),
    ({"train.nope": {"grid": [1]}}, "search.space.train.nope: unknown key"),
    ({"seed": {"grid": [1, 2]}}, "not a tunable key"),
])
def test_bad_search_space_is_refused_before_launch(space, message):
    from components.tuning.space import check_space, parse_space

    cfg = Config()
    with pytest.raises(ConfigError, match=message):
        check_space(parse_space(space), {s: getattr(cfg, s) for s in ("data", "augment",
                                                                       "model", "train")})


def test_cli_exit_code_2_and_one_line(capsys):
    assert main(["run", "train.optimizer=adamx", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visiontune: config error: train.optimizer='adamx'")
    assert len(err.splitlines()) == 1


def test_cli_help_lists_groups_and_keys():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--help"],
                         capture_output=True, text=True, cwd=Path(__file__).parent, check=True)
    for text in ("config groups", "search ", "default | optuna | quick", "train.epochs",
                 "data.path", "search.num_samples", "registry.model_name", "ray.address", "seed"):
        assert text in out.stdout


def test_tracking_uri_falls_back_to_mlflow_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_config([]).tracking.uri == "http://mlflow:5000"
    assert load_config(["tracking.uri=sqlite:///x.db"]).tracking.uri == \
        f"sqlite:///{tmp_path / 'x.db'}"


def test_cli_and_config_validation_do_not_import_torch():
    """`visiontune --help`, `jobs --help` and a mistyped value answer at once: neither the
    command line nor checking keys, types and names imports torch or torchvision (checking a
    whole valid config builds its augmentations, which does)."""
    import subprocess
    import sys

    code = ("import sys; import pipelines.cli as c; from pipelines.compose import load_config\n"
            "try: load_config(['model.activation=gelu', 'train.optimizer=sgd', 'train.epochs=x'])\n"
            "except c.ConfigError as e: assert 'train.epochs' in str(e)\n"
            "c.build_parser(); print(sorted(m for m in ('torch', 'torchvision', 'ray', 'mlflow')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_torch_free_name_lists_match_the_registries():
    from components import names
    from components.models.cnn import ACTIVATIONS, POOLINGS
    from components.models.initializers import INITIALIZER_NAMES
    from components.training.optim import OPTIMIZER_NAMES, SCHEDULER_NAMES

    assert names.ACTIVATION_NAMES == tuple(ACTIVATIONS)
    assert names.POOLING_NAMES == tuple(POOLINGS)
    assert names.INITIALIZER_NAMES == tuple(INITIALIZER_NAMES)
    assert names.OPTIMIZER_NAMES == tuple(OPTIMIZER_NAMES)
    assert names.SCHEDULER_NAMES == tuple(SCHEDULER_NAMES)


def test_jobs_and_status_answer_without_torch_or_ray():
    """(The errors a user can fix and their exit codes: tests/unit/test_exit_codes.py.)"""
    import subprocess
    import sys

    code = ("import sys; from pipelines.cli import main\n"
            "for argv in (['status', 'visiontune-x', '--address', 'http://127.0.0.1:9'],\n"
            "             ['jobs', '--address', '127.0.0.1:9']):\n"
            "    assert main(argv) == 1\n"
            # `run` imports the pipeline before it quiets MLflow: MLflow reads its logging
            # level when first imported, so importing the pipeline must not import it
            "import pipelines.training, pipelines.registry_commands, pipelines.serve\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"
    assert p.stderr.count("visiontune: error: cannot reach the Ray dashboard at "
                          "http://127.0.0.1:9") == 2
