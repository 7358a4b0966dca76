"""What a reviewer sees: the search comparison plots, per-class metrics and the misclassified
gallery (pure matplotlib), the model version's description, and the links the run prints."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from components.evaluation import (
    per_class_metrics,
    plot_comparison_heatmap,
    plot_continuous_axes,
    plot_misclassified,
    plot_per_class_metrics,
)
from components.evaluation.mistakes import misclassified
from components.evaluation.search_plots import heatmap_layout
from components.registry import version_description
from pipelines.training import PipelineResult, review_links, summary

CATEGORICAL = ["train.optimizer", "model.initializer", "model.name"]
CONTINUOUS = ["train.lr", "model.dropout"]


def _board(n_opt=2, n_init=2, models=("cnn", "resnet18"), failed=True) -> pd.DataFrame:
    """A leaderboard like the default search's: optimizer x initializer x model, lr and
    dropout drawn; with `failed`, the last trial failed (no val F1)."""
    rng = np.random.default_rng(0)
    rows = []
    for o in range(n_opt):
        for i in range(n_init):
            for m in models:
                rows.append({"trial_id": f"t{len(rows)}", "best_val_f1": rng.uniform(0.5, 1),
                             "train.optimizer": f"opt{o}", "model.initializer": f"init{i}",
                             "model.name": m, "train.lr": rng.uniform(1e-4, 1e-2),
                             "model.dropout": rng.uniform(0, 0.4)})
    if failed:
        rows[-1]["best_val_f1"] = np.nan
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_heatmap_has_one_panel_per_model_and_cells_annotated_with_mean_f1_and_count():
    board = _board(n_opt=3)
    assert heatmap_layout(board, CATEGORICAL) == ("model.name", "model.initializer",
                                                  "train.optimizer")
    fig = plot_comparison_heatmap(board, CATEGORICAL)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_title().startswith("model.name = ")]
    assert sorted(ax.get_title() for ax in panels) == ["model.name = cnn",
                                                       "model.name = resnet18"]
    for ax in panels:
        assert len(ax.get_xticks()) == 3 and len(ax.get_yticks()) == 2
    assert panels[0].get_ylabel() == "model.initializer"
    # 3 x 2 cells per model, minus the failed trial's cell
    expected = sorted(f"{v:.3f}\nn=1" for v in board.best_val_f1.dropna())
    assert sorted(_texts(fig)) == expected


def test_heatmap_cell_is_the_mean_of_its_trials_not_the_best():
    """A cell with more trials would win a maximum by luck; the mean does not favour it."""
    board = pd.DataFrame({"best_val_f1": [0.5, 0.9, 0.7],
                          "train.optimizer": ["adam", "adam", "sgd"]})
    fig = plot_comparison_heatmap(board, ["train.optimizer"])
    assert sorted(_texts(fig)) == ["0.700\nn=1", f"{np.mean([0.5, 0.9]):.3f}\nn=2"]
    assert "mean best val F1" in fig.get_suptitle()


def test_heatmap_with_one_categorical_axis_is_one_row():
    board = _board(n_init=1, models=("cnn",), failed=False)
    assert heatmap_layout(board, CATEGORICAL) == (None, None, "train.optimizer")
    fig = plot_comparison_heatmap(board, CATEGORICAL)
    ax = fig.axes[0]
    assert len(ax.get_xticks()) == 2 and len(ax.get_yticks()) == 1


def test_heatmap_of_only_the_model_has_no_panels():
    board = _board(n_opt=1, n_init=1, failed=False)
    assert heatmap_layout(board, CATEGORICAL) == (None, None, "model.name")
    assert isinstance(plot_comparison_heatmap(board, CATEGORICAL), Figure)


def test_heatmap_skipped_without_a_varied_categorical_axis():
    assert plot_comparison_heatmap(_board(n_opt=1, n_init=1, models=("cnn",)),
                                   CATEGORICAL) is None
    assert plot_comparison_heatmap(_board(), []) is None
    assert plot_comparison_heatmap(pd.DataFrame(), CATEGORICAL) is None


def test_heatmap_orders_numbers_numerically_and_shows_an_axis_that_did_not_apply():
    board = pd.DataFrame({"best_val_f1": [0.5, 0.6, 0.7, 0.8],
                          "train.batch_size": [8, 16, 32, 8],
                          "train.momentum": [0.9, 0.9, None, None]})
    fig = plot_comparison_heatmap(board, ["train.batch_size", "train.momentum"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "32"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.9", "n/a"]


def test_continuous_axes_one_scatter_per_axis_coloured_by_model():
    board = _board()
    fig = plot_continuous_axes(board, CONTINUOUS, log_keys=("train.lr",), hue="model.name")
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in axes] == CONTINUOUS
    assert axes[0].get_xscale() == "log" and axes[1].get_xscale() == "linear"
    assert len(axes[0].collections) == 2  # one series per model
    plotted = sum(len(c.get_offsets()) for c in axes[0].collections)
    assert plotted == board.best_val_f1.notna().sum()


def test_continuous_axes_skipped_when_there_are_none():
    assert plot_continuous_axes(_board(), []) is None
    # a grid-only search: the random axes were not searched, so the trials have no values
    assert plot_continuous_axes(_board().drop(columns=CONTINUOUS), CONTINUOUS) is None


def _predictions():
    return pd.DataFrame({
        "path": ["a.png", "b.png", "c.png", "d.png", "e.png"],
        "label": ["cat", "cat", "dog", "dog", "bird"],
        "prediction": ["cat", "dog", "dog", "cat", "cat"],
        "probability": [0.9, 0.6, 0.8, 0.95, 0.7]})


def test_per_class_metrics_match_scikit_learn():
    from sklearn.metrics import f1_score

    preds = _predictions()
    table = per_class_metrics(preds, ["bird", "cat", "dog"])
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    assert table["class"].tolist() == ["bird", "cat", "dog"]
    assert table.support.tolist() == [1, 2, 2]
    expected = f1_score(preds.label, preds.prediction, labels=["bird", "cat", "dog"],
                        average=None, zero_division=0)
    assert table.f1.to_numpy() == pytest.approx(expected, abs=1e-6)
    assert table.loc[1, "precision"] == pytest.approx(1 / 3, abs=1e-6)  # cat: 1 of 3
    assert isinstance(plot_per_class_metrics(table), Figure)


def test_misclassified_gallery_most_confident_first_and_limited():
    preds = _predictions()
    wrong = misclassified(preds)
    assert wrong.path.tolist() == ["d.png", "e.png", "b.png"]
    assert misclassified(preds, limit=2).path.tolist() == ["d.png", "e.png"]
    loaded = []

    def load(path):
        loaded.append(path)
        return np.zeros((8, 8, 1), np.uint8)

    fig = plot_misclassified(preds, load, limit=2)
    assert loaded == ["d.png", "e.png"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true dog\npred cat (0.95)\nd.png", "true bird\npred cat (0.70)\ne.png"]
    assert "2 of 3 shown" in fig.get_suptitle()


@pytest.mark.parametrize("wrong", [1, 2, 3, 7])
def test_misclassified_gallery_title_fits_its_figure(wrong):
    """A gallery of one to three images was narrower than its title, which the saved PNG cut
    off (seen in the MLflow UI): the whole title lies inside the figure."""
    preds = pd.DataFrame({"path": [f"cls/{i}.png" for i in range(wrong + 20)],
                          "label": ["cat"] * (wrong + 20),
                          "prediction": ["dog"] * wrong + ["cat"] * 20,
                          "probability": [0.9] * (wrong + 20)})
    fig = plot_misclassified(preds, lambda p: np.zeros((8, 8, 3), np.uint8))
    fig.canvas.draw()
    title = next(t for t in fig.texts if t.get_text() == fig.get_suptitle())
    box = title.get_window_extent(fig.canvas.get_renderer())
    width = fig.get_figwidth() * fig.dpi
    assert box.x0 >= 0 and box.x1 <= width, (box, width)


def test_misclassified_gallery_of_rgb_images_and_of_no_mistakes():
    preds = _predictions()
    fig = plot_misclassified(preds, lambda p: np.full((8, 8, 3), 200, np.uint8))
    assert len([ax for ax in fig.axes if ax.images]) == 3
    right = preds.assign(prediction=preds.label)
    fig = plot_misclassified(right, lambda p: pytest.fail("nothing to load"))
    assert "no misclassified test images (of 5)" in _texts(fig)


def test_version_description_says_data_f1_and_hyperparameters():
    text = version_description(
        "vt-1", 48, {"train": 32, "val": 8, "test": 8}, ["cat", "dog"], "f" * 64,
        {"f1": 0.87654, "accuracy": 0.9, "precision": 0.8, "recall": 0.95}, "binary", 0.91,
        {"train.optimizer": "adam", "train.lr": 0.001}, test_interval=(0.8012, 0.9333))
    for part in ("vt-1", "48 images", "2 classes", "f" * 64,
                 "Test F1: 0.8765** [0.8012, 0.9333] 95% interval over test images", "binary",
                 "val F1 0.9100 (the selection score: the best of the sweep's trials on the "
                 "validation split, optimistic)", "`train.optimizer` = adam", "`train.lr` = 0.001",
                 "test 8"):
        assert part in text, part


HTTP = "https://mlflow.example.org/"


def test_review_links_for_a_tracking_server():
    links = review_links(HTTP, "7", "abc123", "my model/x", "3")
    assert links == {
        "run": "https://mlflow.example.org/#/experiments/7/runs/abc123",
        "runs": "https://mlflow.example.org/#/experiments/7/runs",
        "model": "https://mlflow.example.org/#/models/my%20model%2Fx/versions/3"}


def test_review_links_for_a_local_store_and_without_a_version():
    links = review_links("sqlite:////tmp/x/mlflow.db", "0", "r1", "m", "")
    assert links == {"run": "http://127.0.0.1:5000/#/experiments/0/runs/r1",
                     "runs": "http://127.0.0.1:5000/#/experiments/0/runs"}


def _result(uri):
    return PipelineResult(
        pipeline_id="vt-1", parent_run_id="r1", best_params={"train.lr": "0.01"},
        best_val_f1=0.9, test_metrics={"test_f1": 0.8}, model_uri="models:/m-1",
        registered_name="it-model", registered_version="2", aliases=("challenger",),
        tracking_uri=uri, num_trials=2, wall_seconds=3, experiment_id="5")


def test_summary_prints_the_ui_command_and_links_for_a_local_store():
    uri = "sqlite:////tmp/x/mlflow.db"
    text = summary(_result(uri))
    assert f"mlflow ui --backend-store-uri {uri}" in text
    assert "http://127.0.0.1:5000/#/experiments/5/runs/r1" in text
    assert "http://127.0.0.1:5000/#/experiments/5/runs\n" in text
    assert "http://127.0.0.1:5000/#/models/it-model/versions/2" in text


def test_summary_prints_server_links_without_a_command():
    text = summary(_result(HTTP))
    assert "mlflow ui" not in text and "127.0.0.1" not in text
    assert "https://mlflow.example.org/#/experiments/5/runs/r1" in text
    assert "https://mlflow.example.org/#/models/it-model/versions/2" in text
    assert len(text.strip().splitlines()) <= 14


def test_split_datasets_and_source_on_the_parent_run(tmp_path):
    """The split step's dataset inputs (one per split, MLflow's context words, the data
    fingerprint as digest) and the run's Source tags, on a SQLite store."""
    from mlflow import MlflowClient

    from components.data import SplitManifest
    from pipelines.compose import load_config
    from pipelines.steps import log_split_datasets, open_record

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config([f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path}/art"])
    record = open_record(cfg, None, None)
    root = str(tmp_path / "pets")
    manifest = SplitManifest(root, [f"{root}/{c}/{i}.png" for c in ("cat", "dog")
                                    for i in range(5)],
                             [0] * 5 + [1] * 5, ["train", "train", "train", "val", "test"] * 2,
                             ["cat", "dog"], "0123456789abcdef" * 4)
    log_split_datasets(manifest, record)
    log_split_datasets(manifest, record)  # again (a retried step): nothing added
    run = MlflowClient(uri).get_run(record.run_id)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["pets-test", "pets-train", "pets-val"]
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for name, i in inputs.items()}
    assert contexts == {"pets-train": "training", "pets-val": "validation", "pets-test": "test"}
    for i in inputs.values():
        assert i.dataset.digest == "0123456789ab"
        assert root in i.dataset.source
    assert '"num_rows": 6' in inputs["pets-train"].dataset.profile
    assert run.data.tags["mlflow.source.name"] == "visiontune run"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"


def test_registered_version_keeps_its_tags_and_gets_the_description(tmp_path):
    from components.registry import register_challenger
    from components.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracker.ensure_experiment("described", str(tmp_path / "art"))
    run = tracker.create_run(exp, "pipeline", {})
    source = str(tmp_path / "art" / "model")
    first = register_challenger(tracker, source, "m", run, {"test_f1": 0.5}, description="one")
    mv = tracker.client.get_model_version("m", first.version)
    assert mv.description == "one" and mv.tags == {"test_f1": "0.5"}
    # a resumed run gets its version back, described (e.g. registered before descriptions)
    again = register_challenger(tracker, source, "m", run, {"test_f1": 0.5}, description="two")
    assert again.version == first.version
    mv = tracker.client.get_model_version("m", first.version)
    assert mv.description == "two" and mv.tags == {"test_f1": "0.5"}
