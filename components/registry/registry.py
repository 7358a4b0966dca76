"""Register a model version as `challenger`; the first version of a model is also `champion`.

Every read that decides whether an alias moves tells "not found" (no such model, no such
alias) apart from a registry that failed: only the first may mean "no champion yet"; anything
else raises `RegistryError` before any alias is moved.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

from components.errors import NotFoundError, UserError
from components.tracking import Tracker, first_line

CHAMPION, CHALLENGER = "champion", "challenger"

# What MLflow 3.17 raises, the same from a SQLite store and over REST: a missing model (or
# model version) is RESOURCE_DOES_NOT_EXIST; a missing alias on an existing model is
# INVALID_PARAMETER_VALUE "Registered model alias <alias> not found." (REST prefixes the code
# to the message). INVALID_PARAMETER_VALUE alone also means a malformed name: not "not found".
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_EXISTS = "RESOURCE_ALREADY_EXISTS"
_ALIAS_NOT_FOUND = re.compile(r"Registered model alias \S+ not found")

# A store that cannot answer: MLflow wraps a refused connection in MlflowException
# (INTERNAL_ERROR), but requests' own errors can surface from other code paths.
_REGISTRY_FAILURES = (MlflowException, RequestException)


class RegistryError(UserError, RuntimeError):
    """The model registry failed (not "not found"): nothing that depended on the read moved."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: tuple[str, ...]


def is_not_found(exc: BaseException) -> bool:
    """True only for MLflow's "no such registered model / model version / alias"."""
    if not isinstance(exc, MlflowException):
        return False
    if exc.error_code == _NOT_FOUND:
        return True
    return exc.error_code == "INVALID_PARAMETER_VALUE" and bool(
        _ALIAS_NOT_FOUND.search(str(exc.message)))


def _registry_error(tracker: Tracker, reading: str, exc: BaseException) -> RegistryError:
    return RegistryError(f"the model registry at {tracker.uri} failed while reading {reading}: "
                         f"{first_line(exc)}; no alias was moved")


def get_alias_version(tracker: Tracker, name: str, alias: str):
    """The ModelVersion behind `name@alias`, or None when the model or the alias does not
    exist. Raises RegistryError for any other failure: a caller must not read it as "no
    champion" and move the alias without comparing."""
    try:
        return tracker.client.get_model_version_by_alias(name, alias)
    except _REGISTRY_FAILURES as exc:
        if is_not_found(exc):
            return None
        raise _registry_error(tracker, f"alias {alias} of model {name}", exc) from exc


def get_version(tracker: Tracker, name: str, version: str | int):
    """The ModelVersion `name` `version`; LookupError when it does not exist."""
    try:
        return tracker.client.get_model_version(name, version)
    except _REGISTRY_FAILURES as exc:
        if is_not_found(exc):
            raise NotFoundError(f"model {name!r} has no version {version}") from None
        raise _registry_error(tracker, f"version {version} of model {name}", exc) from exc


def _ensure_registered_model(tracker: Tracker, name: str) -> None:
    try:
        tracker.client.get_registered_model(name)
    except _REGISTRY_FAILURES as exc:
        if not is_not_found(exc):
            raise _registry_error(tracker, f"model {name}", exc) from exc
        try:
            tracker.client.create_registered_model(
                name, description="Image classifier trained and registered by visiontune")
        except MlflowException as exists:
            # Another pipeline registered the same new name a moment ago: use it.
            if exists.error_code != _EXISTS:
                raise


# ----------------------------------------------------------------------------- alias lock

LOCK_SUFFIX = ".alias-lock"
LOCK_OWNER_TAG = "visiontune.lock_owner"
LOCK_WAIT_S = 60.0     # a holder moves aliases in well under a second; wait for it this long
LOCK_STALE_S = 600.0   # a lock this old was left by a killed process: taken over


class AliasConflict(RegistryError):
    """The aliases changed while a command compared versions: nothing was moved."""


def _lock_owner(tracker: Tracker, lock: str) -> str | None:
    try:
        return tracker.client.get_registered_model(lock).tags.get(LOCK_OWNER_TAG, "?")
    except _REGISTRY_FAILURES as exc:
        if is_not_found(exc):
            return None
        raise _registry_error(tracker, f"model {lock}", exc) from exc


