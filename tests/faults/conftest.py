"""Fault injection for real: the pipeline runs as the `visiontune` command in its own process
group (as from a terminal), the test sends real signals, kills real processes and servers,
and then reads the MLflow record back through `MlflowClient`.

Every process a test starts is in a process group the test ends, also when it fails."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import MLFLOW_SERVER_ENV, make_image_folder

BIN = Path(sys.executable).parent
TRIALS, EPOCHS = 2, 6
MODEL = "faults-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> list[str]:
    """Processes still alive in the session (process group tree) a command started."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True,
                         text=True).stdout
    alive = []
    for line in out.splitlines():
        pid, s, stat, args = line.split(None, 3)
        if int(s) == sid and not stat.startswith("Z"):
            alive.append(f"{pid} {args[:80]}")
    return alive


def kill_session(sid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    # Ray's agents may have made their own groups inside the session.
    for line in session_processes(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@dataclass
class Pipeline:
    """A `visiontune` command started as a terminal would: its own session and process group."""

    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        """The exit code; past `timeout`, the command is killed and the test fails with the
        end of its output and of Ray's log (a hang is then read, not guessed)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(self.pid)
            pytest.fail(f"`{' '.join(map(str, self.proc.args[1:]))}` still ran after "
                        f"{timeout:.0f} s:\n{self.output()[-3000:]}\n{self._ray_log_tail()}")

    def _ray_log_tail(self) -> str:
        found = re.search(r"Ray's and Tune's own output: (\S+)", self.output())
        log = Path(found.group(1)) if found else None
        if log is None or not log.is_file():
            return "(no ray.log)"
        return f"--- the end of {log}:\n{log.read_text(errors='replace')[-4000:]}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# Error-level and stack-trace lines from Python, Ray's C++ (glog: E1201 ..., file.cc:123) and
# its log prefixes.
ERROR_LEVEL = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|^E\d{4} |\.cc:\d+|\(raylet\)|"
                         r"\[E\]|Error: ")


class Workspace:
    """A temp folder that is the command's cwd: ./mlflow.db and ./ray_results are the
    pipeline's defaults there, so `visiontune run --resume ID` needs no other argument."""

    def __init__(self, root: Path, env: dict[str, str], num_workers: int | str = 2):
        self.root, self.env = root, env
        self.started: list[Pipeline] = []
        # Big enough that an epoch takes about a second: a fault lands mid-trial reliably.
        data = make_image_folder(root / "images", classes=("cat", "dog", "bird"), per_class=60,
                                 size=32, corrupt=False)
        self.config = root / "faults.yaml"
        self.config.write_text(yaml.safe_dump({
            "defaults": {"data": "folder", "augment": "none", "search": "quick"},
            "data": {"path": str(data), "image_size": 32},
            "model": {"cnn": {"channels": [8, 16]}},
            "train": {"epochs": EPOCHS, "batch_size": 8, "patience": 0, "num_workers": num_workers},
            "search": {"mode": "grid", "space": {
                "train.optimizer": {"grid": ["adam", "sgd_momentum"]}}},
            "registry": {"model_name": MODEL},
        }))
        # The store exists before any command starts: the test's polling and the command
        # would otherwise both create the tables of a new SQLite file, and one loses.
        MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments()

    @property
    def tracking_uri(self) -> str:
        return self.env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root}/mlflow.db"

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def start(self, *args: str, name: str = "run") -> Pipeline:
        log = self.root / f"{name}-{len(self.started)}.log"
        proc = subprocess.Popen([str(BIN / "visiontune"), *args], cwd=self.root, env=self.env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        run = Pipeline(proc, log)
        self.started.append(run)
        return run

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        p = self.start(*args)
        try:
            p.wait(timeout)
        finally:
            kill_session(p.pid)
        return subprocess.CompletedProcess(p.proc.args, p.proc.returncode, p.output(), "")

    # ------------------------------------------------------------------ the record
    def parent(self):
        exp = self.client().get_experiment_by_name("visiontune")
        if exp is None:
            return None
        runs = self.client().search_runs([exp.experiment_id],
                                         "tags.`visiontune.role` = 'pipeline'")
        assert len(runs) <= 1
        return runs[0] if runs else None

    def children(self, parent_id: str):
        exp = self.client().get_run(parent_id).info.experiment_id
        return self.client().search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")

    def epochs_logged(self, run_id: str) -> list[int]:
        return [m.step for m in self.client().get_metric_history(run_id, "val_f1")]

    def versions(self):
        return self.client().search_model_versions(f"name = '{MODEL}'")

    def wait_for(self, what, pipeline: Pipeline, timeout: float = 300, poll: float = 0.2):
        """Poll `what()` (reading MLflow) until it is truthy; fail if the command ended."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pipeline.proc.poll() is not None:
                pytest.fail(f"the command ended ({pipeline.proc.returncode}) before the fault "
                            f"could be injected:\n{pipeline.output()[-3000:]}")
            with contextlib.suppress(Exception):  # the store may not exist yet
                value = what()
                if value:
                    return value
            time.sleep(poll)
        name = getattr(what, "__name__", None) or what.func.__name__   # a functools.partial
        pytest.fail(f"timed out waiting for {name}:\n{pipeline.output()[-3000:]}")

    def first_trial_finished(self):
        parent = self.parent()
        kids = self.children(parent.info.run_id) if parent else []
        return parent if any(k.info.status == "FINISHED" for k in kids) else None

    def a_trial_mid_training(self, epochs: int = EPOCHS):
        parent = self.parent()
        for kid in self.children(parent.info.run_id) if parent else []:
            if kid.info.status == "RUNNING" and 1 <= len(self.epochs_logged(kid.info.run_id)) \
                    <= epochs - 3:  # leaves a few seconds to inject the fault mid-trial
                return kid
        return None

    def assert_nothing_running(self, parent_id: str) -> None:
        runs = [self.client().get_run(parent_id), *self.children(parent_id)]
        assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []

    @staticmethod
    def assert_readable_console(output: str, max_lines: int = 60) -> None:
        """What a person reads of a run that went well: our lines only (Ray's and Tune's go to
        ray.log), nothing at error level, no stack trace, no more than a screen or two."""
        lines = output.splitlines()
        assert len(lines) <= max_lines, output
        noisy = [line for line in lines if ERROR_LEVEL.search(line) or " INFO " in line
                 or "Downloading artifacts" in line]
        assert noisy == [], output
        log = next(line.split(": ", 1)[1].split(" (")[0] for line in lines
                   if "Ray's and Tune's own output:" in line)
        assert Path(log).is_file() and Path(log).stat().st_size > 0, log

    def assert_complete(self, parent_id: str) -> None:
        """The finished record of the original config: every trial once, every epoch once,
        one registered version of this run."""
        parent = self.client().get_run(parent_id)
        assert parent.info.status == "FINISHED"
        kids = self.children(parent_id)
        assert len(kids) == TRIALS
        assert sorted(k.data.params["train.optimizer"] for k in kids) == ["adam", "sgd_momentum"]
        for kid in kids:
            assert kid.info.status == "FINISHED", kid.info.run_name
            assert self.epochs_logged(kid.info.run_id) == list(range(1, EPOCHS + 1))
        versions = self.versions()
        assert [v.run_id for v in versions] == [parent_id]
        assert self.client().get_model_version_by_alias(MODEL, "champion").run_id == parent_id


def _workspace(root: Path, num_workers: int | str):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "VISIONTUNE_DEBUG"):
        env.pop(key, None)
    ws = Workspace(root, env, num_workers)
    try:
        yield ws
    finally:
        for p in ws.started:
            kill_session(p.pid)


@pytest.fixture
def workspace(tmp_path):
    """Trials of 2 DDP workers each (a Ray Train worker group per trial)."""
    yield from _workspace(tmp_path, 2)


@pytest.fixture
def workspace_in_trial(tmp_path):
    """The planner's choice on this machine: each trial trains in its Tune trial's process,
    two side by side."""
    yield from _workspace(tmp_path, "auto")


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` that a test can kill and start again on the same port and
    store (its own process group: its web workers go down with it)."""
    port = free_port()
    db, artifacts = tmp_path / "server.db", tmp_path / "server-artifacts"

    class Server:
        uri = f"http://127.0.0.1:{port}"
        proc: subprocess.Popen | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                 "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
                 str(artifacts), "--serve-artifacts", "--workers", "1"],
                env={**os.environ, **MLFLOW_SERVER_ENV}, start_new_session=True,
                stdout=open(tmp_path / "mlflow-server.log", "a"),
                stderr=subprocess.STDOUT)
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                        return
                except (OSError, urllib.error.URLError):
                    time.sleep(0.5)
            raise TimeoutError("mlflow server did not start")

        def kill(self) -> None:
            if self.proc is not None:
                kill_session(self.proc.pid)
                self.proc.wait(timeout=30)
                self.proc = None

    server = Server()
    server.start()
    try:
        yield server
    finally:
        server.kill()
