"""`visiontune serve`'s pieces on a SQLite registry, no server: the request shortcut answers
byte for byte as MLflow's scoring server does, the follower swaps to a moved alias and refuses
a version whose files changed, and it looks at the registry on schedule."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.pyfunc.scoring_server import invocations

from components.champion_server import (
    Follower,
    ServeSettings,
    answer,
    image_frame,
    load_version,
)
from components.serving import CODE_TAG, code_digests, example_image_bytes, format_digests
from tests.conftest import register_untrained_model

pytestmark = pytest.mark.integration   # opens a SQLite MLflow store


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-app")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    for _ in range(4):
        version = register_untrained_model(uri, "followed", artifact_location=str(tmp / "art"))
        # the sha256 of its files, as registration records them
        local = mlflow.artifacts.download_artifacts(
            f"models:/followed/{version}", dst_path=str(tmp / f"v{version}"), tracking_uri=uri)
        client.set_model_version_tag("followed", version, CODE_TAG,
                                     format_digests(code_digests(local)))
    return {"uri": uri, "tmp": tmp, "settings": ServeSettings(uri, "followed", poll_s=0.3)}


def _body(images: list[bytes]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(i).decode()] for i in images]}}).encode()


def test_the_shortcut_answers_exactly_as_mlflow_does(registry):
    served = load_version(registry["settings"], "1")
    png = example_image_bytes(3, 16)
    bodies = {
        "images": _body([png, png[:40], b"not an image"]),   # rows with errors too
        "records": json.dumps({"dataframe_records": [{"image": base64.b64encode(
            png).decode()}]}).encode(),
        "bad base64": json.dumps({"dataframe_split": {"columns": ["image"],
                                                      "data": [["!!!"]]}}).encode(),
        "no rows": _body([]),
    }
    for what, body in bodies.items():
        for content_type in ("application/json", "application/json; charset=utf-8"):
            try:
                ours = answer(body, content_type, served)
            except Exception as e:   # MLflow raises its errors for the app to answer
                ours = type(e).__name__ + str(e)
            try:
                theirs = invocations(body, content_type, served.model, served.schema)
            except Exception as e:
                theirs = type(e).__name__ + str(e)
            assert ours == theirs, what
    rows = json.loads(answer(bodies["images"], "application/json", served).response)
    assert [r["error"] is None for r in rows["predictions"]] == [True, False, False]


def test_the_follower_swaps_to_a_moved_alias_and_refuses_changed_files(registry, caplog):
    client = MlflowClient(registry["uri"])
    follower = Follower(registry["settings"])
    old = follower.start()
    follower.stop()
    assert old.version == "1"
    client.set_registered_model_alias("followed", "champion", "2")
    with caplog.at_level(logging.INFO, logger="visiontune.serve"):
        follower.check()
    assert follower.current.version == "2"
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("warning: models:/followed@champion is version 2, moved there "
                            "outside visiontune") for m in said)
    assert any(m.startswith("now serving version 2") for m in said)
    # version 3's network changed in the artifact store: refused, version 2 keeps serving
    source = client.get_model_version("followed", "3").source.removeprefix("models:/")
    (network,) = Path(registry["tmp"]).rglob(f"{source}/**/network.pt2")
    network.write_bytes(network.read_bytes() + b"changed")
    client.set_registered_model_alias("followed", "champion", "3")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visiontune.serve"):
        follower.check()
        follower.check()   # refused once, not downloaded again
    assert follower.current.version == "2" and set(follower.refused) == {"3"}
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == 1 and "network.pt2 no longer matches its sha256" in refused[0]
    assert refused[0].endswith("still serving version 2")


def test_the_registry_is_read_every_poll_and_at_once_when_nudged(registry):
    follower = Follower(registry["settings"])   # poll_s 0.3
    checks: list[float] = []
    follower.check = lambda: checks.append(time.monotonic())
    thread = threading.Thread(target=follower._follow, daemon=True)
    started = time.monotonic()
    thread.start()
    time.sleep(1.05)
    gaps = [b - a for a, b in zip([started, *checks], checks)]
    assert len(checks) == 3 and all(0.25 < g < 0.45 for g in gaps), gaps
    follower.settings = ServeSettings(registry["uri"], "followed", poll_s=60)
    time.sleep(0.35)   # the check scheduled under the old poll, then none for a minute
    before = len(checks)
    follower.nudge()
    time.sleep(1.3)    # a nudge is answered within the minimum gap (1 s)
    follower.stop()
    thread.join(timeout=5)
    assert len(checks) == before + 1


def test_a_version_that_could_not_be_fetched_is_tried_again(registry, caplog, monkeypatch):
    """The artifact store not answering for a moment (its download raises, as a refused
    connection to S3 or an MLflow server does) is not a verdict on the version: it is
    fetched again at the next poll, not refused for good."""
    client = MlflowClient(registry["uri"])
    client.set_registered_model_alias("followed", "champion", "1")
    follower = Follower(registry["settings"])
    follower.start()
    follower.stop()
    real = mlflow.artifacts.download_artifacts
    calls = []

    def away_once(*args, **kwargs):
        calls.append(kwargs.get("artifact_uri"))
        if len(calls) == 1:
            raise ConnectionError("[Errno 111] Connection refused")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", away_once)
    client.set_registered_model_alias("followed", "champion", "4")
    with caplog.at_level(logging.INFO, logger="visiontune.serve"):
        follower.check()
    assert follower.current.version == "1" and "4" not in follower.refused
    assert any(r.getMessage() == "could not fetch followed version 4: [Errno 111] Connection "
               "refused; still serving version 1, trying again" for r in caplog.records)
    follower.check()
    assert follower.current.version == "4" and calls == ["models:/followed/4"] * 2


def test_the_shortcut_takes_only_what_mlflow_would_parse_as_json():
    body = _body([b"x"])
    assert image_frame(body, "application/json") is not None
    assert image_frame(body, "application/json; charset=UTF-8") is not None
    for content_type in ("Application/JSON", "application/json; charset=latin-1",
                         "application/json; foo=bar", "text/csv"):
        assert image_frame(body, content_type) is None, content_type


def test_serve_on_a_port_in_use_is_one_line_and_exit_1(registry, capsys):
    import socket

    from pipelines.cli import main

    MlflowClient(registry["uri"]).set_registered_model_alias("followed", "champion", "1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--model", "followed", "--port", str(port), "--tracking-uri",
                     registry["uri"]])
    err = capsys.readouterr().err
    assert code == 1 and f"visiontune: error: the server on 127.0.0.1:{port} stopped" in err
    assert "Traceback" not in err
