"""Register a model version as `challenger`; the first version of a model is also `champion`."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from components.tracking import Tracker

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: tuple[str, ...]


def get_alias_version(tracker: Tracker, name: str, alias: str):
    """The ModelVersion behind `name@alias`, or None."""
    try:
        return tracker.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_challenger(tracker: Tracker, model_uri: str, name: str, run_id: str,
                        tags: dict[str, str]) -> RegisteredVersion:
    client = tracker.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="Image classifier trained and registered by visiontune")
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(name, model_uri, run_id=run_id,
                                     tags={k: str(v) for k, v in tags.items()}, model_id=model_id)
    aliases = [CHALLENGER]
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    if get_alias_version(tracker, name, CHAMPION) is None:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
        aliases.append(CHAMPION)
    return RegisteredVersion(name, str(mv.version), tuple(aliases))
