"""The MLflow model registry: register a new version, aliases (stages are deprecated)."""

from components.registry.promotion import (  # noqa: E402
    PREVIOUS,
    Candidate,
    Decision,
    decide,
    promote,
    rollback,
)
from components.registry.registry import (
    CHALLENGER,
    CHAMPION,
    RegisteredVersion,
    get_alias_version,
    register_challenger,
)

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS", "Candidate", "Decision", "RegisteredVersion",
           "decide", "get_alias_version", "promote", "register_challenger", "rollback"]
