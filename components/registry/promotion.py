"""The promotion gate: `champion` moves only when the challenger is shown to be better on the
same labelled images, and every decision leaves an MLflow run saying why.

`promote`:
  1. reads the challenger (a version, or the alias `challenger`) and the champion;
  2. chooses the images: the challenger's test split, read back from its pipeline run's
     manifest, or `data`, any labelled folder or CSV manifest (its test rows, if it has a
     split column); drops every image whose bytes or near-copy either version trained or was
     selected on (their manifests keep each image's sha256 and perceptual hash), refuses
     when fewer than `min_images` remain or after `max_comparisons` on the same images;
  3. loads both registered models (each with its own preprocessing) and classifies the
     images with both;
  4. decides from the per-image results (`components.evaluation.paired.decide`: a paired
     permutation test and bootstrap interval of the F1 difference, the rule, its floor);
  5. records the decision as a run (role `promotion`) in the model's experiment;
  6. moves the aliases under the alias lock, after reading the champion again: a champion
     that changed meanwhile was never compared with this challenger, so nothing moves.

Steps 1-4 live in `components.registry.comparison` (nothing there writes to MLflow), step 5
in `components.registry.record`; this module sequences them and owns the aliases. A registry
read that fails for any reason other than "not found" raises `RegistryError` before any alias
or tag is written.
"""

from __future__ import annotations

import time
from dataclasses import replace

from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

from components.evaluation.paired import DEFAULT_RESAMPLES
from components.registry.comparison import (
    Candidate,
    Echo,
    Evidence,
    PromotionError,
    PromotionResult,
    ScoredImages,
    candidate,
    compare,
    same_test_images,
)
from components.registry.record import (
    NOTE_TAG,
    comparisons_on,
    experiment_of,
    note,
    record_promotion,
    tag_versions,
)
from components.registry.registry import (
    CHALLENGER,
    CHAMPION,
    AliasConflict,
    RegistryError,
    alias_lock,
    get_alias_version,
    get_version,
)
from components.tracking import Tracker, first_line

PREVIOUS = "previous-champion"
__all__ = ["PREVIOUS", "Candidate", "Evidence", "PromotionError", "PromotionResult", "ScoredImages",
           "promote", "rollback", "same_test_images"]


# ----------------------------------------------------------------------------- promote

_FAILURES = (MlflowException, RequestException)


