"""Reviewing a sweep on the parent run: which axes mattered (importance, marginal effects),
the parallel-coordinates page, per-trial system metrics. Local Ray with 2 CPUs, SQLite MLflow
in a temp dir."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from pipelines.compose import load_config
from pipelines.training import run_training_pipeline
from tests.conftest import log_lines, make_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COURSE_GRID = ("search.space={model.initializer: {grid: [zeros, kaiming_normal]}, "
               "train.optimizer: {grid: [adam, nadam]}, model.dropout: {grid: [0.0, 0.2]}}")


def _artifact(uri: str, run_id: str, path: str) -> str:
    return open(download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri)).read()


@pytest.fixture(scope="module")
def course_sweep(tmp_path_factory, local_ray):
    """The course's grid on the CNN: zero weights cannot learn (every unit computes the same),
    the optimizer and dropout matter little."""
    tmp = tmp_path_factory.mktemp("course")
    data = make_image_folder(tmp / "images", per_class=30, corrupt=False)
    cfg = load_config([f"data.path={data}", "data=folder", "data.image_size=16",
                       "augment=none", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                       f"ray.storage_path={tmp}/ray_results", "train.patience=0",
                       "train.batch_size=8", "train.epochs=3", "train.lr=0.003",
                       "model.cnn.channels=[8,16]", "search.mode=grid", "search.budget=null",
                       "search.scheduler=none", COURSE_GRID])
    with log_lines("pipelines") as lines:   # the run's console lines
        result = run_training_pipeline(cfg)
    return cfg, result, lines


def test_the_course_grid_ranks_the_initializer_first(course_sweep):
    cfg, result, lines = course_sweep
    uri, run = cfg.tracking.uri, result.parent_run_id
    table = pd.read_csv(io.StringIO(_artifact(uri, run, "evaluation/param_importance.csv")))
    assert list(table.columns) == ["param", "importance", "low", "high"]
    assert table.iloc[0]["param"] == "model.initializer", table
    assert set(table["param"]) == {"model.initializer", "train.optimizer", "model.dropout"}
    effects = pd.read_csv(io.StringIO(_artifact(uri, run, "evaluation/marginal_effects.csv")))
    init = effects[effects.param == "model.initializer"].set_index("value")
    assert init.loc["kaiming_normal", "mean_val_f1"] > init.loc["zeros", "mean_val_f1"] + 0.1
    assert list(init["n"]) == [4, 4]
    # one console line, saying what it rests on
    said = [x for x in lines if "importance (fANOVA over 8 trials" in x]
    assert len(said) == 1 and "model.initializer" in said[0].split(":")[1].split(",")[0]
    names = {a.path for a in MlflowClient(uri).list_artifacts(run, "evaluation")}
    assert {"evaluation/param_importance.png", "evaluation/marginal_effects.png",
            "evaluation/parallel_coordinates.html"} <= names


def test_the_parallel_coordinates_page_draws_every_trial_over_every_axis(course_sweep):
    cfg, result, _ = course_sweep
    page = _artifact(cfg.tracking.uri, result.parent_run_id,
                     "evaluation/parallel_coordinates.html")
    for key in ("model.initializer", "train.optimizer", "model.dropout", "best_val_f1"):
        assert key in page
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)   # self-contained
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium to run the page's script")
    path = Path(cfg.ray.storage_path) / "parallel.html"
    path.write_text(page)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count('class="trial"') == 8, dom[-2000:]
    axis_names = re.findall(r'<text[^>]*class="name"[^>]*>([^<]+)</text>', dom)
    assert axis_names == ["model.initializer", "train.optimizer", "model.dropout",
                          "best_val_f1"]


def test_every_trial_run_records_its_system_metrics_at_under_one_percent(course_sweep):
    """CPU, memory, disk and network of the node and the training process, from rank 0,
    with the node named; the sampler's own CPU time per sample under 1% of the interval."""
    cfg, result, _ = course_sweep
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(result.parent_run_id)
    kids = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(kids) == 8
    for kid in kids:
        m = kid.data.metrics
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/process_cpu_percentage", "system/process_rss_megabytes",
                "system/disk_usage_megabytes", "system/network_receive_megabytes"} <= set(m)
        assert m["system/process_rss_megabytes"] > 100   # torch alone holds more
        assert kid.data.tags["visiontune.system_metrics_node"] == \
            kid.data.tags["visiontune.node_id"]
        samples = len(client.get_metric_history(kid.info.run_id,
                                                "system/process_rss_megabytes"))
        assert samples >= 1   # a run shorter than the interval still has its last sample
        # each sample costs under 1% of the interval between samples: under 1% of any trial
        # long enough to be sampled more than once (docs/performance.md has the measurement)
        per_sample = m["system/sampler_cpu_seconds"] / samples
        assert per_sample < 0.01 * cfg.tracking.system_metrics_s, per_sample


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _history(client, run_id):
    return [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "val_f1")]


