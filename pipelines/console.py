"""What a person sees. The pipeline's own lines go to the terminal; while Ray runs, everything
Ray and Tune print (their tables, worker output, the C++ core's log lines) goes to a log file
in the run's folder instead, shown on the terminal only with `--verbose`.

The redirection is done on file descriptors 1 and 2, so it catches output from C++ and from
Ray's log monitor thread as well as Python's; the pipeline keeps a copy of the terminal."""

from __future__ import annotations

import contextlib
import os
import sys
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
