"""The champion served by MLflow itself: a tiny pipeline (`visiontune run`, local Ray, a real
`mlflow server`; shared with the UI tests, tests/e2e/conftest.py) registers a model;
`mlflow models serve -m models:/NAME@champion --env-manager local` serves it; raw PNG and
JPEG files of mixed sizes and modes, base64 in JSON, must get the answers of `visiontune
predict` on the same files and of the run's `evaluation/test_predictions.csv`. Every process
started here runs in its own process group and is stopped, also when a test fails."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import _shape_image, free_port, stop_group, wait_until_ok
from tests.e2e.conftest import SERVED_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
MODEL = SERVED_MODEL
CLASSES = ["cat", "dog"]


@pytest.fixture(scope="module")
def pipeline(served_pipeline):
    """The shared tiny run against a real `mlflow server` (tests/e2e/conftest.py)."""
    return served_pipeline


@pytest.fixture(scope="module")
def server(pipeline):
    """`mlflow models serve` of the champion, stopped after the module. The operator allows
    path rows under one folder (the `incoming` fixture's); by default the served model reads
    only image bytes."""
    env = {**pipeline["env"], "MLFLOW_TRACKING_URI": pipeline["uri"],
           "VISIONTUNE_ALLOWED_PATH_ROOTS": str(pipeline["tmp"] / "incoming")}
    with serving(MODEL, pipeline["tmp"], env) as url:
        yield url


@contextlib.contextmanager
def serving(model: str, cwd: Path, env: dict):
    """`mlflow models serve -m models:/MODEL@champion` in its own process group (uvicorn runs
    as its child), logging to cwd/serve.log: yields its URL once /ping answers, and stops the
    group after, also when the test fails."""
    port = free_port()
    log = cwd / "serve.log"
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{model}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=cwd, env=env, start_new_session=True, stdout=open(log, "w"),
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/ping", proc, log, 180)
        SERVERS[url] = proc
        yield url
    finally:
        stop_group(proc)


SERVERS: dict = {}   # url -> the server's process (its session holds the scoring workers)


def _server_peak_rss_mb(url: str) -> float:
    """The peak resident memory (VmHWM) of every process of the server's session (uvicorn and
    its workers), summed: a spike freed before the request returned still counts."""
    out = subprocess.run(["ps", "-o", "pid=", "-s", str(SERVERS[url].pid)], capture_output=True,
                         text=True).stdout
    total_kb = 0
    for pid in out.split():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:   # ended meanwhile
            continue
        total_kb += next((int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmHWM:")), 0)
    return total_kb / 1024


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def incoming(pipeline):
    return write_incoming(pipeline["tmp"] / "incoming")


def write_incoming(folder: Path) -> tuple[list[Path], Path]:
    """New images as users send them: PNG and JPEG, RGB, L, RGBA, palette, an EXIF-rotated
    JPEG, sizes from 9 to 80 pixels, and one file that is not an image."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    specs = [("RGB", "png", 30, 0), ("L", "jpg", 17, 1), ("RGBA", "png", 24, 0),
             ("P", "png", 40, 1), ("RGB", "jpg", 80, 0), ("L", "png", 9, 1),
             ("P", "gif", 33, 0), ("RGB", "jpeg", 21, 1)]
    paths = []
    for i, (mode, ext, size, label) in enumerate(specs):
        img = Image.fromarray(_shape_image(label, rng, size))
        img = img.convert(mode) if mode != "P" else img.convert(
            "P", palette=Image.Palette.ADAPTIVE, colors=32)
        path = folder / f"{i:02d}_{mode}_{size}.{ext}"
        if i == 7:  # stored sideways, EXIF says rotate to display
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())
        else:
            img.save(path)
        paths.append(path)
    bad = folder / "99_truncated.png"
    bad.write_bytes(paths[0].read_bytes()[:60])
    return paths, bad


def _frame(answer: dict) -> pd.DataFrame:
    return pd.DataFrame(answer["predictions"])