def test_a_random_search_extended_from_two_trials_to_four(tmp_path, local_ray, monkeypatch,
                                                           capsys):
    """`visiontune run --extend ID search.num_samples=4`, exactly as the docs show it: one
    parent run, the first two trial runs untouched, four trials, the parent's best val F1 the
    best of the four, at most one new version; a changed data path or changed data refused
    in one line, the run left FINISHED."""
    from pipelines.cli import main

    data = make_image_folder(tmp_path / "images", per_class=30, corrupt=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config([f"data.path={data}", "data=folder", "data.image_size=16",
                       "augment=none", f"tracking.uri={uri}", "registry.model_name=ext-model",
                       f"ray.storage_path={tmp_path}/ray_results", "train.patience=0",
                       "train.batch_size=8", "train.epochs=2", "model.cnn.channels=[8,16]",
                       "search.mode=random", "search.num_samples=2", "search.budget=null",
                       "search.scheduler=none",
                       "search.space={train.lr: {loguniform: [0.0005, 0.02]}, "
                       "model.dropout: {uniform: [0.0, 0.4]}}"])
    first = run_training_pipeline(cfg)
    client = MlflowClient(uri)
    before = {k.info.run_id: (k.data.params, _history(client, k.info.run_id))
              for k in _children(client, first.parent_run_id)}
    assert len(before) == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capsys.readouterr()

    assert main(["run", "--extend", first.pipeline_id, "search.num_samples=4"]) == 0
    out = capsys.readouterr().out
    assert f"extending pipeline {first.pipeline_id} (extension 1): search.num_samples 2 -> 4" \
        in out
    parents = client.search_runs([client.get_run(first.parent_run_id).info.experiment_id],
                                 "tags.`visiontune.role` = 'pipeline'")
    assert [p.info.run_id for p in parents] == [first.parent_run_id]
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    kids = _children(client, first.parent_run_id)
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)
    for run_id, (params, history) in before.items():   # kept, not retrained or re-logged
        assert client.get_run(run_id).data.params == params
        assert _history(client, run_id) == history
    new = [k for k in kids if k.info.run_id not in before]
    assert {k.data.params["train.lr"] for k in new}.isdisjoint(
        {p["train.lr"] for p, _ in before.values()})   # new draws, not repeats
    best = max(k.data.metrics["best_val_f1"] for k in kids)
    assert parent.data.metrics["best_val_f1"] == pytest.approx(best)
    versions = client.search_model_versions("name = 'ext-model'")
    assert 1 <= len(versions) <= 2

    # refused in one line (exit 2), the run left as it was
    assert main(["run", "--extend", first.pipeline_id, "search.num_samples=6",
                 f"data.path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.path cannot be changed" in err[0], err
    shutil.copy(next((data / "cat").glob("*.png")), data / "cat" / "grown.png")  # it grew
    assert main(["run", "--extend", first.pipeline_id, "search.num_samples=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the data changed since the run (61 image files now, 60 then)" \
        in err[0], err
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    assert len(_children(client, first.parent_run_id)) == 4


def test_warm_start_tells_a_new_runs_optuna_the_trials_of_another(tmp_path, local_ray,
                                                                   monkeypatch, capfd):
    """`visiontune run --warm-start ID ...`: a new run (its own parent run), recorded as
    warm-started from ID, whose Optuna is told ID's trials first; refused for grid search."""
    from pipelines.cli import main

    data = make_image_folder(tmp_path / "images", per_class=20, corrupt=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [f"data.path={data}", "data=folder", "data.image_size=16", "augment=none",
              f"tracking.uri={uri}", f"ray.storage_path={tmp_path}/ray_results",
              "train.epochs=1", "train.batch_size=8", "model.cnn.channels=[8,16]",
              "search.budget=null", "search.scheduler=none", "search.mode=random",
              "search.algorithm=optuna", "registry.model_name=warm-model",
              "search.space={train.lr: {loguniform: [0.0005, 0.02]}}"]
    first = run_training_pipeline(load_config([*common, "search.num_samples=3"]))
    capfd.readouterr()
    assert main(["run", "--warm-start", first.pipeline_id, *common,
                 "search.num_samples=2"]) == 0
    out = capfd.readouterr().out
    assert (f"warm start: Optuna is told the 3 trials of {first.pipeline_id} inside this "
            "search space first (of 3;") in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(first.parent_run_id).info.experiment_id],
                              f"tags.`visiontune.warm_start` = '{first.pipeline_id}'")
    assert len(runs) == 1 and runs[0].info.run_id != first.parent_run_id
    assert len(_children(client, runs[0].info.run_id)) == 2
    # a grid cannot use them
    assert main(["run", "--warm-start", first.pipeline_id, *common[:-4],
                 "search.mode=grid", "search.space={train.lr: {grid: [0.01]}}"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set search.algorithm=optuna" in err[0], err
    assert len(client.search_runs([runs[0].info.experiment_id],
                                  "tags.`visiontune.role` = 'pipeline'")) == 2   # none made
    # an Optuna run extended: its TPE told its own 3 trials before the 4th
    assert main(["run", "--extend", first.pipeline_id, "search.num_samples=4",
                 f"tracking.uri={uri}"]) == 0
    out = capfd.readouterr().out
    # (capfd: during the sweep the console writes to the terminal's own descriptor)
    assert "search: random with optuna, told 3 earlier trials first" in out
    assert len(_children(client, first.parent_run_id)) == 4
