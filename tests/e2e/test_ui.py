"""The MLflow UI as a reviewer sees it: a real `mlflow server` (SQLite, artifacts proxied, in a
temp dir), one tiny `visiontune run` against it, then `benchmarks/ui_screenshots.py` drives
headless Chromium (Debian's `chromium`) through the pages the run printed: the runs table,
the parent run with its datasets, the heatmap and the misclassified gallery in its artifacts,
and the model version with its description. Every process started here runs in its own
process group and is stopped, also when a test fails."""

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
         "ui_model_version.png"]
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


def test_ui_shows_the_run_its_artifacts_and_the_model_version(pipeline, tmp_path):
    out = tmp_path / "shots"
    p = _screenshots(pipeline, out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ui_screenshots: ok, 5 pages checked" in p.stdout

    checks = json.loads((out / "checks.json").read_text())
    assert checks["ok"] and checks["problems"] == []
    assert [page["page"] for page in checks["pages"]] == ["runs", "run", "heatmap",
                                                          "misclassified", "model"]
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
    assert by_page["heatmap"].endswith(f"/runs/{champion.run_id}/artifacts/"
                                       "evaluation/comparison_heatmap.png")

    images = [_assert_rendering(out / name) for name in SHOTS]
    for i, a in enumerate(images):  # five different pages, not one picture five times
        for b in images[i + 1:]:
            assert np.abs(a.astype(int) - b).mean() > 1


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
