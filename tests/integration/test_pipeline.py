"""The whole training pipeline on a local Ray (2 CPUs) with a SQLite MLflow in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.metrics import f1_score

from pipelines.compose import load_config
from pipelines.training import run_training_pipeline
from tests.conftest import make_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 2


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, local_ray):
    tmp = tmp_path_factory.mktemp("pipeline")
    data = make_image_folder(tmp / "images", classes=("cat", "dog"), per_class=24)
    cfg = load_config([
        f"data.path={data}", "data=folder", "data.image_size=16", "augment=none",
        "search=quick", f"train.epochs={EPOCHS}", "train.num_workers=2", "train.batch_size=8",
        "train.patience=0", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.artifact_location={tmp}/mlruns", f"ray.storage_path={tmp}/ray_results",
        "registry.model_name=it-model", "model.cnn.channels=[8,16]",
    ])
    result = run_training_pipeline(cfg)
    return result, cfg, MlflowClient(cfg.tracking.uri), tmp


def test_run_tree(pipeline_run):
    result, cfg, client, _ = pipeline_run
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["visiontune.role"] == "pipeline"
    exp = parent.info.experiment_id
    runs = client.search_runs([exp], max_results=100)
    assert len([r for r in runs if r.data.tags.get("visiontune.role") == "pipeline"]) == 1
    children = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["visiontune.role"] == "trial"
        assert child.data.params["train.optimizer"] in ("adam", "sgd_momentum")
        history = client.get_metric_history(child.info.run_id, "val_f1")
        assert [m.step for m in history] == list(range(1, EPOCHS + 1))
        for key in ("train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall"):
            assert len(client.get_metric_history(child.info.run_id, key)) == EPOCHS


def test_parent_run_record(pipeline_run):
    result, cfg, client, tmp = pipeline_run
    run = client.get_run(result.parent_run_id)
    m, p = run.data.metrics, run.data.params
    assert m["data_num_images"] == 48 and m["data_num_skipped"] == 3
    assert p["train.epochs"] == str(EPOCHS) and p["registry.model_name"] == "it-model"
    assert len(p["data_fingerprint"]) == 64
    for key in ("test_f1", "test_accuracy", "test_precision", "test_recall"):
        assert 0 <= m[key] <= 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/test_predictions.csv", "evaluation/confusion_matrix.png",
            "evaluation/leaderboard.csv"} <= artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_test_f1_recomputes_from_predictions_on_exactly_the_test_rows(pipeline_run):
    result, cfg, client, tmp = pipeline_run
    run_id = result.parent_run_id
    preds = pd.read_csv(client.download_artifacts(run_id, "evaluation/test_predictions.csv",
                                                  str(tmp)))
    manifest = pd.read_csv(client.download_artifacts(run_id, "data/split_manifest.csv",
                                                     str(tmp)))
    assert list(preds.columns[:3]) == ["path", "label", "prediction"]
    test_rows = manifest[manifest.split == "test"]
    assert sorted(preds.path) == sorted(test_rows.path)
    assert dict(zip(preds.path, preds.label)) == dict(zip(test_rows.path, test_rows.label))
    # two classes -> binary F1 with the second class ("dog") as positive
    expected = f1_score(preds.label, preds.prediction, pos_label="dog", average="binary")
    assert client.get_run(run_id).data.metrics["test_f1"] == pytest.approx(expected)


def test_registered_version_with_alias(pipeline_run):
    result, cfg, client, _ = pipeline_run
    mv = client.get_model_version_by_alias("it-model", "challenger")
    assert str(mv.version) == result.registered_version
    assert client.get_model_version_by_alias("it-model", "champion").version == mv.version
    assert mv.tags["data_fingerprint"] == client.get_run(
        result.parent_run_id).data.params["data_fingerprint"]


def test_registered_version_carries_its_speed_and_mlflow_evaluation(pipeline_run):
    """Speed and size measured at registration (version tags and run metrics), and MLflow's
    own classifier metrics of the same test predictions, recomputed here with scikit-learn
    (MLflow averages F1 over classes by support for several classes; binary here: dog)."""
    import os

    import mlflow

    result, cfg, client, tmp = pipeline_run
    mv = client.get_model_version("it-model", result.registered_version)
    run = client.get_run(result.parent_run_id)
    for b in (1, 32):
        p50, p95 = (float(mv.tags[f"speed.latency_{q}_ms_batch{b}"]) for q in ("p50", "p95"))
        assert 0 < p50 <= p95
        assert float(mv.tags[f"speed.images_per_s_batch{b}"]) == pytest.approx(
            b * 1000 / p50, rel=1e-3)
        assert run.data.metrics[f"images_per_s_batch{b}"] == pytest.approx(
            float(mv.tags[f"speed.images_per_s_batch{b}"]), rel=1e-3)
    assert f"{os.cpu_count()} cores" in mv.tags["speed.hardware"]
    mlflow.set_tracking_uri(cfg.tracking.uri)
    files = mlflow.artifacts.download_artifacts(f"models:/it-model/{mv.version}",
                                                dst_path=str(tmp / "model-files"))
    on_disk = sum(f.stat().st_size for f in Path(files).rglob("*") if f.is_file()
                  and f.name != "registered_model_meta")
    assert abs(int(mv.tags["speed.model_bytes"]) - on_disk) < 200   # MLflow's download note
    preds = pd.read_csv(client.download_artifacts(run.info.run_id,
                                                  "evaluation/test_predictions.csv", str(tmp)))
    assert "visiontune.mlflow_evaluate_error" not in run.data.tags
    assert run.data.metrics["mlflow_test_f1_score"] == pytest.approx(
        f1_score(preds.label == "dog", preds.prediction == "dog"))
    assert run.data.metrics["mlflow_test_example_count"] == len(preds)


def test_registered_model_classifies_raw_images(pipeline_run):
    """The registered model is the pyfunc from code that takes image bytes (see
    tests/unit/test_serving_model.py and tests/e2e/test_serving.py for the rest)."""
    import io

    import mlflow
    from PIL import Image

    result, cfg, client, _ = pipeline_run
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model("models:/it-model@champion")
    meta = model.metadata.metadata
    assert meta["class_names"] == ["cat", "dog"]
    assert meta["model_format"] == "visiontune-images-v1"
    assert set(meta) >= {"preprocessing", "data_fingerprint", "pipeline_id", "hyperparameters"}
    images = []
    for mode, size in (("RGB", (40, 25)), ("L", (7, 7)), ("RGBA", (64, 64))):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="PNG")
        images.append(buf.getvalue())
    out = model.predict(pd.DataFrame({"image": images}))
    assert list(out.columns) == ["prediction", "probability", "prob_cat", "prob_dog", "error"]
    assert out.prediction.isin(["cat", "dog"]).all() and out.error.isna().all()


def test_resume_of_a_finished_run_prints_its_result_and_registers_nothing(pipeline_run):
    """`--resume ID` of a run that finished reads its result back from the record: same
    parent run, same trial runs, same version, nothing trained or registered again."""
    from pipelines.compose import resume_config

    result, cfg, client, _ = pipeline_run
    again = run_training_pipeline(resume_config(result.pipeline_id,
                                                [f"tracking.uri={cfg.tracking.uri}"]),
                                  resume=result.pipeline_id)
    assert again.already_finished
    assert again.pipeline_id == result.pipeline_id
    assert again.parent_run_id == result.parent_run_id
    assert again.best_val_f1 == pytest.approx(result.best_val_f1)
    assert again.test_metrics == result.test_metrics
    assert again.registered_version == result.registered_version
    assert len(client.search_model_versions("name = 'it-model'")) == 1
    exp = client.get_run(result.parent_run_id).info.experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_f1")]
        assert steps == list(range(1, EPOCHS + 1))  # no epoch logged twice


def test_resume_config_is_the_logged_config(pipeline_run):
    from components.config import ConfigError, to_dict
    from pipelines.compose import resume_config

    result, cfg, _, _ = pipeline_run
    uri = f"tracking.uri={cfg.tracking.uri}"
    assert to_dict(resume_config(result.pipeline_id, [uri])) == to_dict(cfg)
    moved = resume_config(result.pipeline_id, [uri, "ray.address=auto"])
    assert moved.ray.address == "auto" and moved.train == cfg.train
    with pytest.raises(ConfigError, match="train.lr cannot be changed"):
        resume_config(result.pipeline_id, [uri, "train.lr=0.1"])


def test_parent_run_logs_the_split_as_datasets_with_its_source(pipeline_run):
    result, cfg, client, tmp = pipeline_run
    run = client.get_run(result.parent_run_id)
    fingerprint = run.data.params["data_fingerprint"]
    inputs = run.inputs.dataset_inputs
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for i in inputs}
    assert contexts == {"images-train": "training", "images-val": "validation",
                        "images-test": "test", "images-test-predictions": "mlflow_test_"}
    manifest = pd.read_csv(client.download_artifacts(result.parent_run_id,
                                                     "data/split_manifest.csv", str(tmp)))
    splits = [i for i in inputs if i.dataset.name != "images-test-predictions"]
    for i in splits:
        assert i.dataset.digest == fingerprint[:12]
        assert str(Path(cfg.data.path).resolve()) in i.dataset.source
        split = i.dataset.name.removeprefix("images-")
        assert f'"num_rows": {(manifest.split == split).sum()}' in i.dataset.profile
    # MLflow's own evaluation logs the test predictions it scored (one row per test image)
    (scored,) = [i for i in inputs if i.dataset.name == "images-test-predictions"]
    assert f'"num_rows": {(manifest.split == "test").sum()}' in scored.dataset.profile
    assert run.data.tags["mlflow.source.name"] == "visiontune run"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"


def test_review_artifacts_on_the_parent_run(pipeline_run):
    result, cfg, client, tmp = pipeline_run
    run_id = result.parent_run_id
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/comparison_heatmap.png", "evaluation/misclassified.png",
            "evaluation/per_class_metrics.csv", "evaluation/per_class_metrics.png"} <= artifacts
    # search=quick has one categorical axis (a one-row heatmap) and no continuous one
    assert "evaluation/continuous_axes.png" not in artifacts
    table = pd.read_csv(client.download_artifacts(run_id, "evaluation/per_class_metrics.csv",
                                                  str(tmp)))
    preds = pd.read_csv(client.download_artifacts(run_id, "evaluation/test_predictions.csv",
                                                  str(tmp)))
    assert table["class"].tolist() == ["cat", "dog"]
    assert table.support.sum() == len(preds)
    # binary F1 is the positive class's ("dog") F1
    dog = table.set_index("class").loc["dog", "f1"]
    assert dog == pytest.approx(client.get_run(run_id).data.metrics["test_f1"], abs=1e-5)


def test_registered_version_is_described(pipeline_run):
    result, cfg, client, _ = pipeline_run
    mv = client.get_model_version("it-model", result.registered_version)
    run = client.get_run(result.parent_run_id)
    m = run.data.metrics
    assert (f"Test F1: {m['test_f1']:.4f}** [{m['test_f1_low']:.4f}, {m['test_f1_high']:.4f}] "
            f"95% interval over test images (binary average)") in mv.description
    assert m["test_f1_low"] <= m["test_f1"] <= m["test_f1_high"]
    assert "the selection score" in mv.description
    assert mv.tags["test_f1_interval"] == \
        f"[{m['test_f1_low']:.4f}, {m['test_f1_high']:.4f}] at 95%"
    assert result.pipeline_id in mv.description
    assert run.data.params["data_fingerprint"] in mv.description
    assert "48 images" in mv.description and "2 classes (cat, dog)" in mv.description
    assert "`train.optimizer` = " in mv.description
    # the parent run's own description (the run page read "No description")
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"Registered as **{mv.name} version {mv.version}** (aliases: ")
    assert mv.description in note and "evaluation/comparison_heatmap.png" in note
    assert mv.tags["test_f1_average"] == "binary" and mv.tags["pipeline_id"] == result.pipeline_id


def test_summary_links_to_the_run_its_experiment_and_the_version(pipeline_run):
    from pipelines.training import summary

    result, cfg, client, _ = pipeline_run
    exp = client.get_run(result.parent_run_id).info.experiment_id
    text = summary(result)
    assert f"mlflow ui --backend-store-uri {cfg.tracking.uri}" in text
    ui = "http://127.0.0.1:5000/#"
    assert f"{ui}/experiments/{exp}/runs/{result.parent_run_id}\n" in text
    assert f"{ui}/experiments/{exp}/runs\n" in text
    assert f"{ui}/models/it-model/versions/{result.registered_version}\n" in text