def test_served_champion_answers_as_predict_and_the_test_report(pipeline, server, incoming,
                                                                 tmp_path):
    good, bad = incoming
    client = MlflowClient(pipeline["uri"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    expected = pd.read_csv(client.download_artifacts(
        champion.run_id, "evaluation/test_predictions.csv", str(tmp_path)))
    assert list(expected.columns) == ["path", "label", "prediction", "probability"]
    assert len(expected) >= 4
    files = [Path(p) for p in expected.path] + good + [bad]

    status, answer = _post(server, {"dataframe_split": {
        "columns": ["image"],
        "data": [[base64.b64encode(f.read_bytes()).decode("ascii")] for f in files]}})
    assert status == 200, answer
    served = _frame(answer)
    assert list(served.columns) == ["prediction", "probability", "prob_cat", "prob_dog",
                                    "error"]
    assert len(served) == len(files)

    # the file that is not an image: its own row says why; the batch is answered
    last = answer["predictions"][-1]
    assert {k: v for k, v in last.items() if k != "error"} == dict.fromkeys(
        ["prediction", "probability", "prob_cat", "prob_dog"])  # JSON null
    assert last["error"].startswith(("OSError", "UnidentifiedImageError"))
    ok = served.iloc[:-1]
    assert ok.error.isna().all()
    probs = ok[["prob_cat", "prob_dog"]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(ok.probability.to_numpy(float), probs.max(axis=1))
    assert ok.prediction.tolist() == [CLASSES[k] for k in probs.argmax(axis=1)]

    # = the run's own test-set predictions (same preprocessing, same network)
    n = len(expected)
    assert ok.prediction[:n].tolist() == expected.prediction.tolist()
    np.testing.assert_allclose(ok.probability[:n].to_numpy(float), expected.probability,
                               atol=2e-6)

    # = `visiontune predict` on the same files (paths, read by the same model code)
    out = tmp_path / "predict.csv"
    p = subprocess.run([str(BIN / "visiontune"), "predict", "--model",
                        f"models:/{MODEL}@champion", *map(str, files), "-o", str(out),
                        "--tracking-uri", pipeline["uri"]],
                       env=pipeline["env"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    skipped = [line for line in p.stderr.splitlines() if line.startswith("visiontune: skipped")]
    assert len(skipped) == 1
    assert skipped[0].startswith(f"visiontune: skipped {bad}: {last['error'].split(':')[0]}: ")
    predicted = pd.read_csv(out)
    assert predicted.path.tolist() == [str(f) for f in files[:-1]]
    assert predicted.prediction.tolist() == ok.prediction.tolist()
    np.testing.assert_allclose(predicted.probability, ok.probability.to_numpy(float),
                               atol=2e-6)


def test_served_champion_reads_paths_and_records_too(server, incoming):
    good, _ = incoming
    status, by_bytes = _post(server, {"dataframe_records": [
        {"image": base64.b64encode(f.read_bytes()).decode("ascii")} for f in good]})
    assert status == 200, by_bytes
    status, by_path = _post(server, {"dataframe_split": {"columns": ["path"],
                                                         "data": [[str(f)] for f in good]}})
    assert status == 200, by_path
    a, b = _frame(by_bytes), _frame(by_path)
    assert a.prediction.tolist() == b.prediction.tolist()
    np.testing.assert_allclose(a.probability.astype(float), b.probability.astype(float),
                               atol=1e-6)
    status, refused = _post(server, {"dataframe_split": {"columns": ["image"],
                                                         "data": [["not base64!"]]}})
    assert status == 400 and "image" in refused["message"]


def test_champion_loads_where_this_repository_cannot_be_imported(pipeline, incoming, tmp_path):
    from tests.unit.test_serving_model import ISOLATED_SCRIPT

    good, _ = incoming
    images = tmp_path / "images.json"
    images.write_text(json.dumps([f.read_bytes().hex() for f in good]))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED_SCRIPT, pipeline["uri"],
         f"models:/{MODEL}@champion", str(images), str(root)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in pipeline["env"].items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["repo_importable"] is False and answer["repo_modules"] == []

    import mlflow

    from components.inference.local import predict_images

    mlflow.set_tracking_uri(pipeline["uri"])
    here = predict_images(mlflow.pyfunc.load_model(f"models:/{MODEL}@champion"),
                          [f.read_bytes() for f in good])
    assert answer["prediction"] == here.prediction.tolist()
    np.testing.assert_allclose(answer["probability"], here.probability, atol=1e-6)


def test_response_is_strict_json(server, incoming):
    """Rows that fail carry null, never NaN (not JSON): any client can parse the answer."""
    _, bad = incoming
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(bad.read_bytes()).decode("ascii")]]}}).encode()
    req = urllib.request.Request(f"{server}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        text = r.read().decode()
    assert "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# ------------------------------------------------------------------ as an attacker would

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
