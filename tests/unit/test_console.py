"""The console a person reads: the pipeline's lines on the terminal, Ray's and Tune's output
(Python and C++ alike) in a log file, and one line per trial start and end."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from tests.conftest import log_lines

SCRIPT = r"""
import os, sys
from pathlib import Path
from pipelines.console import console
console.echo("before")
with console.ray_output_to(Path(sys.argv[1])):
    print("a Tune table")                                   # Python, through sys.stdout
    print("a Python warning", file=sys.stderr)
    os.write(2, b"core_worker.cc:2465: an error-level line from C++\n")  # straight to fd 2
    console.echo("ours, during")
print("after")
"""


def test_ray_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path):
    log = tmp_path / "run" / "ray.log"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True,
                       text=True, check=True)
    assert p.stdout.splitlines() == ["before", "ours, during", "after"]
    assert p.stderr == ""
    assert log.read_text().splitlines() == [
        "a Tune table", "a Python warning", "core_worker.cc:2465: an error-level line from C++"]


LOGGED = r"""
import logging, sys
from pathlib import Path
from pipelines.console import console, log_to_console
log_to_console(); log_to_console()                           # once is one handler
logging.getLogger("components.tracking.server").warning("[visiontune] logged, before")
with console.ray_output_to(Path(sys.argv[1])):
    print("a Tune table")
    logging.getLogger("components.tuning.cluster_watch").info("[visiontune] logged, during")
    logging.getLogger("components.x").debug("a debug line: shown nowhere")
    logging.getLogger("elsewhere").warning("another library's warning")  # not ours: stderr
logging.getLogger("pipelines.steps").info("  logged by a step")
"""


def test_what_components_log_is_printed_as_the_console_prints_its_lines(tmp_path):
    """The components log their console lines; the console's one handler prints each as it
    is, on the terminal also while Ray's output goes to the log."""
    log = tmp_path / "ray.log"
    p = subprocess.run([sys.executable, "-c", LOGGED, str(log)], capture_output=True,
                       text=True, check=True)
    assert p.stdout.splitlines() == ["[visiontune] logged, before",
                                     "[visiontune] logged, during", "  logged by a step"]
    assert p.stderr == ""
    assert log.read_text().splitlines() == ["a Tune table", "another library's warning"]


def test_verbose_shows_everything_on_the_terminal(tmp_path):
    script = SCRIPT.replace("console.echo(\"before\")", "console.verbose = True")
    log = tmp_path / "ray.log"
    p = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True,
                       text=True, check=True)
    assert "a Tune table" in p.stdout and "error-level line" in p.stderr
    assert not log.exists()