def promote(tracker: Tracker, name: str, version: str | None = None, *,
            data: str | None = None, confidence: float = 0.95, min_gain: float = 0.0,
            non_inferior: float | None = None, resamples: int = DEFAULT_RESAMPLES,
            seed: int | None = None, force: bool = False, dry_run: bool = False,
            echo: Echo = lambda line: None, experiment_name: str = "visiontune",
            batch_size: int = 64, evidence: Evidence = Evidence()) -> PromotionResult:
    """`seed`: of the resamples; None derives it from the two versions and the images (the
    same comparison gets the same answer), a set one is recorded as set."""
    mv = get_version(tracker, name, str(version)) if version is not None else \
        get_alias_version(tracker, name, CHALLENGER)
    if mv is None:
        raise LookupError(f"model {name!r} has no '{CHALLENGER}' alias; pass --version")
    current = get_alias_version(tracker, name, CHAMPION)
    try:
        challenger = candidate(tracker, mv)
        champion = candidate(tracker, current) if current is not None else None
        echo(f"promote: {name} v{challenger.version} (challenger) vs "
             + (f"v{champion.version} (champion)" if champion else "no champion"))
        # Both models are scored with one averaging: the challenger's (it was selected and
        # tested with it); a champion tested with another is named in the record.
        average = challenger.f1_average or (champion.f1_average if champion else None) or "auto"
        if champion and champion.f1_average and champion.f1_average != average:
            echo(f"  note: v{champion.version} was tested with {champion.f1_average} F1; both "
                 f"are scored here with {average} F1")
        decide_kw = dict(confidence=confidence, min_gain=min_gain, non_inferior=non_inferior,
                         resamples=resamples, seed=seed)
        experiment_id = experiment_of(tracker, challenger, experiment_name)
        evidence = replace(evidence, count_prior=lambda fingerprint: comparisons_on(
            tracker, experiment_id, name, fingerprint))
        result = compare(tracker, name, challenger, champion, data, force, echo, decide_kw,
                         average, batch_size, evidence)
        result.experiment_id = experiment_id
        settings = {**decide_kw, "min_f1_gain": min_gain, "non_inferior_margin": non_inferior,
                    "data": data or "", "min_images": evidence.min_images,
                    "max_comparisons": evidence.max_comparisons,
                    "near_copy_distance": evidence.near_copy_distance,
                    "max_class_drop": evidence.max_class_drop,
                    "champion_test_f1_average": champion.f1_average if champion else ""}
        result.run_id = record_promotion(tracker, result.experiment_id, name, result,
                                         dry_run=dry_run, force=force, settings=settings)
        if result.promote and not dry_run:
            try:
                _move_champion(tracker, name, result)
            except AliasConflict as conflict:
                tracker.set_tags(result.run_id, {"promotion.decision": "aborted",
                                                 "promotion.reason": str(conflict)[:5000]})
                raise
    except _FAILURES as e:
        raise RegistryError(f"the MLflow server at {tracker.uri} failed during promote: "
                            f"{first_line(e)}; the champion was not moved") from e
    if not dry_run and not (champion and champion.version == challenger.version):
        try:
            if result.applied:   # the record says so only once the champion has moved
                tracker.set_tags(result.run_id, {"promotion.decision": result.decision,
                                                 NOTE_TAG: note(name, result, dry_run)})
            tag_versions(tracker, name, result)
        except _FAILURES as e:
            raise RegistryError(f"the MLflow server at {tracker.uri} failed while tagging the "
                                f"versions after the decision ({result.decision}, aliases "
                                f"{'moved' if result.applied else 'unchanged'}): "
                                f"{first_line(e)}") from e
    return result


def _move_champion(tracker: Tracker, name: str, r: PromotionResult) -> None:
    """Under the alias lock, and only if the champion is still the version compared."""
    client = tracker.client
    with alias_lock(tracker, name):
        now = get_alias_version(tracker, name, CHAMPION)
        compared = r.champion.version if r.champion else None
        if (str(now.version) if now is not None else None) != compared:
            moved = f"v{now.version}" if now is not None else "none"
            raise AliasConflict(
                f"the champion of {name} changed from "
                f"{'v' + compared if compared else 'none'} to {moved} while this promote ran: "
                f"v{r.challenger.version} was never compared with it; nothing moved (run "
                f"promote again)")
        if r.champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, r.champion.version)
        client.set_registered_model_alias(name, CHAMPION, r.challenger.version)
    r.applied = True


def rollback(tracker: Tracker, name: str) -> tuple[str, str]:
    """Swap `champion` and `previous-champion`; returns (new champion, new previous)."""
    client = tracker.client
    with alias_lock(tracker, name):
        previous = get_alias_version(tracker, name, PREVIOUS)
        current = get_alias_version(tracker, name, CHAMPION)
        if previous is None:
            raise LookupError(f"model {name!r} has no '{PREVIOUS}' alias: nothing to roll "
                              f"back to")
        client.set_registered_model_alias(name, CHAMPION, previous.version)
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS, current.version)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, previous.version, "promotion.decision",
                                 "restored by rollback")
    client.set_model_version_tag(name, previous.version, "promotion.time", stamp)
    if current is not None:
        client.set_model_version_tag(name, current.version, "promotion.decision",
                                     "rolled back")
        client.set_model_version_tag(name, current.version, "promotion.time", stamp)
        return str(previous.version), str(current.version)
    return str(previous.version), ""
