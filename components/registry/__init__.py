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
    RegistryError,
    get_alias_version,
    get_version,
    is_not_found,
    model_version_aliases,
    register_challenger,
    version_description,
    version_of_run,
)

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS", "Candidate", "Decision", "RegisteredVersion",
           "RegistryError", "decide", "get_alias_version", "get_version", "is_not_found",
           "model_version_aliases", "promote", "register_challenger", "rollback",
           "version_description", "version_of_run"]