def _lock_age_s(tracker: Tracker, lock: str) -> tuple[float, str] | None:
    try:
        held = tracker.client.get_registered_model(lock)
    except _REGISTRY_FAILURES as exc:
        if is_not_found(exc):
            return None
        raise _registry_error(tracker, f"model {lock}", exc) from exc
    return time.time() - held.creation_timestamp / 1000, held.tags.get(LOCK_OWNER_TAG, "?")


@contextlib.contextmanager
def alias_lock(tracker: Tracker, name: str, wait_s: float | None = None,
               stale_s: float | None = None):
    """Only one promote, rollback or first registration moves `name`'s aliases at a time.

    MLflow has no compare-and-set for aliases; creating a registered model is atomic in every
    store (a unique name), so the lock is a registered model `<name>.alias-lock` that lives
    while the aliases move, and is deleted after. One left by a killed process is taken over
    after `stale_s` seconds."""
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    stale_s = LOCK_STALE_S if stale_s is None else stale_s
    lock = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            tracker.client.create_registered_model(
                lock, tags={LOCK_OWNER_TAG: owner},
                description=f"visiontune: held while the aliases of {name} move; deleted after")
            # Two takeovers of one stale lock can both create: only the last is the holder.
            if _lock_owner(tracker, lock) == owner:
                break
            continue
        except _REGISTRY_FAILURES as exc:
            if not (isinstance(exc, MlflowException) and exc.error_code == _EXISTS):
                raise _registry_error(tracker, f"the alias lock {lock}", exc) from exc
        held = _lock_age_s(tracker, lock)
        if held is None:
            continue
        age, holder = held
        if age > stale_s and _lock_owner(tracker, lock) == holder:   # still the same holder
            with contextlib.suppress(MlflowException):
                tracker.client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise AliasConflict(f"the aliases of model {name} are being moved by another "
                                f"command ({holder}, for {age:.0f} s): try again; if none is "
                                f"running, delete the registered model {lock!r}")
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(*_REGISTRY_FAILURES):
            if _lock_owner(tracker, lock) == owner:   # never another command's lock
                tracker.client.delete_registered_model(lock)


# ------------------------------------------------------------------ the champion's record

RECORD_TAG = "visiontune.champion_record"   # on the registered model: the last recorded move


