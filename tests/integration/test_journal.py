"""The tracking journal and the outage rules, without a server: a Tracker pointed at a port
where nothing listens writes to the journal; a Tracker on a SQLite store with the same journal
sends it. The record is then read back through MlflowClient."""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.tracking import EpochLogger, Journal, JournalError, Tracker, TrackingError
from components.tracking.journal import no_space
from components.tracking.server import StoreWatch, check_tracking_uri, is_unreachable
from tests.conftest import (
    free_port,  # a port where nothing listens once it is closed
    log_lines,
)

pytestmark = pytest.mark.integration   # opens a SQLite MLflow store


@pytest.fixture(autouse=True)
def _no_http_retries(monkeypatch):
    # A refused connection fails at once (the pipeline bounds these to seconds, MLflow's own
    # defaults to minutes).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@pytest.fixture
def stores(tmp_path):
    """(a tracker whose server is away, one whose store answers, the store's client, runs)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    up = Tracker(uri, Journal(str(tmp_path / "journal"), grace_s=60))
    exp = up.ensure_experiment("unit", str(tmp_path / "artifacts"))
    parent = up.create_run(exp, "pipeline", {"visiontune.role": "pipeline"})
    trial = up.get_or_create_trial_run(exp, parent, "t1", "t1", {"train.lr": 0.1})
    away = Tracker(f"http://127.0.0.1:{free_port()}",
                   Journal(str(tmp_path / "journal"), grace_s=60))
    return away, up, MlflowClient(uri), {"exp": exp, "parent": parent, "trial": trial}


def test_writes_during_an_outage_are_journaled_then_sent_once_in_order(stores, tmp_path):
    away, up, client, runs = stores
    trial = runs["trial"]
    before = int(time.time() * 1000)
    for epoch in (1, 2, 3):
        away.log_metrics(trial, {"val_f1": 0.5 + epoch / 10, "val_loss": 1.0 / epoch},
                         step=epoch)
        time.sleep(0.01)
    away.set_tags(trial, {"visiontune.node_id": "n1"})
    image = tmp_path / "samples.png"
    image.write_bytes(b"\x89PNG not really")
    away.log_artifact(trial, image, "plots")
    image.unlink()   # gone before the server is back: the record carries the bytes
    away.end_run(trial, "FINISHED")
    assert away.journal.down_since is not None
    assert client.get_metric_history(trial, "val_f1") == []   # nothing reached the store
    assert up.journal.count() == 6

    assert up.send_journal() == 6
    assert up.send_journal() == 0 and up.journal.count() == 0
    history = client.get_metric_history(trial, "val_f1")
    assert [m.step for m in history] == [1, 2, 3]
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and stamps[0] >= before   # their own times, not the send's
    run = client.get_run(trial)
    assert run.info.status == "FINISHED" and run.data.tags["visiontune.node_id"] == "n1"
    got = Path(client.download_artifacts(trial, "plots/samples.png", str(tmp_path / "dl")))
    assert got.read_bytes() == b"\x89PNG not really"


def test_sending_a_record_twice_keeps_one_copy(stores, tmp_path):
    away, up, client, runs = stores
    away.log_metrics(runs["trial"], {"val_f1": 0.9}, step=1)
    (record,) = up.journal.records()
    copy = Path(record.path).read_text()
    up.send_journal()
    Path(record.path).write_text(copy)   # a sender died after sending, before deleting
    assert up.send_journal() == 1
    assert [(m.step, m.value) for m in client.get_metric_history(runs["trial"], "val_f1")] \
        == [(1, 0.9)]


def test_a_torn_record_is_dropped_and_a_temp_file_is_not_read(stores):
    away, up, client, runs = stores
    for epoch in (1, 2):
        away.log_metrics(runs["trial"], {"val_f1": 0.1 * epoch}, step=epoch)
    first, second = up.journal.records()
    doc = json.loads(Path(second.path).read_text())
    doc["args"][1]["val_f1"] = 0.99                          # changed after its digest
    Path(second.path).write_text(json.dumps(doc))
    Path(first.path).with_name(".000000099.json.tmp").write_text('{"v": 1, "t": ')
    with pytest.warns(UserWarning, match="torn record"):
        assert [r.seq for r in up.journal.records()] == [1]
    up.send_journal()
    assert [m.step for m in client.get_metric_history(runs["trial"], "val_f1")] == [1]


def test_a_worker_restarted_during_an_outage_does_not_log_a_journaled_epoch_again(stores):
    away, up, client, runs = stores
    trial = runs["trial"]
    up.log_metrics(trial, {"val_f1": 0.5}, step=1)
    away.log_metrics(trial, {"val_f1": 0.6}, step=2)       # journaled, not yet sent
    restarted = EpochLogger(up, trial)
    assert restarted.last_logged_epoch == 2
    assert not restarted.log_epoch(2, {"val_f1": 0.61})
    up.send_journal()
    assert [(m.step, m.value) for m in client.get_metric_history(trial, "val_f1")] == \
        [(1, 0.5), (2, 0.6)]


def test_a_closed_trial_run_is_closed_on_send_only_if_still_running(stores):
    away, up, client, runs = stores
    away.end_run(runs["trial"], "FINISHED")
    away.close_trial_run(runs["exp"], runs["parent"], "t1", "KILLED")   # later: no effect
    up.send_journal()
    assert client.get_run(runs["trial"]).info.status == "FINISHED"


def test_reads_wait_for_the_server_within_the_grace_then_fail(tmp_path):
    away = Tracker(f"http://127.0.0.1:{free_port()}", Journal(str(tmp_path), grace_s=0.5))
    started = time.monotonic()
    with pytest.raises(TrackingError, match="has not answered for"):
        away.until_up(lambda: away.client.search_experiments())
    assert time.monotonic() - started < 30
    plain = Tracker(away.uri)   # no journal: the error at once, as before
    with pytest.raises(Exception) as e:
        plain.until_up(lambda: plain.client.search_experiments())
    assert is_unreachable(e.value)


def test_a_full_disk_fails_the_journal_write_in_one_line(tmp_path, monkeypatch):
    journal = Journal(str(tmp_path / "journal"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(JournalError) as e:
        journal.append("tags", ["run", {"a": "b"}])
    assert "no space left" in str(e.value) and str(tmp_path) in str(e.value)
    assert "free:" in str(e.value) and no_space(e.value)
    assert list((tmp_path / "journal").rglob("*")) == [next(
        (tmp_path / "journal").iterdir())]   # the writer's folder, and no half record in it
    assert not no_space(RuntimeError("something else"))
    assert no_space("OSError: [Errno 28] No space left on device")


def test_start_up_check_tells_a_server_that_is_down_from_one_that_is_slow():
    with pytest.raises(TrackingError, match=r"Connection refused \(the server is down\)"):
        check_tracking_uri(f"http://127.0.0.1:{free_port()}", timeout_s=2, slow_grace_s=30)
    # A server that accepts the connection and never answers (its workers restarting).
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        started = time.monotonic()
        with pytest.raises(TrackingError, match=r"the server is slow: no answer for \d+ s"), \
                log_lines("components.tracking") as lines:
            check_tracking_uri(f"http://127.0.0.1:{listening.getsockname()[1]}", timeout_s=1,
                               slow_grace_s=3)
        assert 3 <= time.monotonic() - started < 20
        assert len(lines) == 1 and "slow to answer" in lines[0]


def test_store_watch_rides_out_an_outage_for_its_grace(tmp_path):
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", Journal(str(tmp_path), grace_s=1))
    watch = StoreWatch(tracker, every_s=0)
    with log_lines("components.tracking") as lines:
        assert watch.lost() is False and watch.lost() is False   # within the grace
    assert len(lines) == 1 and "unreachable since" in lines[0] and "training continues" in lines[0]
    time.sleep(1.2)
    assert watch.lost() is True


def test_store_watch_sends_the_journal_when_the_server_is_back(stores):
    away, up, client, runs = stores
    away.log_metrics(runs["trial"], {"val_f1": 0.7}, step=1)
    watch = StoreWatch(up, every_s=0)
    watch.down_since = time.time() - 5          # it had seen the server go
    with log_lines("components.tracking") as lines:
        assert watch.lost() is False
    assert "back after" in lines[-1] and "1 journaled records sent" in lines[-1]
    assert len(client.get_metric_history(runs["trial"], "val_f1")) == 1


def test_two_senders_at_once_send_each_record_once(stores):
    away, up, client, runs = stores
    for epoch in range(1, 31):
        away.log_metrics(runs["trial"], {"val_f1": epoch / 100}, step=epoch)
    other = Tracker(up.uri, Journal(up.journal.root))
    threads = [threading.Thread(target=t.send_journal) for t in (up, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = [m.step for m in client.get_metric_history(runs["trial"], "val_f1")]
    assert sorted(steps) == list(range(1, 31))


def test_a_journal_in_a_bucket_is_published_read_and_sent(s3_server, tmp_path):
    """With ray.storage_path in object storage the journal lives beside the checkpoints there:
    one PUT per record (moto's S3 server)."""
    bucket = s3_server.bucket("journal-test")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    up = Tracker(uri, Journal(f"s3://{bucket}/runs/vt-1/journal"))
    exp = up.ensure_experiment("unit", str(tmp_path / "artifacts"))
    run = up.create_run(exp, "trial", {})
    away = Tracker(f"http://127.0.0.1:{free_port()}", Journal(up.journal.root))
    for epoch in (1, 2, 3):
        away.log_metrics(run, {"val_f1": epoch / 10}, step=epoch)
    keys = s3_server.keys(bucket, "runs/vt-1/journal/")
    assert len(keys) == 3 and all(k.endswith(".json") for k in keys)
    assert [r.seq for r in up.journal.records()] == [1, 2, 3]
    assert up.send_journal() == 3
    # (pyarrow may leave an empty folder marker behind: no record)
    assert [k for k in s3_server.keys(bucket, "runs/vt-1/journal/") if k.endswith(".json")] == []
    assert [m.step for m in MlflowClient(uri).get_metric_history(run, "val_f1")] == [1, 2, 3]


def test_two_threads_writing_during_an_outage_journal_every_record_once(tmp_path):
    """Rank 0's epochs and its system-metrics sampler write from two threads of one
    process: their records must neither collide (one temp name, one sequence) nor be lost."""
    import sys

    tracker = Tracker(f"http://127.0.0.1:{free_port()}", Journal(str(tmp_path), grace_s=60))
    tracker.journal.down_since = time.time()     # the server went away a moment ago
    tracker.journal.probed = time.monotonic() + 3600
    errors = []

    def write(key):
        try:
            for i in range(300):
                tracker.log_metrics("r1", {key: float(i)}, step=i)
        except Exception as e:   # pragma: no cover - what the test is about
            errors.append(e)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=write, args=(k,)) for k in ("val_f1", "system/x")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    records = tracker.journal.records()
    assert len(records) == 600
    assert len({r.seq for r in records}) == 600
