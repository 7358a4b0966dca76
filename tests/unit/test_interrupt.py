"""What a command a signal stopped says and returns, also when the signal's `Interrupted` was
wrapped by compiled code (CPython's SystemError "returned a result with an exception set",
whose cause is the exception the code left set; a real one: test_signal_in_ray.py)."""

from __future__ import annotations

import signal

import pytest

from pipelines import cli
from pipelines.interrupt import Interrupted, interrupted


def _wrapped(inner: BaseException) -> SystemError:
    try:
        try:
            raise inner
        except BaseException as e:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an "
                              "exception set") from e
    except SystemError as outer:
        return outer


def test_the_interrupt_is_found_inside_what_compiled_code_wrapped():
    inner = Interrupted(signal.SIGINT)
    assert interrupted(inner) is inner
    assert interrupted(_wrapped(inner)) is inner
    assert interrupted(_wrapped(_wrapped(inner))) is inner


@pytest.mark.parametrize("error", [ValueError("x"), SystemError("no cause"),
                                   _wrapped(ValueError("x")), KeyboardInterrupt()])
def test_anything_else_is_not_an_interrupt(error):
    assert interrupted(error) is None


def test_a_wrapped_interrupt_ends_the_command_as_the_interrupt_does(monkeypatch, capsys):
    inner = Interrupted(signal.SIGINT)
    inner.pipeline_id = "vt-x"

    def stopped(args):
        raise _wrapped(inner)

    monkeypatch.setitem(cli.COMMANDS, "run", stopped)
    assert cli.main(["run"]) == 130
    err = capsys.readouterr().err
    assert err == ("visiontune: interrupted by SIGINT: run vt-x is recorded as KILLED, nothing "
                   "was registered; continue it with: visiontune run --resume vt-x\n")