def test_one_line_per_trial_start_and_end_with_the_best_so_far():
    from components.tuning.callbacks import ConsoleProgress
    from components.tuning.gate import TrialShape
    from components.tuning.space import parse_space

    status = []              # the live line: terminal-only, not logged
    axes = parse_space({"train.optimizer": {"grid": ["adam", "sgd"]},
                        "train.lr": {"loguniform": [1e-4, 1e-2]}})
    sections = {}
    p = ConsoleProgress(status.append, axes, sections, TrialShape(axes, sections, 3),
                        num_trials=2)

    def trial(tid, config, **result):
        return SimpleNamespace(trial_id=tid, config=config, last_result=result)

    with log_lines("components.tuning.callbacks") as lines:
        a = trial("t_a", {"train.optimizer": "adam", "train.lr": 0.00123456})
        p.on_trial_start(0, [], a)
        a.last_result = {"epoch": 3, "best_val_f1": 0.91, "best_epoch": 2, "val_f1": 0.9}
        p.on_trial_result(0, [], a, a.last_result)
        p.on_trial_complete(0, [], a)
        b = trial("t_b", {"train.optimizer": "sgd", "train.lr": 0.01})
        p.on_trial_start(0, [], b)
        b.last_result = {"epoch": 1, "best_val_f1": 0.5, "best_epoch": 1}
        p.on_trial_error(0, [], b)
    assert status == ["  trial 1/2 t_a epoch 3/3: val_f1 0.9000 (best 0.9100)"]
    assert lines[0] == "  trial 1/2 t_a started: optimizer=adam lr=0.00123"
    assert lines[1].startswith("  trial 1/2 t_a FINISHED: best val_f1 0.9100 at epoch 2, "
                               "3 epochs, ")
    assert lines[1].endswith("| best so far 0.9100 (t_a)")
    assert lines[2] == "  trial 2/2 t_b started: optimizer=sgd lr=0.01"
    assert "t_b FAILED: best val_f1 0.5000" in lines[3] and "best so far 0.9100 (t_a)" in lines[3]


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_every_few_seconds_with_the_rate_after_start_up(monkeypatch):
    """One progress class for the data steps (lines logged, a cumulative callback)
    and predict (increments, unreadable images): the rate counts from the first update, a
    line at most every `every_s` seconds, and the last one when any was printed."""
    import logging

    import pipelines.console as pc

    clock = _Clock()
    monkeypatch.setattr(pc.time, "monotonic", clock)
    step = logging.getLogger("pipelines.steps.data")
    with log_lines("pipelines.steps.data") as lines:
        progress = pc.Progress("  decoded", log=step, every_s=5)
        clock.now += 10          # start-up before the first image: not in the rate
        progress(10, 1000)       # the callback form: done so far, total
        assert lines == ["  decoded 10/1,000 images (1%)"]
        clock.now += 2
        progress(210, 1000)
        assert len(lines) == 1   # 2 s after the last line
        clock.now += 4
        progress(610, 1000)
        assert lines[-1] == "  decoded 610/1,000 images (61%), 100 images/s, 4 s left"
        clock.now += 1
        progress(1000, 1000)     # the last one, though only 1 s later
        assert lines[-1].startswith("  decoded 1,000/1,000 images (100%)") and len(lines) == 3
        assert progress.finish().startswith("1,000 images in 17.0 s (59 images/s; 141 images/s "
                                            "after 10 s of start-up")

    with log_lines("pipelines.steps.data") as quiet:
        short = pc.Progress("  checked", log=step, every_s=5)
        short(3, 3)              # done before the first interval: nothing printed
    assert quiet == []

    written = []             # a log file, not a terminal: whole lines
    predict = pc.Progress("predict:", 100, stream=SimpleNamespace(
        isatty=lambda: False, write=written.append, flush=lambda: None))
    clock.now += 6
    predict.update(40, 2)
    assert "".join(written) == "predict: 42/100 images (42%), 2 unreadable\n"


def test_mlflows_evaluate_leaves_the_root_logger_as_it_was(monkeypatch):
    """mlflow.pytorch's autolog module, imported by `mlflow.models.evaluate` in the register
    step, calls `logging.basicConfig`: a root handler would print every console line after it
    a second time (they propagate), on stderr. The root logger is put back."""
    import logging

    import mlflow
    import pandas as pd

    from components.tracking.evaluation import log_mlflow_evaluation

    root = logging.getLogger()

    def evaluate(**kwargs):   # what basicConfig does to a root logger without handlers
        root.addHandler(logging.StreamHandler())
        root.setLevel(logging.ERROR)
        return SimpleNamespace(metrics={"mlflow_test_f1_score": 1.0})

    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)
    monkeypatch.setattr(mlflow, "start_run", lambda run_id: None)
    monkeypatch.setattr(mlflow.data, "from_pandas", lambda *a, **k: None)
    monkeypatch.setattr(mlflow.models, "evaluate", evaluate)
    before = (list(root.handlers), root.level)
    predictions = pd.DataFrame({"label": ["cat", "dog"], "prediction": ["cat", "cat"]})
    assert log_mlflow_evaluation("sqlite://", "run", predictions, ["cat", "dog"], None,
                                 "pets") == {"mlflow_test_f1_score": 1.0}
    assert (list(root.handlers), root.level) == before
