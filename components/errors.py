"""The errors a user can fix, shared by every module, and the CLI's one-line form of any
error. No other imports: any module may import this one.

`UserError` is a mistake a user can fix or a state of the world they can change (a server
down, a cluster too small): the CLI prints its first line, `visiontune: error: ...`, without
a traceback, and exits with its `exit_code`. The kinds below are the ones several modules
raise; a module's own errors subclass one of them (RegistryError, TrackingError, ...), and
docs/faults.md's "Exit codes and errors" lists them all. Anything else that reaches the CLI
is a bug: one line with its type, exit 1, the traceback with --debug."""

from __future__ import annotations

EXIT_ERROR, EXIT_USAGE = 1, 2


class UserError(Exception):
    """A mistake a user can fix, or a state of the world they can change (exit 1)."""

    exit_code = EXIT_ERROR
    label = "error"    # the CLI prints `visiontune: <label>: <first line>`


class ConfigError(UserError, ValueError):
    """A config or usage mistake: a bad key or value in the configuration, an override, an
    option or an environment setting of visiontune's, or options that cannot be combined
    (exit 2, nothing was started)."""

    exit_code = EXIT_USAGE
    label = "config error"


class DataError(UserError, ValueError):
    """The data cannot be used: a malformed manifest, too few classes or images."""


class NotFoundError(UserError, LookupError):
    """A named thing that is not there: a registered model, version or alias, a Ray job, a
    promotion waiting for approval."""


class MissingPathError(UserError, FileNotFoundError):
    """A file, folder or object-storage prefix that does not exist (or cannot be read)."""


class UnreachableError(UserError, ConnectionError):
    """A server that does not answer or refuses: a Ray cluster or its dashboard."""


def first_line(exc: BaseException, limit: int | None = 300) -> str:
    """An exception as one line: its first non-blank line (cut at `limit` characters: a server
    may answer with a whole page), or its type when it has no message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if limit is None else text[:limit]
