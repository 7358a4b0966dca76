"""`visiontune predict --ray`: a Ray Data `map_batches` job on a local Ray, with the registered
model's own predict, over a few thousand generated images. It must write what the
single-process `visiontune predict` writes (same rows, same order, same skipped files), as CSV
or Parquet, show progress, and on Ctrl-C / SIGTERM leave only a `.partial` file and no process
behind. Every command runs as the README shows it, in its own session, and every process of
that session must be gone afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import cli_env, free_port, make_image_folder, register_untrained_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
MODEL = "batch-e2e"
PER_CLASS = 1500   # 3,000 images, plus the 3 unreadable files make_image_folder adds


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    uri = f"sqlite:///{tmp}/mlflow.db"
    register_untrained_model(uri, MODEL, image_size=16, artifact_location=str(tmp / "mlruns"))
    images = make_image_folder(tmp / "images", per_class=PER_CLASS, size=20)
    env = cli_env()
    env.pop("VISIONTUNE_PREDICT_RAY_ABOVE", None)
    return {"tmp": tmp, "uri": uri, "images": images, "env": env,
            "model": ["--model", f"models:/{MODEL}@champion", "--tracking-uri", uri]}


def _session_alive(sid: int) -> list[str]:
    """Processes still in session `sid` (the command and everything it started)."""
    out = subprocess.run(["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split(None, 1)[0] == str(sid)]


def _wait_gone(sid: int, timeout: float = 60) -> list[str]:
    deadline = time.time() + timeout
    while (alive := _session_alive(sid)) and time.time() < deadline:
        time.sleep(0.5)
    return alive


def _kill_session(sid: int) -> None:
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _predict(setup, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`visiontune predict ...` in a session of its own; nothing of it may outlive it."""
    proc = subprocess.Popen([str(BIN / "visiontune"), "predict", *args],
                            cwd=setup["tmp"], env=env or setup["env"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        left = _wait_gone(proc.pid)
        assert not left, f"processes left behind by predict: {left}"
    finally:
        _kill_session(proc.pid)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def single(setup):
    """The single-process command, writing Parquet."""
    out = setup["tmp"] / "single.parquet"
    p = _predict(setup, *setup["model"], str(setup["images"]), "-o", str(out), "--no-ray")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "in this process" in p.stderr.splitlines()[0]
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["path", "prediction", "probability"]
    assert str(frame.probability.dtype) == "float64"
    return {"frame": frame, "stderr": p.stderr}


def _skipped(stderr: str) -> list[str]:
    return [line.split(":")[1].strip() for line in stderr.splitlines()
            if line.startswith("visiontune: skipped ")]


def test_ray_job_writes_what_one_process_writes(setup, single, tmp_path):
    """Above VISIONTUNE_PREDICT_RAY_ABOVE images, without --ray, the job runs on Ray."""
    out = tmp_path / "ray.csv"
    env = {**setup["env"], "VISIONTUNE_PREDICT_RAY_ABOVE": "1000"}
    p = _predict(setup, *setup["model"], str(setup["images"]), "-o", str(out),
                 "--batch-size", "32", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert lines[0].startswith(f"predict: 3,004 images with models:/{MODEL}/1 (alias "
                               "champion), on Ray (a local Ray); Ray's own output: ")
    log = Path(lines[0].split("Ray's own output: ")[1].split(" (--verbose")[0])
    assert log.is_file() and "MapBatches(_Classifier)" in log.read_text()
    assert "predict: 2 Ray Data workers (1 CPU each) load the model" in lines
    summary = [line for line in lines if line.startswith("predict: 3,004 images in ")]
    assert len(summary) == 1 and summary[0].endswith(
        f"3,001 classified, 3 unreadable -> {out}")
    # the same skipped files, named the same way
    assert _skipped(p.stderr) == _skipped(single["stderr"])
    assert sorted(Path(s).name for s in _skipped(p.stderr)) == \
        ["empty.jpg", "not_an_image.png", "truncated.png"]
    got, expected = pd.read_csv(out), single["frame"]
    assert len(got) == 3001
    assert got.path.tolist() == expected.path.tolist()          # input order kept
    assert got.prediction.tolist() == expected.prediction.tolist()
    assert (got.probability - expected.probability).abs().max() <= 1e-6
    assert not Path(str(out) + ".partial").exists()
    # Ray Data's own progress bars are off the console; ours are the lines above
    assert not any("Running Dataset" in line or "MapBatches" in line for line in lines)


def test_below_the_threshold_one_process_and_csv_on_stdout(setup):
    env = {**setup["env"], "VISIONTUNE_PREDICT_RAY_ABOVE": "1000"}
    few = _predict(setup, *setup["model"], str(setup["images"] / "cat" / "000.png"), env=env)
    assert few.returncode == 0 and "in this process" in few.stderr.splitlines()[0]
    lines = few.stdout.splitlines()
    assert lines[0] == "path,prediction,probability" and len(lines) == 2
    assert lines[1].startswith(f"{setup['images'] / 'cat' / '000.png'},")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_leaves_a_partial_file_and_no_process(setup, tmp_path, sig, code):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM mid-job: the
    rows so far stay in `<output>.partial`, no file gets the final name, Ray goes down."""
    out = tmp_path / "stopped.csv"
    partial = Path(str(out) + ".partial")
    proc = subprocess.Popen(
        [str(BIN / "visiontune"), "predict", *setup["model"], str(setup["images"]), "-o",
         str(out), "--ray", "--workers", "1", "--batch-size", "4"],
        cwd=setup["tmp"], env=setup["env"], start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if partial.is_file() and len(partial.read_text().splitlines()) > 50:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "finished before the signal: " + proc.stderr.read()[-2000:]
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)     # the terminal's Ctrl-C: the whole foreground group
        else:
            os.kill(proc.pid, sig)       # a service manager: the command itself
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-3000:]
        assert "Traceback" not in err, err
        assert not out.exists()
        rows = pd.read_csv(partial)
        assert 50 <= len(rows) < 3001 and list(rows.columns) == ["path", "prediction",
                                                                 "probability"]
        assert f"predictions so far are in {partial}" in err
        assert "predict: 1 Ray Data workers (1 CPU each) load the model" in err   # --workers
        assert err.strip().splitlines()[-1] == f"visiontune: interrupted by {sig.name}"
        left = _wait_gone(proc.pid)
        assert not left, f"processes left behind: {left}"
    finally:
        _kill_session(proc.pid)
        proc.wait()


def test_mistakes_get_one_line(setup, tmp_path):
    # usage mistakes: exit 2, as docs/faults.md promises (tests/unit/test_exit_codes.py has
    # every command's)
    config = "visiontune: config error: "
    bad = [(["--workers", "0", "--ray"], f"{config}--workers must be at least 1, got 0"),
           (["--batch-size", "0"], f"{config}--batch-size must be at least 1, got 0"),
           (["-o", str(tmp_path)], f"{config}--output {tmp_path} is a folder; give a "
                                   f"file name (.csv, or .parquet)")]
    for extra, line in bad:
        p = _predict(setup, *setup["model"], str(setup["images"] / "cat" / "000.png"), *extra)
        assert p.returncode == 2 and p.stderr.strip() == line, p.stderr
    # a cluster address where nothing listens: one line at once, not minutes of retries
    port = free_port()
    start = time.monotonic()
    p = _predict(setup, *setup["model"], str(setup["images"] / "cat" / "000.png"),
                 "--address", f"127.0.0.1:{port}")
    assert p.returncode == 1 and time.monotonic() - start < 60
    assert p.stderr.strip().splitlines()[-1] == \
        f"visiontune: error: no Ray cluster answers at 127.0.0.1:{port}: Connection refused"
    assert "Traceback" not in p.stderr
    env = {**setup["env"], "VISIONTUNE_PREDICT_RAY_ABOVE": "many"}
    p = _predict(setup, *setup["model"], str(setup["images"]), env=env)
    assert p.returncode == 2 and p.stderr.strip() == \
        "visiontune: config error: VISIONTUNE_PREDICT_RAY_ABOVE='many' is not a number of images"