def moved_by() -> str:
    """Who and where, for the record and the hook payload (never a credential)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def record_champion(tracker: Tracker, name: str, version: str, by: str, run_id: str) -> None:
    """Called under the alias lock, right after `champion` moved to `version`."""
    tracker.client.set_registered_model_tag(name, RECORD_TAG, json.dumps(
        {"version": str(version), "by": by, "run_id": run_id, "moved_by": moved_by(),
         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, sort_keys=True))


def model_version_aliases(tracker: Tracker, name: str, version: str) -> tuple[str, ...]:
    return tuple(get_version(tracker, name, version).aliases)


def version_of_run(tracker: Tracker, name: str, run_id: str, model_uri: str | None = None):
    """The version of `name` registered from `run_id` (of `model_uri`, when given: an
    extended run registers one per best trial), or None: a pipeline run registers each model
    once, also when it is resumed after being killed half-way through registering."""
    try:
        found = tracker.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except _REGISTRY_FAILURES as exc:
        if is_not_found(exc):
            return None
        raise _registry_error(tracker, f"the versions of model {name}", exc) from exc
    if model_uri is not None:
        found = [mv for mv in found
                 if model_uri in ((mv.tags or {}).get("model_uri"), mv.source)]
    if not found:
        return None
    # Search results carry no aliases: read the version itself.
    return get_version(tracker, name, min(int(mv.version) for mv in found))


def version_description(pipeline_id: str, num_images: int, split_counts: dict[str, int],
                        classes: list[str], fingerprint: str, test_metrics: dict[str, float],
                        average: str, val_f1: float, params: dict, cv: dict | None = None,
                        test_root: str | None = None,
                        test_interval: tuple[float, float] | None = None) -> str:
    """The model version's description (Markdown in the MLflow UI): what it was trained on,
    how good it is, and with which hyperparameters, readable without opening the run."""
    shown = ", ".join(str(c) for c in classes[:12]) + (", ..." if len(classes) > 12 else "")
    splits = ", ".join(f"{k} {v}" for k, v in split_counts.items())
    metrics = ", ".join(f"{k} {test_metrics[k]:.4f}" for k in ("accuracy", "precision",
                                                               "recall") if k in test_metrics)
    hyper = "\n".join(f"  - `{k}` = {v}" for k, v in params.items()) or "  - (none searched)"
    if cv:
        k, fold = int(cv.get("cv_folds", 0)), int(cv.get("cv_best_fold", 0))
        scores = (f"best val F1 {cv.get('cv_best_fold_val_f1', float('nan')):.4f} (fold "
                  f"{fold}'s); mean over {k} folds {val_f1:.4f} +- "
                  f"{cv.get('cv_val_f1_std', float('nan')):.4f}\n"
                  f"- **What is registered (k-fold CV)**: the configuration was chosen by its "
                  f"mean val F1 over {k} folds of train+val; the model is fold {fold}'s (the "
                  f"best of that configuration's folds), trained on {k - 1}/{k} of train+val. "
                  f"The test F1 above is this model's, on the test split no fold saw.")
    else:
        scores = (f"val F1 {val_f1:.4f} (the selection score: the best of the sweep's trials "
                  f"on the validation split, optimistic)")
    test_from = f" (the test split is {test_root})" if test_root else ""
    interval = (" [{:.4f}, {:.4f}] 95% interval over test images".format(*test_interval)
                if test_interval else "")
    return (f"Image classifier from visiontune pipeline `{pipeline_id}`.\n\n"
            f"- **Test F1: {test_metrics['f1']:.4f}**{interval} ({average} average); {metrics}; "
            f"{scores}\n"
            f"- Data: {num_images} images ({splits}){test_from}, {len(classes)} classes "
            f"({shown}); data fingerprint `{fingerprint}`\n"
            f"- Hyperparameters of the best trial:\n{hyper}\n")


def _describe(tracker: Tracker, mv, description: str | None) -> None:
    if description and (mv.description or "") != description:
        tracker.client.update_model_version(mv.name, mv.version, description=description)


def register_challenger(tracker: Tracker, model_uri: str, name: str, run_id: str,
                        tags: dict[str, str],
                        description: str | None = None) -> RegisteredVersion:
    """A new version of `name` from `run_id` as `challenger` (and `champion` when the model
    has none), with `tags` and `description`. A run that already registered a version gets
    that one back, aliases and description completed, instead of a second version."""
    client = tracker.client
    _ensure_registered_model(tracker, name)
    existing = version_of_run(tracker, name, run_id, model_uri)
    if existing is not None:
        _describe(tracker, existing, description)
        aliases = set(existing.aliases)
        if not aliases & {CHALLENGER, CHAMPION}:
            client.set_registered_model_alias(name, CHALLENGER, existing.version)
            aliases.add(CHALLENGER)
        if get_alias_version(tracker, name, CHAMPION) is None:
            with alias_lock(tracker, name):
                if get_alias_version(tracker, name, CHAMPION) is None:
                    client.set_registered_model_alias(name, CHAMPION, existing.version)
                    record_champion(tracker, name, str(existing.version),
                                    "first registration", run_id)
                    aliases.add(CHAMPION)
        return RegisteredVersion(name, str(existing.version), tuple(sorted(aliases)))
    # Read before creating the version or moving `challenger`: a registry that fails here
    # leaves neither a new version nor a moved alias behind.
    has_champion = get_alias_version(tracker, name, CHAMPION) is not None
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(name, model_uri, run_id=run_id,
                                     tags={k: str(v) for k, v in tags.items()}, model_id=model_id)
    _describe(tracker, mv, description)
    # Every alias write under the lock: SQL stores insert a new alias row without a
    # compare-and-set, and two first writes at once fail one (IntegrityError).
    with alias_lock(tracker, name):
        client.set_registered_model_alias(name, CHALLENGER, mv.version)
    if not has_champion:
        # Two pipelines registering a new model at once: only one becomes the champion
        # without a comparison; the other is the challenger, to be compared with it (also
        # when the champion's own registration moved `challenger` after this one did).
        with alias_lock(tracker, name):
            champion = get_alias_version(tracker, name, CHAMPION)
            if champion is None:
                client.set_registered_model_alias(name, CHAMPION, mv.version)
                record_champion(tracker, name, str(mv.version), "first registration", run_id)
            elif str(champion.version) != str(mv.version):
                challenger = get_alias_version(tracker, name, CHALLENGER)
                if challenger is None or str(challenger.version) == str(champion.version):
                    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    # Read back: with another registration racing, what this version holds now.
    return RegisteredVersion(name, str(mv.version),
                             tuple(sorted(model_version_aliases(tracker, name, mv.version))))
