"""The MLflow model registry: register a new version, aliases (stages are deprecated), and the
promotion gate (a paired comparison on the same images, recorded as an MLflow run)."""

from components.evaluation.paired import PairedDecision, decide
from components.registry.champion import (
    ChampionPolicy,
    UnrecordedChampion,
    champion_problem,
    check_champion,
)
from components.registry.promotion import (
    PREVIOUS,
    Candidate,
    Evidence,
    PromotionError,
    PromotionResult,
    approve,
    promote,
    rollback,
    same_test_images,
)
from components.registry.registry import (
    CHALLENGER,
    CHAMPION,
    AliasConflict,
    RegisteredVersion,
    RegistryError,
    alias_lock,
    get_alias_version,
    get_version,
    is_not_found,
    model_version_aliases,
    register_challenger,
    version_description,
    version_of_run,
)

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS", "AliasConflict", "Candidate", "ChampionPolicy",
           "Evidence", "PairedDecision", "UnrecordedChampion", "approve", "champion_problem",
           "check_champion",
           "PromotionError", "PromotionResult", "RegisteredVersion", "RegistryError",
           "alias_lock", "decide", "get_alias_version", "get_version", "is_not_found",
           "model_version_aliases", "promote", "register_challenger", "rollback",
           "same_test_images", "version_description", "version_of_run"]
