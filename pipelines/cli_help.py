"""`visiontune run --help`'s table of config groups and keys, built only when it is shown."""

from __future__ import annotations

import dataclasses
import typing

from components.config import Config, ConfigError


def _config_help() -> str:
    from pipelines.compose import GROUPS, conf_dir, group_options

    lines = ["config groups (pick one with group=option):"]
    try:
        root = conf_dir()
        for g in GROUPS:
            lines.append(f"  {g:<10} {' | '.join(group_options(g, root))}")
        lines.append(f"  experiment files: {root / 'experiment'}/*.yaml (use --config)")
    except ConfigError as e:
        lines.append(f"  ({e})")
    # The dataclass defaults are the default run's values (tests/unit/test_defaults.py).
    lines.append("\nconfig keys and their defaults (override with key=value, e.g. "
                 "train.epochs=3):")
    for key, default, doc in field_docs():
        lines.append(f"  {key:<28} {default:<22} {doc}")
    return "\n".join(lines)


class LazyConfigHelp(str):
    """The key table needs torchvision's model list; build it only when --help prints it."""

    def __new__(cls):
        return super().__new__(cls, "")

    def __bool__(self):
        return True

    def __str__(self):
        return _config_help()

    def splitlines(self, *a, **k):
        return _config_help().splitlines(*a, **k)

    def __iter__(self):
        return iter(_config_help())


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf key: what `visiontune run --help` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += field_docs(tp, key + ".")
            continue
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        choices = f.metadata.get("choices")
        text = f.metadata.get("doc", "")
        if choices is not None and not callable(choices):
            text = (text + "; " if text else "") + "one of " + "|".join(map(str, choices))
        rows.append((key, "" if key == "search.space" else repr(default), text))
    return rows


def add_config_args(p) -> None:
    """The `key=value` overrides and `--config FILE` every config-reading command takes."""
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: group=option or section.key=value")
    p.add_argument("--config", metavar="FILE",
                   help="an experiment YAML (e.g. conf/experiment/quick.yaml)")
