"""Wall times as people write and read them: `search.budget=4m`, "2 min 30 s"."""

from __future__ import annotations

import re

from components.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(value: str | float | int) -> float:
    """`90`, `90s`, `4m`, `1.5h`, `2h30m` -> seconds (`search.budget`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)([smh]?)", text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ConfigError(f"search.budget={value!r} is not a duration: write 90s, 4m or 2h")
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"search.budget={value!r} must be > 0")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 120:
        return f"{minutes} min {s} s" if s else f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"
