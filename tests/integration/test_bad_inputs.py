"""Mistakes a user can make, through the real `visiontune` command: each one is a single
`visiontune: ...` line naming what is wrong, a non-zero exit code, no traceback, and nothing
registered."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import free_port, make_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    images = make_image_folder(root / "images", per_class=12, corrupt=False)
    one_class = make_image_folder(root / "one_class", classes=("cat",), per_class=12,
                                  corrupt=False)
    tiny = make_image_folder(root / "tiny", classes=("cat", "dog"), per_class=2, corrupt=False)
    (root / "empty").mkdir()
    (root / "no_columns.csv").write_text("file,class\na.png,cat\n")
    (root / "broken.yaml").write_text("train: [unclosed\n")
    unreadable = root / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_text("not an image")
    (unreadable / "b.jpg").write_bytes(b"")
    port = free_port()
    return {"root": root, "images": images, "one_class": one_class, "tiny": tiny,
            "unreadable": unreadable, "port": port}


F = "data=folder"


def _cases():
    # (id, argv with {placeholders}, text the error line must contain, expected exit code)
    return [
        ("unknown-optimizer", ["run", "train.optimizer=adamx"], "train.optimizer", 2),
        ("unknown-key", ["run", "train.epochz=3"], "train.epochz", 2),
        ("not-an-int", ["run", "train.epochs=three"], "train.epochs", 2),
        ("negative-lr", ["run", "train.lr=-1"], "train.lr", 2),
        ("not-a-duration", ["run", "search.budget=4x"], "search.budget", 2),
        ("unknown-group-option", ["run", "search=nosuch"], "search='nosuch'", 2),
        ("missing-config-file", ["run", "--config", "{root}/nope.yaml"], "not found", 2),
        ("broken-yaml", ["run", "--config", "{root}/broken.yaml"], "not valid YAML", 2),
        ("fractions", ["run", "data.val_fraction=0.6", "data.test_fraction=0.5"],
         "leave >= 10%", 2),
        ("unknown-model", ["run", "model.name=resnet9000"], "model.name", 2),
        ("cnn-freeze", ["run", "model.freeze=backbone"], "model.freeze", 2),
        ("bad-distribution", ["run", "search.space.train.lr={loguniform: [0, 1]}"],
         "loguniform needs low > 0", 2),
        ("invalid-combination", ["run", "search.mode=random",
                                 "search.space.model.name={choice: [cnn, resnet18]}",
                                 "search.space.model.freeze={choice: [none, backbone]}"],
         "model.freeze", 2),
        ("image-too-small-for-backbone", ["run", "model=resnet18", "model.name=vgg11",
                                          "data.image_size=8", "search=quick"],
         "data.image_size", 2),
        ("no-pretrained-weights", ["run", "model=resnet18", "model.pretrained=true",
                                   "model.weights_path={root}/nope.pth", "search=quick"],
         "pretrained weights", 1),
        ("binary-on-10-classes", ["run", "evaluation.average=binary",
                                  "data.cache_dir={root}/cache"], "binary", 2),
        ("unsupported-tracking-uri", ["run", "tracking.uri=ftp://host/mlruns"],
         "tracking.uri=ftp://host/mlruns", 1),
        ("unreachable-tracking-server", ["run", "tracking.uri=http://127.0.0.1:{port}"],
         "cannot use the MLflow tracking store", 1),
        ("missing-data-folder", ["run", F, "data.path={root}/nope"], "nope is not a directory",
         1),
        ("csv-without-columns", ["run", F, "data.path={root}/no_columns.csv"],
         "path,label", 1),
        ("empty-data-folder", ["run", F, "data.path={root}/empty"], "2 classes", 1),
        ("one-class", ["run", F, "data.path={one_class}"], "2 classes", 1),
        ("classes-too-small", ["run", F, "data.path={tiny}"], "too small", 1),
        ("workers-never-fit", ["run", F, "data.path={images}", "search=quick",
                               "train.num_workers=64"], "can never fit", 1),
        ("resume-unknown-id", ["run", "--resume", "vt-20990101-000000-abcdef"],
         "no pipeline run", 2),
        ("resume-changes-experiment", ["run", "--resume", "vt-x", "train.epochs=3"],
         "train.epochs cannot be changed", 2),
        ("resume-with-config", ["run", "--resume", "vt-x", "--config", "{root}/x.yaml"],
         "--config", 2),
        ("predict-unregistered-model", ["predict", "--model", "models:/nope@champion",
                                        "{images}/cat/000.png"], "models:/nope@champion", 1),
        ("predict-missing-file", ["predict", "--model", "models:/nope@champion",
                                  "{root}/nope.png"], "does not exist", 1),
        ("promote-unknown-model", ["promote", "--model", "nope"], "nope", 1),
        ("rollback-unknown-model", ["rollback", "--model", "nope"], "nope", 1),
        ("submit-no-ray-there", ["submit", "--address", "http://127.0.0.1:{port}",
                                 "train.epochs=1"], "127.0.0.1:{port}", 1),
        ("status-no-ray-there", ["status", "visiontune-x", "--address",
                                 "http://127.0.0.1:{port}"], "127.0.0.1:{port}", 1),
    ]


def _run_case(ws, case_id: str, argv: list[str]) -> dict:
    """One case in a working directory of its own (its own default ./mlflow.db)."""
    def fill(text: str) -> str:  # not str.format: YAML values hold braces
        for key, value in ws.items():
            text = text.replace("{" + key + "}", str(value))
        return text

    cwd = ws["root"] / "cases" / case_id
    cwd.mkdir(parents=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "VISIONTUNE_DEBUG"):
        env.pop(key, None)
    started = time.time()
    with open(cwd / "stdout", "w+") as out, open(cwd / "stderr", "w+") as err:
        proc = subprocess.Popen([str(BIN / "visiontune"), *[fill(a) for a in argv]], cwd=cwd,
                                env=env, stdout=out, stderr=err)
        cpu = _wait_cpu(proc, timeout=300)
        out.seek(0), err.seek(0)
        p = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    return {"proc": p, "took": time.time() - started, "cpu": cpu, "cwd": cwd, "fill": fill}


def _wait_cpu(proc: subprocess.Popen, timeout: float) -> float:
    """Wait for the command; the CPU-seconds it and the processes it reaped used (os.wait4's
    rusage), which, unlike its wall time, do not grow when other tests load the machine."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail(f"`{' '.join(proc.args[1:])}` still ran after {timeout:.0f} s")


