"""`visiontune serve` as users run it, against a real `mlflow server` on 127.0.0.1, under a
steady load: `promote`, `rollback` and a hand-moved alias while requests keep coming; signed
hooks to a receiver that fails once; the champion guard of `predict` and `serve`.

The versions are registered through the pipeline's own steps with networks whose answers
are known (tests/integration/test_promotion.py): the one that always says "cat" is shown worse than
the one that reads the image."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import (
    cli_env,
    free_port,
    hook_receiver,
    make_image_folder,
    mlflow_server,
    register_like_the_pipeline,
    stop_group,
    wait_until_ok,
)
from tests.integration.test_promotion import _always_cat, _perfect

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SECRET = "e2e-hook-secret-8d1e"
MOVE_WITHIN_S = 45
EVIDENCE = ("registry.min_images=10", "data.near_copy_distance=0")
VISIONTUNE = str(Path(sys.executable).parent / "visiontune")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` (SQLite, artifacts proxied to a folder) and a labelled folder."""
    tmp = tmp_path_factory.mktemp("serve")
    with mlflow_server(tmp, cli_env()) as url:
        data = make_image_folder(tmp / "pets", per_class=100, corrupt=False)
        yield {"tmp": tmp, "url": url, "data": data,
               "env": {**cli_env(VISIONTUNE_HOOK_SECRET=SECRET), "MLFLOW_TRACKING_URI": url},
               "register": lambda net, name: register_like_the_pipeline(
                   url, None, data, net, name)[0]}


@pytest.fixture
def receiver():
    """A hook receiver: 500 to the first delivery, 200 after."""
    with hook_receiver([500]) as (url, got):
        yield url, got


