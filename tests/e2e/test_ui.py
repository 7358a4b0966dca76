"""The MLflow UI as a reviewer sees it: a real `mlflow server` (SQLite, artifacts proxied, in a
temp dir), one tiny `visiontune run` against it, then `benchmarks/ui_screenshots.py` drives
headless Chromium (Debian's `chromium`) through the pages the run printed: the runs table,
the parent run with its datasets, the heatmap, the misclassified gallery and the marginal
effects in its artifacts, the parallel coordinates page in MLflow's HTML preview, MLflow's
own chart view drawing parallel coordinates over the trial runs, and the model version with
its description. Every process started here runs in its own process group and is stopped,
also when a test fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from components.evaluation.importance import min_trials
from tests.conftest import stop_group
from tests.e2e.conftest import SERVED_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

if shutil.which("chromium") is None:
    pytest.skip("no `chromium` on PATH (Debian: apt-get install chromium): the MLflow UI "
                "cannot be checked in a browser", allow_module_level=True)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ui_screenshots.py"
MODEL = SERVED_MODEL
SHOTS = ["ui_experiment.png", "ui_parent_run.png", "ui_heatmap.png", "ui_misclassified.png",
         "ui_marginal_effects.png", "ui_parallel_coordinates.png", "ui_chart_parallel.png",
         "ui_model_version.png"]
PAGES = ["runs", "run", "heatmap", "misclassified", "marginal_effects", "parallel", "chart",
         "model"]
WIDTH, HEIGHT = 1400, 900


@pytest.fixture(scope="module")
def pipeline(served_pipeline):
    """The shared tiny run against a real `mlflow server` (tests/e2e/conftest.py), with the
    review links it printed in its log."""
    return served_pipeline


def _screenshots(pipeline, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The script as its docstring shows it, plus the run's printed output; what it checked
    in out/checks.json."""
    # Own process group; SIGTERM (from _stop_group) lets the script stop its Chromium.
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--tracking-uri", pipeline["url"], "--model", MODEL,
         "--out", str(out), "--printed", str(pipeline["log"]),
         "--json", str(out / "checks.json"), *extra],
        cwd=ROOT, env=pipeline["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _assert_rendering(path: Path) -> np.ndarray:
    """A real page: the window's size, many colours, not one flat colour."""
    assert path.is_file(), path
    assert path.stat().st_size > 10_000, f"{path}: {path.stat().st_size} bytes"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (WIDTH, HEIGHT), (path, img.size)
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.std() > 15, f"{path}: nearly one colour (std {rgb.std():.1f})"
    _, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    assert counts.max() / counts.sum() < 0.9, f"{path}: mostly one colour"
    assert len(counts) > 100, f"{path}: only {len(counts)} colours"
    return rgb


@pytest.fixture(scope="module")
def shots(pipeline, tmp_path_factory):
    """The script over every page, once: (its process, its out folder)."""
    out = tmp_path_factory.mktemp("ui") / "shots"
    return _screenshots(pipeline, out), out


def test_ui_shows_the_run_its_artifacts_and_the_model_version(pipeline, shots):
    p, out = shots
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"ui_screenshots: ok, {len(PAGES)} pages checked" in p.stdout

    checks = json.loads((out / "checks.json").read_text())
    assert checks["ok"] and checks["problems"] == []
    assert [page["page"] for page in checks["pages"]] == PAGES
    assert all(page["ok"] and page["missing"] == [] for page in checks["pages"])

    # the pages are the ones `visiontune run` printed, and they are this run's
    client = MlflowClient(pipeline["url"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert checks["run_id"] == champion.run_id and checks["version"] == champion.version
    printed = pipeline["log"].read_text()
    for url in checks["links"].values():
        assert f" {url}\n" in printed
    by_page = {page["page"]: page["url"] for page in checks["pages"]}
    assert by_page["run"] == checks["links"]["run"]
    assert by_page["runs"] == checks["links"]["runs"]
    assert by_page["model"] == checks["links"]["model"]
    for page, path in (("heatmap", "comparison_heatmap.png"),
                       ("marginal_effects", "marginal_effects.png"),
                       ("parallel", "parallel_coordinates.html")):
        assert by_page[page].endswith(f"/runs/{champion.run_id}/artifacts/evaluation/{path}")
    assert by_page["chart"].startswith(checks["links"]["runs"] + "?")
    assert "compareRunsMode=CHART" in by_page["chart"]
    assert f"mlflow.parentRunId%20%3D%20%27{champion.run_id}%27" in by_page["chart"]

    images = [_assert_rendering(out / name) for name in SHOTS]
    for i, a in enumerate(images):  # different pages, not one picture several times
        for b in images[i + 1:]:
            assert np.abs(a.astype(int) - b).mean() > 1


def test_ui_shows_the_sweep_review(pipeline, shots, tmp_path):
    """The sweep's review as the record says it must look: the parallel coordinates page in
    MLflow's preview draws one line per trial run over the searched axis and best_val_f1, and
    MLflow's own chart view draws its parallel coordinates chart over the same axes. The
    shared run is a tiny sweep (search=quick: 2 trials over train.optimizer), too few for the
    fANOVA importance: its record says so instead of logging the plot, and the importance is
    not among the pages."""
    client = MlflowClient(pipeline["url"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    parent = client.get_run(champion.run_id)
    trials = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{champion.run_id}'")
    scored = [t for t in trials if "best_val_f1" in t.data.metrics]
    assert len(scored) == len(trials) == 2
    assert sorted(t.data.params["train.optimizer"] for t in scored) == ["adam", "sgd_momentum"]
    for trial in scored:  # the system metrics the trial run's "System metrics" tab shows
        assert any(key.startswith("system/") for key in trial.data.metrics), trial.info.run_name
    listed = {a.path for a in client.list_artifacts(champion.run_id, "evaluation")}
    assert {"evaluation/marginal_effects.png", "evaluation/parallel_coordinates.html",
            "evaluation/param_importance.txt"} <= listed
    # the importance plot, and a page for it, only with enough trials: not this sweep's
    assert len(scored) < min_trials(1)
    assert "evaluation/param_importance.png" not in listed
    reason = client.download_artifacts(champion.run_id, "evaluation/param_importance.txt",
                                       str(tmp_path))
    assert "not ranked" in Path(reason).read_text()

    p, out = shots
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    checks = json.loads((out / "checks.json").read_text())
    pages = {page["page"]: page for page in checks["pages"]}
    assert all(pages[name]["ok"] for name in ("marginal_effects", "parallel", "chart")), pages

    axes = ["train.optimizer", "best_val_f1"]
    inside = pages["parallel"]["seen"]   # read inside MLflow's sandboxed iframe
    assert inside["lines"] == inside["trials"] == len(scored)
    assert inside["axes"] == axes
    assert inside["title"].startswith(f"{len(scored)} trials over 1 searched axes")
    chart = pages["chart"]["seen"]
    assert chart["params"] == ["train.optimizer"]
    assert sorted(chart["axes"]) == sorted(axes)
    assert chart["inked_pixels"] > 100   # the trials' lines on the chart's canvas
    for name in ("ui_marginal_effects.png", "ui_parallel_coordinates.png",
                 "ui_chart_parallel.png"):
        _assert_rendering(out / name)


def test_script_names_what_the_ui_does_not_show(pipeline, tmp_path):
    """A version without a description fails, on one line that says so; a run description,
    once set, must be on the run page."""
    client = MlflowClient(pipeline["url"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    note = client.get_run(champion.run_id).data.tags.get("mlflow.note.content", "")
    client.set_tag(champion.run_id, "mlflow.note.content", "Reviewed in the **UI** test.")
    client.update_model_version(MODEL, champion.version, description="")
    out = tmp_path / "shots"
    try:
        p = _screenshots(pipeline, out, "--pages", "run", "model", "--timeout", "10")
    finally:   # the run is shared with the serving tests: put it back
        client.set_tag(champion.run_id, "mlflow.note.content", note)
        client.update_model_version(MODEL, champion.version, description=champion.description)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    failed = [line for line in p.stderr.splitlines() if line.startswith("ui_screenshots:")]
    assert len(failed) == 1 and failed[0].startswith("ui_screenshots: FAILED: model page ")
    assert "a description (the version has none)" in failed[0]
    checks = json.loads((out / "checks.json").read_text())
    pages = {page["page"]: page for page in checks["pages"]}
    assert pages["run"]["ok"], pages["run"]
    assert not any("no description" in note for note in pages["run"]["notes"])
    assert not pages["model"]["ok"]
    _assert_rendering(out / "ui_model_version.png")  # the screenshot is taken all the same
