"""Start-up marks: written only when VISIONTUNE_TIMINGS names a file, one JSON line per mark
from any process."""

import subprocess
import sys

import pytest

from components import timing


def test_mark_writes_nothing_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    timing.mark("trial_start", trial="t1")
    assert not timing.enabled() and list(tmp_path.iterdir()) == []


def test_marks_from_several_processes_read_back(tmp_path, monkeypatch):
    path = tmp_path / "marks.jsonl"
    monkeypatch.setenv(timing.ENV, str(path))
    timing.mark("fit_start", trial="t1")
    code = ("from components import timing\n"
            "for i in range(200): timing.mark('epoch', trial='t1', rank=1, epoch=i)")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    timing.mark("fit_end", trial="t1", at=123.0)
    marks = timing.read_marks(str(path))
    assert len(marks) == 602  # no line lost or torn by concurrent appends
    assert marks[0]["event"] == "fit_start" and marks[-1] == {**marks[-1], "t": 123.0}
    assert sorted({m["pid"] for m in marks if m["event"] == "epoch"}) == \
        sorted(p.pid for p in procs)


def test_timed_adds_each_span_also_when_the_block_raises():
    import time

    spans = {}
    with timing.timed(spans, "train_s"):
        time.sleep(0.05)
    with timing.timed(spans, "train_s"):
        time.sleep(0.05)
    with pytest.raises(RuntimeError), timing.timed(spans, "val_s"):
        time.sleep(0.02)
        raise RuntimeError("boom")
    assert 0.1 <= spans["train_s"] < 0.5 and 0.02 <= spans["val_s"] < 0.3