class Load:
    """One request every 0.2 s (each bounded to 10 s); every answer kept: when, status,
    version header."""

    def __init__(self, url: str, image: bytes):
        self.body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(image).decode()]]}}).encode()
        self.url, self.answers, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            started = time.time()
            request = urllib.request.Request(f"{self.url}/invocations", self.body,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    self.answers.append((started, r.status,
                                         r.headers.get("X-Visiontune-Model-Version"),
                                         json.loads(r.read())["predictions"][0]["error"]))
            except (urllib.error.URLError, OSError) as e:
                self.answers.append((started, repr(e), None, None))
            self.stop.wait(max(0.0, 0.2 - (time.time() - started)))

    def first_from(self, version: str, after: float, deadline: float) -> float:
        while time.time() < deadline:
            for t, _, v, _ in self.answers:
                if t >= after and v == version:
                    return t
            time.sleep(0.2)
        raise AssertionError(f"no answer from version {version} within {deadline - after:.0f} "
                             f"s: {self.answers[-5:]}")


def _moved_at(url: str, name: str) -> float:
    """When the alias moved, as the champion's record says (whole seconds, UTC)."""
    from datetime import timezone

    record = json.loads(MlflowClient(url).get_registered_model(name).tags[
        "visiontune.champion_record"])
    return datetime.strptime(record["at"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc).timestamp()


def _cli(*args, env, cwd, timeout=300):
    return subprocess.run([VISIONTUNE, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def _start_serve(server, name, *extra, log_name="serve.log"):
    port = free_port()
    log = server["tmp"] / log_name
    proc = subprocess.Popen([VISIONTUNE, "serve", "--model", name, "--port", str(port), *extra],
                            env=server["env"], cwd=server["tmp"], start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def test_serve_follows_promote_and_rollback_without_failing_a_request(server, receiver):
    url, tmp, env = server["url"], server["tmp"], server["env"]
    hook, got = receiver
    server["register"](_always_cat(), "followed")
    server["register"](_perfect(), "followed")
    image = next((server["data"] / "dog").iterdir()).read_bytes()
    proc, base, log = _start_serve(server, "followed")
    load = Load(base, image)
    try:
        wait_until_ok(f"{base}/ping", proc, log, 120)
        load.thread.start()
        time.sleep(2)
        hooks = f"registry.hooks=[{hook}]"
        promoted = _cli("promote", "--model", "followed", *EVIDENCE, hooks, env=env, cwd=tmp)
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        moved = _moved_at(url, "followed")
        load.first_from("2", moved, moved + MOVE_WITHIN_S)
        rolled = _cli("rollback", "--model", "followed", hooks, env=env, cwd=tmp)
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert rolled.stdout.splitlines() == [
            f"hook {hook}: delivered (attempt 1 of 4, HTTP 200)",
            "models:/followed@champion -> version 1 (previous-champion -> 2)"]
        back = _moved_at(url, "followed")
        load.first_from("1", back, back + MOVE_WITHIN_S)
        # A version whose files changed in the artifact store: refused, v1 keeps answering.
        v3 = server["register"](_perfect(), "followed").version
        source = MlflowClient(url).get_model_version("followed", v3).source
        (network,) = (tmp / "artifacts").rglob(f"{source.removeprefix('models:/')}/**/network.pt2")
        network.write_bytes(network.read_bytes() + b"tampered")
        MlflowClient(url).set_registered_model_alias("followed", "champion", v3)
        deadline = time.time() + MOVE_WITHIN_S
        while f"refused followed version {v3}" not in log.read_text():
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        refused_at = time.time()
        time.sleep(3)
    finally:
        load.stop.set()
        if load.thread.is_alive():
            load.thread.join(timeout=15)
        stop_group(proc)
    text = log.read_text()
    assert "network.pt2 no longer matches its sha256" in text and "still serving version 1" \
        in text, text[-3000:]
    failed = [a for a in load.answers if a[1] != 200 or a[3] is not None]
    assert not failed and len(load.answers) > 50, failed[:5]
    versions = [v for _, _, v, _ in load.answers]
    changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert changes == ["1", "2", "1"], changes
    assert all(v == "1" for t, _, v, _ in load.answers if t >= refused_at)
    # the hooks: the promotion delivered on its second attempt, the rollback on its first
    assert len(got) == 3
    for delivery in got:
        expected = hmac.new(SECRET.encode(), delivery["body"], hashlib.sha256).hexdigest()
        assert delivery["headers"]["X-Visiontune-Signature"] == f"sha256={expected}"
    bodies = [json.loads(d["body"]) for d in got]
    assert bodies[0] == bodies[1]
    assert [(b["event"], b["version"], b["previous_version"]) for b in bodies[1:]] == [
        ("champion.promoted", "2", "1"), ("champion.rolled_back", "1", "2")]
    promotion = MlflowClient(url).get_run(bodies[0]["run"]["id"])
    assert promotion.data.tags["promotion.decision"] == "promoted"
    assert promotion.data.metrics["hook_attempts"] == 2
    assert promotion.data.tags["promotion.hooks"] == "1 of 1 delivered"


def test_a_champion_moved_by_hand_is_named_and_refused_when_required(server):
    url, tmp, env = server["url"], server["tmp"], server["env"]
    server["register"](_always_cat(), "guarded")
    server["register"](_perfect(), "guarded")
    MlflowClient(url).set_registered_model_alias("guarded", "champion", "2")
    image = next((server["data"] / "cat").iterdir())
    said = ("models:/guarded@champion is version 2, moved there outside visiontune (the last "
            "recorded move made version 1 champion (first registration, ")
    used = _cli("predict", "--model", "models:/guarded@champion", str(image), env=env, cwd=tmp)
    assert used.returncode == 0, used.stderr
    warnings = [line for line in used.stderr.splitlines() if "outside visiontune" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"visiontune: warning: {said}")
    refused = _cli("predict", "--model", "models:/guarded@champion", str(image),
                   "registry.require_promotion_record=true", env=env, cwd=tmp)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith(f"visiontune: error: {said}")
    assert refused.stderr.strip().endswith("refusing it (registry.require_promotion_record"
                                           "=true)") and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    strict = _cli("serve", "--model", "guarded", "--port", str(free_port()),
                  "registry.require_promotion_record=true", env=env, cwd=tmp, timeout=120)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert strict.stderr.strip().splitlines() == [
        line for line in strict.stderr.strip().splitlines() if "refusing it" in line]
    proc, base, log = _start_serve(server, "guarded", log_name="guarded.log")
    try:
        wait_until_ok(f"{base}/ping", proc, log, 120)
        with urllib.request.urlopen(f"{base}/ping") as r:
            assert r.headers["X-Visiontune-Model-Version"] == "2"
    finally:
        stop_group(proc)
    assert [line for line in log.read_text().splitlines() if "outside visiontune" in line
            and f"warning: {said}" in line], log.read_text()


def _post(base: str, body: bytes, content_type: str = "application/json", timeout=60):
    request = urllib.request.Request(f"{base}/invocations", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _raw_post(port: int, length_header: str, chunks: list[bytes]) -> str:
    """POST /invocations over a bare socket, sending `chunks` of the body (not necessarily all
    of it), then read the answer's head."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     f"application/json\r\n{length_header}\r\n\r\n".encode())
        for chunk in chunks:
            sock.sendall(chunk)
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                break
            head += data
    return head.decode(errors="replace").lower().replace("http/1.1", "HTTP/1.1")


def _frame(column: str, values: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": [column],
                                           "data": [[v] for v in values]}}).encode()


def _photo_jpeg(size: int = 256) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_serve_reads_only_what_it_is_sent_and_stops_gracefully(server, tmp_path):
    """Hostile requests to 2 workers: a body over the limit (declared, and chunked with no
    length), malformed bytes, a path to a server file, a FIFO; then SIGTERM with a request
    in flight: it is answered, and the server exits 0."""
    import os
    import signal

    server["register"](_perfect(), "bounded")
    port = free_port()
    log = server["tmp"] / "bounded.log"
    proc = subprocess.Popen(
        [VISIONTUNE, "serve", "--model", "bounded", "--port", str(port), "--workers", "2"],
        env={**server["env"], "VISIONTUNE_MAX_REQUEST_BYTES": "100000000"}, cwd=server["tmp"],
        start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    try:
        wait_until_ok(f"{base}/ping", proc, log, 120)
        # Refused before the body is read: a client that goes on sending may see the
        # connection closed instead, as with any server that refuses early.
        declared = _raw_post(port, "Content-Length: 101000000", [b"x" * 1000])
        assert declared.startswith("HTTP/1.1 413") and "x-visiontune-model-version: 1" in declared
        chunk = b"%x\r\n%s\r\n" % (1_000_000, b"y" * 1_000_000)
        assert _raw_post(port, "Transfer-Encoding: chunked", [chunk] * 101).startswith(
            "HTTP/1.1 413")
        status, headers, body = _post(base, b"{not json")
        assert status == 400 and "error_code" in json.loads(body)
        assert headers["X-Visiontune-Model-Version"] == "1"
        try:   # any answer names the version, a 404 too
            urllib.request.urlopen(f"{base}/no-such-route", timeout=10)
        except urllib.error.HTTPError as e:
            assert e.code == 404 and e.headers["X-Visiontune-Model-Version"] == "1"
        assert _post(base, b"a,b\n", "text/plain")[0] == 415
        started = time.time()
        status, _, body = _post(base, _frame("path", ["/etc/passwd", str(fifo)]))
        assert status == 200 and time.time() - started < 10
        assert [row["error"].split(":")[0] for row in json.loads(body)["predictions"]] == \
            ["PathRefused", "PathRefused"]
        # a request in flight when SIGTERM arrives is answered; then the server exits 0
        photo = base64.b64encode(_photo_jpeg()).decode()
        answer = {}
        def in_flight():
            try:
                answer.update(zip(("status", "headers", "body"),
                                  _post(base, _frame("image", [photo] * 1000))))
                answer["at"] = time.time()
            except OSError as e:
                answer["error"] = repr(e)

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(1.0)
        signalled = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        thread.join(timeout=60)
        assert proc.wait(timeout=40) == 0, log.read_text()[-2000:]
    finally:
        stop_group(proc)
    assert answer["status"] == 200 and answer["at"] > signalled, answer
    rows = json.loads(answer["body"])["predictions"]
    assert len(rows) == 1000 and all(r["error"] is None for r in rows)
