"""The MLflow model registry: register a new version, aliases (stages are deprecated)."""

from components.registry.registry import (
    CHALLENGER,
    CHAMPION,
    RegisteredVersion,
    get_alias_version,
    register_challenger,
)

__all__ = ["CHALLENGER", "CHAMPION", "RegisteredVersion", "get_alias_version",
           "register_challenger"]
