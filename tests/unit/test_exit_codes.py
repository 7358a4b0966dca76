"""Every command of the CLI, made to fail the way a user would: the real `visiontune` script in
a subprocess exits with the documented code (docs/faults.md, "Exit codes and errors": 2 for a
config or usage mistake) and prints exactly one line on stderr, without a traceback, before
anything starts (no Ray, no server: a tracking URI is a SQLite file in tmp_path).

The commands come from the parser itself, so a command added without rows here fails. The
processes run side by side in threads: each spends its time importing, not computing."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.cli import build_parser

BIN = Path(sys.executable).parent / "visiontune"
COMMANDS = sorted(build_parser().commands)
CONFIG, ERROR = 2, 1     # the documented exit codes
# Settings of the calling shell that would change what a command does
_UNSET = ("RAY_ADDRESS", "VISIONTUNE_DEBUG", "VISIONTUNE_PREDICT_RAY_ABOVE",
          "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "VISIONTUNE_MAX_REQUEST_BYTES")


def mistakes(tmp: Path) -> dict[str, list[tuple[list[str], int, str]]]:
    """command -> [(its arguments, exit code, how the one line on stderr starts)]."""
    db = f"tracking.uri=sqlite:///{tmp}/mlflow.db"
    config = "visiontune: config error: "
    model = ["--model", "models:/m@champion"]
    return {
        "run": [(["train.epochs=0"], CONFIG, f"{config}train.epochs=0 must be > 0"),
                (["train.no_such_key=1"], CONFIG, f"{config}unknown key train.no_such_key"),
                (["--resume", "vt-a", "--extend", "vt-b"], CONFIG,
                 f"{config}--resume and --extend cannot be combined"),
                (["--resume", "vt-nope", db], CONFIG,
                 f"{config}--resume vt-nope: no pipeline run with that id")],
        "submit": [(["--address", "http://127.0.0.1:9", "train.epochs=0"], CONFIG,
                    f"{config}train.epochs=0 must be > 0"),
                   (["--address", "http://user:pw@127.0.0.1:9"], CONFIG,
                    f"{config}--address=http://***@127.0.0.1:9 carries credentials")],
        "jobs": [(["--address", "ray://127.0.0.1:10001"], CONFIG,
                  f"{config}--address ray://127.0.0.1:10001 is not the Ray dashboard's")],
        "status": [(["visiontune-x", "--address", "http://user:pw@127.0.0.1:9"], CONFIG,
                    f"{config}--address=http://***@127.0.0.1:9 carries credentials")],
        "promote": [(["--model", "m", "--confidence", "2"], CONFIG,
                     f"{config}--confidence=2.0 must be in [0.5, 1)"),
                    (["--model", "m", "--resamples", "10"], CONFIG,
                     f"{config}--resamples=10: at least 2,000")],
        "approve": [(["--model", "m", "--version", "1", "--by", "ann", "registry.nope=1", db],
                     CONFIG, f"{config}unknown key registry.nope")],
        "rollback": [(["--model", "m", "train.epochs=0", db], CONFIG,
                      f"{config}train.epochs=0 must be > 0")],
        "predict": [([*model, "--workers", "0", "x.png"], CONFIG,
                     f"{config}--workers must be at least 1, got 0"),
                    ([*model, "--batch-size", "0", "x.png"], CONFIG,
                     f"{config}--batch-size must be at least 1, got 0"),
                    ([*model, "-o", str(tmp), "x.png"], CONFIG,
                     f"{config}--output {tmp} is a folder"),
                    # a path that is not there is a missing file (exit 1), not a usage mistake
                    ([*model, str(tmp / "nope"), db], ERROR,
                     f"visiontune: error: {tmp / 'nope'} does not exist")],
        "serve": [(["--model", "m", "--port", "0"], CONFIG,
                   f"{config}--port must be at least 1, got 0"),
                  (["--model", "m", "--poll", "0"], CONFIG,
                   f"{config}--poll must be at least 0.5, got 0.0")],
    }


# Every error a user can fix, by module (imported here, not by the CLI), and its exit code
HIERARCHY = {
    ("components.errors", "ConfigError"): CONFIG,
    ("components.registry.hooks", "HookError"): CONFIG,
    ("components.errors", "DataError"): ERROR,
    ("components.data.ingest", "DataError"): ERROR,
    ("components.errors", "NotFoundError"): ERROR,
    ("components.errors", "MissingPathError"): ERROR,
    ("components.models.transfer", "WeightsNotFoundError"): ERROR,
    ("components.errors", "UnreachableError"): ERROR,
    ("components.storage", "StorageError"): ERROR,
    ("components.tracking", "TrackingError"): ERROR,
    ("components.tracking", "JournalError"): ERROR,
    ("components.registry", "RegistryError"): ERROR,
    ("components.registry", "AliasConflict"): ERROR,
    ("components.registry", "UnrecordedChampion"): ERROR,
    ("components.registry", "PromotionError"): ERROR,
    ("components.tuning.plan", "ResourceError"): ERROR,
    ("components.evaluation.scoring", "NoUsableTrialError"): ERROR,
    ("pipelines.training", "PipelineFailed"): ERROR,
    ("components.tuning.sweep_state", "SweepStateTorn"): ERROR,
    ("pipelines.steps.tune", "TrialsLost"): ERROR,
}


def test_every_error_a_user_can_fix_is_a_user_error_with_its_exit_code():
    import importlib

    from components.errors import UserError

    for (module, name), code in HIERARCHY.items():
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, UserError) and cls.exit_code == code, (module, name)
    # what code catching the built-in kinds expects still holds
    from components.errors import MissingPathError, NotFoundError, UnreachableError

    assert issubclass(NotFoundError, LookupError) and issubclass(UnreachableError, OSError)
    assert issubclass(MissingPathError, FileNotFoundError)


def _argparse_mistakes() -> list[tuple[list[str], str]]:
    """argparse's own refusals, one line each (pipelines/cli.py, `Parser`): (argv, line)."""
    out = [([], "visiontune: error: the following arguments are required: command "
                "(see visiontune --help)"),
           (["no-such-command"], "visiontune: error: argument command: invalid choice: "
                                 "'no-such-command'")]
    for command in COMMANDS:   # a required argument missing, or the unknown option
        out.append(([command, "--no-such-option"], f"visiontune {command}: error: "))
    out.append((["serve", "--model", "m", "--port", "x"],
                "visiontune serve: error: argument --port/-p: invalid int value: 'x' "
                "(see visiontune serve --help)"))
    return out


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd}/default.db"   # never the project's store
    return subprocess.run([str(BIN), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """Every case of the module, run at once: {tuple(argv): CompletedProcess}."""
    tmp = tmp_path_factory.mktemp("exit_codes")
    cases = [[c, *a] for c, rows in mistakes(tmp).items() for a, _, _ in rows]
    cases += [a for a, _ in _argparse_mistakes()]
    cases.append(["--debug", "predict", "--model", "m", "--workers", "0", "x.png"])
    with ThreadPoolExecutor(max_workers=8) as pool:
        done = pool.map(lambda argv: _run(argv, tmp), cases)
        return {"tmp": tmp, **{tuple(a): p for a, p in zip(cases, done)}}


def _one_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stdout == "", p.stdout[-3000:]
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_usage_mistake_in_one_line(command, answers):
    rows = mistakes(answers["tmp"])
    assert command in rows, f"`visiontune {command}` has no row: add its usage mistakes here"
    assert any(code == CONFIG for _, code, _ in rows[command])
    for argv, code, start in rows[command]:
        p = answers[(command, *argv)]
        line = _one_line(p)
        assert (p.returncode, line[:len(start)]) == (code, start), (argv, p.stderr)


def test_every_row_names_a_command_of_the_parser(tmp_path):
    assert sorted(mistakes(tmp_path)) == COMMANDS


@pytest.mark.parametrize("argv, start", [pytest.param(a, s, id=" ".join(a) or "(nothing)")
                                         for a, s in _argparse_mistakes()])
def test_argparse_mistakes_are_one_line_too(argv, start, answers):
    p = answers[tuple(argv)]
    line = _one_line(p)
    assert p.returncode == CONFIG and line.startswith(start), p.stderr
    prog = f"visiontune {argv[0]}" if argv and argv[0] in COMMANDS else "visiontune"
    assert line.endswith(f"(see {prog} --help)"), line


def test_debug_adds_the_traceback_and_keeps_the_line_and_the_code(answers):
    p = answers[("--debug", "predict", "--model", "m", "--workers", "0", "x.png")]
    assert p.returncode == CONFIG and "Traceback" in p.stderr
    assert p.stderr.splitlines()[-1] == \
        "visiontune: config error: --workers must be at least 1, got 0"
