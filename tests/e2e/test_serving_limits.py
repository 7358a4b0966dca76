"""Hostile requests to a real `mlflow models serve`, each with a bound on time (and memory):
server files named by a client (a FIFO, a symlink out, /etc/passwd), decompression bombs,
a request over its pixel budget. The served model is a registered untrained CNN
(`register_untrained_model`, logged as the pipeline logs its champion): what is under test
is the served model's input handling, which training does not change. All three tests are
`timed`, so this module runs in the suite's timed phase (tests/scheduling.py), on a machine
otherwise idle; a trained pipeline behind it would put a training run in that phase too."""

from __future__ import annotations

import os

import pytest

from tests.conftest import register_untrained_model
from tests.e2e.test_serving import (
    CLASSES,
    _b64,
    _post,
    _server_peak_rss_mb,
    serving,
    write_incoming,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timed]

MODEL = "e2e-limits"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    uri = f"sqlite:///{tmp}/mlflow.db"
    register_untrained_model(uri, MODEL, classes=tuple(CLASSES),
                             artifact_location=str(tmp / "mlruns"))
    return {"tmp": tmp, "uri": uri}


@pytest.fixture(scope="module")
def incoming(served):
    return write_incoming(served["tmp"] / "incoming")


@pytest.fixture(scope="module")
def server(served):
    """`mlflow models serve` of the champion, reading path rows only under the `incoming`
    folder, with 60 M pixels per request (the default is 1,000 M: the budget test spends 60 M
    with two images)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": served["uri"], "NO_ALBUMENTATIONS_UPDATE": "1",
           "VISIONTUNE_ALLOWED_PATH_ROOTS": str(served["tmp"] / "incoming"),
           "VISIONTUNE_MAX_REQUEST_PIXELS": "60000000"}
    with serving(MODEL, served["tmp"], env) as url:
        yield url


def test_paths_a_client_names_are_refused_alike_and_the_server_keeps_answering(
        server, incoming, tmp_path):
    """Server files named by a client: /etc/passwd, a FIFO (which blocked a worker thread
    forever), a symlink out of the allowed folder, a path that does not exist. One answer for
    all, at once; the allowed folder's own files are read; the server answers after."""
    import time

    good, _ = incoming
    allowed = good[0].parent
    os.mkfifo(allowed / "fifo.png")
    outside = tmp_path / "secret.png"
    outside.write_bytes(good[0].read_bytes())
    (allowed / "escape.png").symlink_to(outside)
    hostile = ["/etc/passwd", str(allowed / "fifo.png"), str(allowed / "escape.png"),
               str(allowed / "does-not-exist.png"), str(outside), "/dev/zero"]
    for _ in range(3):   # more than the pool of a stuck server would take
        start = time.monotonic()
        status, answer = _post(server, {"dataframe_split": {
            "columns": ["path"], "data": [[p] for p in hostile] + [[str(good[0])]]}})
        assert time.monotonic() - start < 5
        assert status == 200, answer
        rows = answer["predictions"]
        errors = {r["error"] for r in rows[:-1]}
        assert len(errors) == 1, errors       # says nothing of what exists
        (error,) = errors
        assert error.startswith("PathRefused: not a regular file under the folders")
        assert rows[-1]["error"] is None and rows[-1]["prediction"] in CLASSES
    status, _ = _post(server, {"dataframe_split": {"columns": ["image"],
                                                   "data": [[_b64(good[1].read_bytes())]]}})
    assert status == 200


def test_decompression_bombs_are_row_errors_in_bounded_time_and_memory(server, incoming):
    import time

    from tests.unit.test_serving_model import _png_header

    good, _ = incoming
    wide = _png_header(20_000, 20_000)                            # 400 M pixels
    deep = _png_header(12_000, 12_000, bit_depth=16, color=0)    # 16-bit, 144 M pixels
    assert len(wide) < 200_000 and len(deep) < 200_000
    before = _server_peak_rss_mb(server)
    for bomb in (wide, deep):
        start = time.monotonic()
        status, answer = _post(server, {"dataframe_split": {"columns": ["image"], "data": [
            [_b64(bomb)], [_b64(good[0].read_bytes())]]}})
        elapsed = time.monotonic() - start
        assert status == 200, answer
        bad, ok = answer["predictions"]
        assert bad["error"].startswith("ImageRefused: ") and bad["prediction"] is None
        assert ok["error"] is None and ok["prediction"] in CLASSES
        assert elapsed < 2, elapsed
    assert _server_peak_rss_mb(server) - before < 300
    status, refused = _post(server, {"dataframe_split": {"columns": ["image"], "data": [
        [_b64(good[0].read_bytes())]] * 1025}})
    assert status == 400, refused   # MLflow answers with its own generic message
    status, _ = _post(server, {"dataframe_split": {"columns": ["image"],
                                                   "data": [[_b64(good[0].read_bytes())]]}})
    assert status == 200


def test_a_request_over_its_pixel_budget_gets_row_errors_and_the_next_one_is_answered(
        server, incoming):
    """Images each under the per-image limit, together over the request's budget: the rows
    after it is spent are refused before they are decoded, the rest classified, quickly; the
    next request has its own budget."""
    import time

    from tests.unit.test_serving_model import _png_header

    good, _ = incoming
    big = _b64(_png_header(6_000, 6_000))     # 36 M pixels: one fits in 60 M, two do not
    start = time.monotonic()
    status, answer = _post(server, {"dataframe_split": {"columns": ["image"], "data": [
        [big], [big], [_b64(good[0].read_bytes())]]}})
    assert status == 200, answer
    first, second, small = answer["predictions"]
    assert first["error"] is None and first["prediction"] in CLASSES
    assert second["prediction"] is None and second["error"].startswith(
        "ImageRefused: 6000 x 6000 pixels is more than this request has left of its "
        "60,000,000 (VISIONTUNE_MAX_REQUEST_PIXELS)")
    assert small["error"] is None and small["prediction"] in CLASSES   # 80 px at most: fits
    assert time.monotonic() - start < 10
    status, again = _post(server, {"dataframe_split": {"columns": ["image"], "data": [[big]]}})
    assert status == 200 and again["predictions"][0]["error"] is None
