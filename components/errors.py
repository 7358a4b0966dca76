"""The errors a user can fix, shared by every module (and the CLI's one-line form of any
error). No other imports: any module may import this one."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad key or value in the configuration (the CLI exits with code 2)."""


def first_line(exc: BaseException, limit: int | None = 300) -> str:
    """An exception as one line: its first non-blank line (cut at `limit` characters: a server
    may answer with a whole page), or its type when it has no message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if limit is None else text[:limit]
