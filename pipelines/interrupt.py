"""Ctrl-C and SIGTERM for a pipeline run: stop the sweep gracefully, record the run as KILLED.

Ray Tune installs its own SIGINT handler and, on Ctrl-C, stops its loop and *returns normally*
from `tuner.fit()`: a pipeline that does not look would evaluate and register half a sweep.
Here the pipeline owns both signals (Tune's SIGINT handler is turned off with
TUNE_DISABLE_SIGINT_HANDLER) and decides what a signal means where it lands:

- during the search: note it; the search loop asks Tune to stop (Tune's documented SIGUSR1
  stop, raised from inside Tune's own loop where its handler is installed), running trials
  keep their last epoch's checkpoint and the experiment state is saved for `--resume`;
- during a short step (ingest, evaluate, ...): stop there, with `Interrupted`;
- while a model is being registered (a few seconds): finish that first, so a registry never
  holds a version of a run that is not FINISHED;
- a second signal: stop at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """A signal stopped the pipeline. BaseException, like KeyboardInterrupt: a broad
    `except Exception` on the way up must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


def interrupted(e: BaseException) -> Interrupted | None:
    """The `Interrupted` that `e` is, or that C code wrapped: a second Ctrl-C whose handler
    raised while Ray's compiled code ran (`CoreWorker.wait`, in Tune's loop as it winds down)
    reaches Python as a SystemError ("returned a result with an exception set") caused by it.
    Seen in a CI-like run: such a run ended FAILED, exit 1, instead of KILLED, exit 130."""
    while e is not None and not isinstance(e, Interrupted):
        e = e.__cause__ if isinstance(e, SystemError) else None
    return e


class SignalGuard:
    """Installed for the whole run (main thread only); `mode` says what a first signal does."""

    def __init__(self):
        self.signum: int | None = None
        self._mode = "raise"  # raise | note (search) | defer (registration)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and self._mode != "defer":
            raise Interrupted(signum)  # the second signal: no more waiting
        if self.signum is None:
            self.signum = signum
            from pipelines.console import console

            # printed, not logged: logging's locks are not safe in a signal handler (its docs)
            console.echo(f"\n[visiontune] {signal.Signals(signum).name} received: stopping "
                         "(a second Ctrl-C stops at once)")
        if self._mode == "raise":
            raise Interrupted(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def _in_mode(self, mode: str) -> Iterator[None]:
        previous, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = previous

    def noting(self) -> contextlib.AbstractContextManager[None]:
        """A signal is only noted; the code inside polls `requested` and winds down."""
        return self._in_mode("note")

    def deferring(self) -> contextlib.AbstractContextManager[None]:
        """Signals wait until the block is done; the caller looks at `requested` after."""
        return self._in_mode("defer")