@pytest.fixture(scope="module")
def outcomes(ws):
    """Every case runs once, two at a time (the commands are independent, and most of their
    time is Python starting up): the table takes half as long."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = {c[0]: pool.submit(_run_case, ws, c[0], c[1]) for c in _cases()}
        return {case_id: f.result() for case_id, f in futures.items()}


@pytest.mark.parametrize("case_id,expected,code", [(c[0], *c[2:]) for c in _cases()],
                         ids=[c[0] for c in _cases()])
def test_bad_input_is_one_line_without_traceback(outcomes, case_id, expected, code):
    o = outcomes[case_id]
    p, expected = o["proc"], o["fill"](expected)
    out = p.stdout + p.stderr
    assert p.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    ours = [line for line in p.stderr.splitlines() if line.startswith("visiontune:")
            and not line.startswith("visiontune: warning:")]
    assert len(ours) == 1, p.stderr[-3000:]
    assert expected in ours[0], ours[0]
    # Bounded by what it costs, not by the clock: under the suite's load a 10-CPU-second
    # mistake took 118 s of wall time. The most any case costs on an idle 2-core machine is
    # about 12 CPU-seconds (the data mistakes: torch, Ray and MLflow imported, the store
    # created). The wall bound is for a command that waits (a retry loop, a hang), not one
    # that computes.
    assert o["cpu"] < 30, f"{o['cpu']:.1f} CPU-seconds"
    assert o["took"] < 240, f"{o['took']:.0f}s"
    db = o["cwd"] / "mlflow.db"
    if db.exists():
        assert MlflowClient(f"sqlite:///{db}").search_model_versions() == []


def test_debug_flag_shows_the_traceback(ws):
    p = subprocess.run([str(BIN / "visiontune"), "--debug", "run", "train.optimizer=adamx"],
                       cwd=ws["root"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" in p.stderr and "visiontune: config error" in p.stderr
