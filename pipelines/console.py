"""What a person sees. The pipeline's own lines go to the terminal; while Ray runs, everything
Ray and Tune print (their tables, worker output, the C++ core's log lines) goes to a log file
in the run's folder instead, shown on the terminal only with `--verbose`.

The redirection is done on file descriptors 1 and 2, so it catches output from C++ and from
Ray's log monitor thread as well as Python's; the pipeline keeps a copy of the terminal.

Components and the pipeline's steps do not print: they log (`logging.getLogger(__name__)`,
INFO for the lines a person follows, WARNING for the ones that say something went wrong) the
lines exactly as the console shows them, and `log_to_console` gives the `components` and
`pipelines` loggers one handler that writes each line through `console.echo`. The CLI
(`pipelines.cli.main`) installs it; code that runs the pipeline without the CLI (a benchmark)
calls `log_to_console()` itself to see the lines."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# MLflow's INFO lines (creating a store's tables, validating the input example), its download
# progress bars and the "View run ... at" lines it writes to stdout for every run ended on a
# server are not the command's story (it prints its own links); --verbose keeps them. Set
# before MLflow is imported: it reads the level then; Ray workers inherit them.
QUIET_MLFLOW_ENV = {"MLFLOW_LOGGING_LEVEL": "WARNING",
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def quiet_mlflow() -> None:
    for key, value in QUIET_MLFLOW_ENV.items():
        os.environ.setdefault(key, value)


class Console:
    def __init__(self) -> None:
        self.verbose = False
        self._terminal = None        # the real stdout while Ray's output is redirected
        self._terminal_err = None    # the real stderr, likewise
        self._status = False         # a live status line is on screen (terminals only)

    def _out(self):
        return self._terminal or sys.stdout

    def stdout(self):
        """The terminal's stdout, also while Ray's output goes to a log (data written here)."""
        return self._out()

    def stderr(self):
        """The terminal's stderr, also while Ray's output goes to a log (progress, warnings)."""
        return self._terminal_err or sys.stderr

    def echo(self, text: str) -> None:
        out = self._out()
        if self._status:
            out.write("\r\033[K")
            self._status = False
        print(text, file=out, flush=True)

    def status(self, text: str) -> None:
        """A line that the next line replaces, on a terminal; nothing in a log or a pipe."""
        out = self._out()
        if not (hasattr(out, "isatty") and out.isatty()):
            return
        width = os.get_terminal_size(out.fileno()).columns if hasattr(out, "fileno") else 100
        out.write("\r\033[K" + text[: max(width - 1, 20)])
        out.flush()
        self._status = True

    @contextlib.contextmanager
    def ray_output_to(self, path: Path | None) -> Iterator[None]:
        """Send fds 1 and 2 to `path` for the block (unless verbose)."""
        if self.verbose or path is None or self._terminal is not None:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved_out, saved_err = os.dup(1), os.dup(2)
        log = open(path, "ab", buffering=0)
        self._terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
        self._terminal_err = os.fdopen(os.dup(saved_err), "w", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            log.close()
            terminal, self._terminal = self._terminal, None
            if self._status:
                terminal.write("\n")
                self._status = False
            terminal.close()
            self._terminal_err.close()
            self._terminal_err = None


console = Console()

# The loggers whose lines are the command's story (a module's logger is named after it)
CONSOLE_LOGGERS = ("components", "pipelines")


class ConsoleHandler(logging.Handler):
    """A log record as the console line it is (its message, nothing added), through
    `console.echo`: on the terminal also while Ray's output goes to its log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.echo(self.format(record))
        except Exception:   # logging's rule: a line that cannot be written is not an error
            self.handleError(record)


def log_to_console() -> None:
    """Give the components' and pipelines' loggers the console's one handler (once), at
    INFO. They still propagate: a test's capture, or a handler the root logger has, sees the
    lines too."""
    for name in CONSOLE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
            logger.addHandler(ConsoleHandler())
        logger.setLevel(logging.INFO)


class Progress:
    """The one progress line of long work: `predict: 1,536/3,000 images (51%), 412 images/s,
    2 unreadable, 4 s left`. On a terminal stream it is a live line; given `log` (the
    pipeline's steps: their module's logger, INFO) or a stream that is not a terminal (logs,
    CI), a line every `every_s` seconds and, when any was printed, the last one. The rate is
    measured from the first update on: what comes before it (starting Ray, loading a model)
    is start-up, not work."""

    def __init__(self, label: str, total: int = 0, unit: str = "images", *,
                 log: logging.Logger | None = None, stream=None, every_s: float = 5.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.log = log
        self.stream = None if log is not None else stream or sys.stderr
        self.tty = self.stream is not None and hasattr(self.stream, "isatty") \
            and self.stream.isatty()
        self.start = self._last = time.monotonic()
        self.first: float | None = None   # when the first update came
        self._first_count = 0             # items in it (they are not in the rate)
        self.done = self.failed = 0
        self.printed = False

    def rate(self) -> float | None:
        """Items per second since the first update (None until a second one came)."""
        if self.first is None or self.done + self.failed <= self._first_count:
            return None
        return (self.done + self.failed - self._first_count) / max(time.monotonic() -
                                                                   self.first, 1e-9)

    def line(self) -> str:
        seen = self.done + self.failed
        pct = 100.0 * seen / self.total if self.total else 100.0
        text = f"{self.label} {seen:,}/{self.total:,} {self.unit} ({pct:.0f}%)"
        rate = self.rate()
        if rate:
            text += f", {rate:,.0f} {self.unit}/s"
        if self.failed:
            text += f", {self.failed:,} unreadable"
        if rate and seen < self.total:
            text += f", {math.ceil((self.total - seen) / rate)} s left"
        return text

    def update(self, done: int, failed: int = 0) -> None:
        """`done` more items, `failed` more that could not be read."""
        now = time.monotonic()
        if self.first is None:
            self.first, self._first_count = now, done + failed
        self.done += done
        self.failed += failed
        if self.tty and now - self._last >= 0.2:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
            self._last = now
        elif not self.tty and (now - self._last >= self.every_s or (
                self.printed and self.done + self.failed >= self.total)):
            self._print(self.line())
            self._last = now

    def __call__(self, done: int, total: int) -> None:
        """The `progress(done so far, total)` callback the data components take."""
        self.total = total
        self.update(done - self.done - self.failed)

    def _print(self, text: str) -> None:
        self.printed = True
        if self.log is not None:
            self.log.info(text)
        else:
            print(text, file=self.stream, flush=True)

    def finish(self) -> str:
        """Clears a live line; returns the summary: all items over the whole time, and the
        rate once they were coming."""
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        seconds = time.monotonic() - self.start
        seen, unit = self.done + self.failed, self.unit
        text = f"{seen:,} {unit} in {seconds:.1f} s ({seen / max(seconds, 1e-9):,.0f} {unit}/s"
        rate = self.rate()
        if rate and self.first - self.start >= 1.0:
            text += f"; {rate:,.0f} {unit}/s after {self.first - self.start:.0f} s of start-up"
        return text + ")"
