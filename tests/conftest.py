"""Shared fixtures: small generated image folders (no downloads) and a local Ray."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Every `mlflow server` a test starts: without MLflow's server jobs (a job runner and seven huey
# consumers for its GenAI features, none of which visiontune uses; infra/mlflow/Dockerfile
# turns them off too). With them a server costs 25 CPU-seconds to start instead of 6
# (benchmarks/mlflow_server_start.py).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

pytest_plugins = ["tests.scheduling"]   # how workers share the machine under pytest-xdist

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own stores


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_env(monkeypatch):
    # mlflow.set_tracking_uri() (model logging) exports MLFLOW_TRACKING_URI to the process.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _shape_image(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A class-dependent pattern (bright square in one quadrant) with noise: learnable in a
    couple of epochs, so integration tests check the pipeline, not the patience of SGD."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    half = size // 2
    r, c = divmod(label % 4, 2)
    img[r * half:(r + 1) * half, c * half:(c + 1) * half] += np.uint8(150)
    return img


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 20, size: int = 24,
                      seed: int = 0, corrupt: bool = True) -> Path:
    """root/<class>/*.png|jpg with mixed modes and sizes; with `corrupt`, a truncated PNG, a
    zero-byte JPG, a text file named .png, plus files every indexer must ignore."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            s = size + (i % 3) * 8   # sizes vary: the pipeline must resize
            arr = _shape_image(label, rng, s)
            img = Image.fromarray(arr)
            if i % 4 == 1:
                img.convert("L").save(folder / f"{i:03d}.PNG")
            elif i % 4 == 2:
                img.save(folder / f"{i:03d}.jpg", quality=95)
            elif i % 4 == 3:
                img.convert("RGBA").save(folder / f"{i:03d}.png")
            else:
                img.save(folder / f"{i:03d}.png")
    if corrupt:
        good = (root / classes[0] / "000.png").read_bytes()
        (root / classes[0] / "truncated.png").write_bytes(good[: len(good) // 2])
        (root / classes[1] / "empty.jpg").write_bytes(b"")
        (root / classes[1] / "not_an_image.png").write_text("hello")
        (root / classes[0] / "notes.txt").write_text("ignored: not an image extension")
        (root / classes[0] / ".hidden.png").write_bytes(good)
        (root / "at_root.png").write_bytes(good)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="module")
def local_ray():
    """A stock local Ray with 2 CPUs (no custom resources); shut down after the module.

    With the dashboard: Train V2's placement-group cleaner asks the State API whether a
    controller died; without it, the workers of a trial stopped by ASHA keep their CPUs."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


class S3Server:
    """A real S3-compatible server (moto's, from PyPI) on 127.0.0.1, in its own process group.
    The standard AWS variables point every client at it: pyarrow.fs (Ray's checkpoints, the
    pipeline's storage layer), boto3, and every process started after the fixture (a local
    Ray's workers, `ray start` nodes, the CLI)."""

    ENV = {"AWS_ACCESS_KEY_ID": "visiontune-test", "AWS_SECRET_ACCESS_KEY": "visiontune-test",
           "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {**self.ENV, "AWS_ENDPOINT_URL": endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="visiontune-test",
                            aws_secret_access_key="visiontune-test")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        s3 = self.client()
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server on a free loopback port for the whole session; the AWS variables are set in
    this process while it runs and restored afterwards."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                             "127.0.0.1", "-p", str(port)], start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(server.endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:  # it answers: up
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.3)
        with pytest.MonkeyPatch.context() as env:  # restored when the session ends
            for key, value in server.env.items():
                env.setenv(key, value)
            yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def register_untrained_model(tracking_uri: str, name: str, classes=("cat", "dog"),
                             image_size: int = 16, model: str = "cnn",
                             artifact_location: str | None = None) -> str:
    """A freshly initialised network of `model` ('cnn' or a torchvision backbone, no pretrained
    weights) logged the way the pipeline logs its champion (`log_image_classifier`) and
    registered as `name`@champion: a real registered model in seconds, for tests and
    benchmarks of what happens after training. Returns the model version."""
    import torch

    from components.config import CnnConfig, ModelConfig
    from components.models import build_model
    from components.registry import register_challenger
    from components.serving.packaging import log_image_classifier
    from components.tracking import Tracker

    torch.manual_seed(0)
    cfg = ModelConfig(name=model, pretrained=False, cnn=CnnConfig(channels=[8, 16]))
    net = build_model(cfg, len(classes), 3).eval()
    prep = {"image_size": image_size, "channels": 3, "color_mode": "RGB",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "NCHW float32"}
    tracker = Tracker(tracking_uri)
    exp = tracker.ensure_experiment("visiontune-test-models", artifact_location)
    run = tracker.create_run(exp, "untrained", {})
    meta = {"class_names": list(classes), "preprocessing": prep, "pipeline_id": "untrained"}
    uri = log_image_classifier(tracker, run, net, list(classes), prep, meta)
    version = register_challenger(tracker, uri, name, run, {"test_f1": 0.0})
    tracker.end_run(run)
    return str(version.version)


# ---------------------------------------------------------------- processes the tests start
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc, timeout: float = 30) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session=True), then
    SIGKILL if it is not gone within `timeout`."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def cli_env(**extra: str) -> dict[str, str]:
    """This environment for a `visiontune`/`mlflow` command: the test's virtualenv first on
    PATH, no Ray address or tracking URI inherited from the shell."""
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}", **extra}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_tiny_pipeline(tmp: Path, tracking_uri: str, model_name: str, env: dict,
                      extra: tuple[str, ...] = ()) -> dict:
    """One `visiontune run` as a user types it, in its own process group: 2 trials of 1
    worker, 2 epochs, 16 px, on a generated cat/dog folder (with its unreadable files). Its
    output (with the review links) goes to tmp/run.log; a non-zero exit fails the test."""
    import subprocess
    import sys

    data = make_image_folder(tmp / "images", classes=("cat", "dog"), per_class=24)
    log = tmp / "run.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "visiontune"), "run", f"data.path={data}",
         "data=folder", "data.image_size=16", "augment=none", "search=quick",
         "train.epochs=2", "train.batch_size=8", "train.patience=0",
         f"tracking.uri={tracking_uri}", f"ray.storage_path={tmp}/ray_results",
         f"registry.model_name={model_name}", "model.cnn.channels=[8,16]", "ray.num_cpus=2",
         *extra],
        cwd=tmp, env=env, start_new_session=True, stdout=open(log, "w"),
        stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=900)
    finally:
        stop_group(proc)
    assert code == 0, log.read_text()[-4000:]
    return {"data": data, "log": log}


def wait_until_ok(url: str, proc, log: Path, timeout: float) -> None:
    """Until `url` answers 200; a server process that exits, or `timeout` seconds, fail with
    the end of its log."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{url} did not answer: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_ray_nodes(temp_dirs: list[str], gcs_port: int, timeout: float = 30) -> list[int]:
    """Stop the Ray cluster a test started with `ray start --temp-dir=...` (head at
    `gcs_port`), and only it: every process whose command line names one of `temp_dirs`
    (gcs_server, raylet, dashboard, log monitor, ...) or the head's address (the Ray Client
    server), and everything below them (workers, agents). `ray stop --force` would also stop
    every other Ray of this user on the machine. Returns the pids that were signalled."""
    import re
    import signal
    import subprocess
    import time

    head = re.compile(rf"--address=\S+:{gcs_port}\b")

    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True,
                           text=True).stdout.splitlines()
    children: dict[int, list[int]] = {}
    roots = []
    for line in table:
        pid, ppid, args = (line.split(None, 2) + [""])[:3]
        children.setdefault(int(ppid), []).append(int(pid))
        if (any(d and d in args for d in temp_dirs) or head.search(args)) and \
                int(pid) != os.getpid():
            roots.append(int(pid))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo += children.get(pid, [])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(_alive(p) for p in found):
            time.sleep(0.2)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"   # a zombie is gone, only unreaped
    except FileNotFoundError:
        return False


# ------------------------------------------------ versions as the pipeline registers them
def register_like_the_pipeline(tracking_uri: str, artifacts: str | None, data: Path, net,
                               name: str,
                               image_size: int = 4, channels: int = 1,
                               overrides: tuple[str, ...] = (), params: dict | None = None):
    """`net` (an nn.Module returning logits) registered as the pipeline registers its best
    trial, through the pipeline's own steps: a parent run whose data step indexed, validated
    and split `data` (its manifest logged), the test split evaluated, the model logged and
    registered as `name`@challenger with the same tags, lineage and description. Only the
    search is skipped (the network is given). Returns (RegisteredVersion, SplitManifest)."""
    from components.augment import eval_preprocessing
    from components.evaluation import evaluate_on_test
    from components.tuning.driver import TrialResult
    from pipelines.compose import load_config
    from pipelines.steps import Evaluation, open_record, prepare_data, register_best

    grey = channels == 1
    cfg = load_config(["data=folder", f"data.path={data}", f"data.image_size={image_size}",
                       f"data.channels={channels}", f"data.mean={[0.5] if grey else [0.5] * 3}",
                       f"data.std={[0.5] if grey else [0.5] * 3}", "augment=none",
                       f"tracking.uri={tracking_uri}", f"registry.model_name={name}",
                       *([f"tracking.artifact_location={artifacts}"] if artifacts else []),
                       *overrides])
    record = open_record(cfg, None, None)
    manifest = prepare_data(cfg, record).manifest
    prep = eval_preprocessing(cfg.data, cfg.model)
    paths, labels = manifest.subset("test")
    report = evaluate_on_test(net.eval(), paths, labels, manifest.classes, prep,
                              cfg.evaluation.average)
    best = TrialResult("given", dict(params or {}), "FINISHED", None,
                       best_val_f1=report.metrics["f1"], checkpoint_path="(given)")
    registered = register_best(cfg, manifest, Evaluation(best, net, prep, report), record)
    record.close("FINISHED")
    return registered, manifest


# ------------------------------------------------------------- servers the tests start
@contextlib.contextmanager
def mlflow_server(tmp: Path, env: dict):
    """`mlflow server` (SQLite in `tmp`, artifacts proxied to tmp/artifacts) on a free loopback
    port, in its own process group (its web workers go down with it); yields its URL."""
    import subprocess
    import sys

    port = free_port()
    log = tmp / "mlflow.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
         "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
        cwd=tmp, env={**env, **MLFLOW_SERVER_ENV}, start_new_session=True, stdout=open(log, "w"),
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/health", proc, log, 120)
        yield url
    finally:
        stop_group(proc)


@contextlib.contextmanager
def hook_receiver(statuses: list[int]):
    """A hook receiver on 127.0.0.1 answering `statuses` in turn, then 200; yields its URL and
    the list of what it received ({"headers", "body"} each)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got, answers = [], list(statuses)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append({"headers": dict(self.headers), "body": body})
            self.send_response(answers.pop(0) if answers else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", got
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def log_lines(logger: str, on_line=None):
    """The lines a component logs (its console lines, pipelines/console.py) under `logger`
    while the block runs, as a list; `on_line(line)` is called as each one comes."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            if on_line is not None:
                on_line(lines[-1])

    handler, log = Collect(), logging.getLogger(logger)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
