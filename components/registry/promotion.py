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
in `components.registry.promotion_record`; this module sequences them and owns the aliases. A
registry read that fails for any reason other than "not found" raises `RegistryError` before
any alias or tag is written.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace

from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

from components.errors import NotFoundError
from components.evaluation.paired import DEFAULT_RESAMPLES
from components.registry.champion import (
    ChampionPolicy,
    announce,
    check_champion,
    hook_urls,
    recorded_champion,
)
from components.registry.comparison import (
    Candidate,
    Evidence,
    PromotionError,
    PromotionResult,
    ScoredImages,
    candidate,
    compare,
    same_test_images,
)
from components.registry.promotion_record import (
    MODEL_NAME_TAG,
    NOTE_TAG,
    ROLE,
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
    moved_by,
    record_champion,
)
from components.tracking import ROLE_TAG, Tracker, first_line

PREVIOUS = "previous-champion"
APPROVER_TAG = "promotion.approver"   # on a promotion run that waits: who may approve it
__all__ = ["PREVIOUS", "Candidate", "Evidence", "PromotionError", "PromotionResult", "ScoredImages",
           "approve", "promote", "rollback", "same_test_images"]


# ----------------------------------------------------------------------------- promote

_FAILURES = (MlflowException, RequestException)
log = logging.getLogger(__name__)


def promote(tracker: Tracker, name: str, version: str | None = None, *,
            data: str | None = None, confidence: float = 0.95, min_gain: float = 0.0,
            non_inferior: float | None = None, resamples: int = DEFAULT_RESAMPLES,
            seed: int | None = None, force: bool = False, dry_run: bool = False,
            experiment_name: str = "visiontune", batch_size: int = 64,
            evidence: Evidence = Evidence(),
            policy: ChampionPolicy = ChampionPolicy()) -> PromotionResult:
    """`seed`: of the resamples; None derives it from the two versions and the images (the
    same comparison gets the same answer), a set one is recorded as set. `policy`: the hooks
    told of a move, whether an unrecorded champion is refused, who must approve the move."""
    mv = get_version(tracker, name, str(version)) if version is not None else \
        get_alias_version(tracker, name, CHALLENGER)
    if mv is None:
        raise NotFoundError(f"model {name!r} has no '{CHALLENGER}' alias; pass --version")
    urls = hook_urls(tracker, name, policy)   # a hook that cannot be signed: before comparing
    current = get_alias_version(tracker, name, CHAMPION)
    if current is not None:
        check_champion(tracker, name, str(current.version), policy.require_record,
                       log.warning)
    try:
        challenger = candidate(tracker, mv)
        champion = candidate(tracker, current) if current is not None else None
        log.info(f"promote: {name} v{challenger.version} (challenger) vs "
                 + (f"v{champion.version} (champion)" if champion else "no champion"))
        # Both models are scored with one averaging: the challenger's (it was selected and
        # tested with it); a champion tested with another is named in the record.
        average = challenger.f1_average or (champion.f1_average if champion else None) or "auto"
        if champion and champion.f1_average and champion.f1_average != average:
            log.info(f"  note: v{champion.version} was tested with {champion.f1_average} F1; "
                     f"both are scored here with {average} F1")
        decide_kw = dict(confidence=confidence, min_gain=min_gain, non_inferior=non_inferior,
                         resamples=resamples, seed=seed)
        experiment_id = experiment_of(tracker, challenger, experiment_name)
        evidence = replace(evidence, count_prior=lambda fingerprint: comparisons_on(
            tracker, experiment_id, name, fingerprint))
        result = compare(tracker, name, challenger, champion, data, force, decide_kw, average,
                         batch_size, evidence)
        result.experiment_id = experiment_id
        if result.promote and not dry_run and policy.approver:
            result.awaiting = policy.approver
        settings = {**decide_kw, "min_f1_gain": min_gain, "non_inferior_margin": non_inferior,
                    "data": data or "", "min_images": evidence.min_images,
                    "max_comparisons": evidence.max_comparisons,
                    "near_copy_distance": evidence.near_copy_distance,
                    "max_class_drop": evidence.max_class_drop,
                    "champion_test_f1_average": champion.f1_average if champion else ""}
        result.run_id = record_promotion(tracker, result.experiment_id, name, result,
                                         dry_run=dry_run, force=force, settings=settings)
        if result.awaiting:
            tracker.set_tags(result.run_id, {APPROVER_TAG: result.awaiting})
        elif result.promote and not dry_run:
            try:
                _move_champion(tracker, name, result)
            except AliasConflict as conflict:
                tracker.set_tags(result.run_id, {"promotion.decision": "aborted",
                                                 "promotion.reason": str(conflict)[:5000]})
                raise
    except _FAILURES as e:
        if result.applied:   # the champion did move: say so, and tell the hooks
            _announce_quietly(tracker, name, urls, result, policy)
            raise RegistryError(f"the MLflow server at {tracker.uri} failed during promote "
                                f"after the champion moved to v{challenger.version}: "
                                f"{first_line(e)}; its record may be incomplete") from e
        raise RegistryError(f"the MLflow server at {tracker.uri} failed during promote: "
                            f"{first_line(e)}; the champion was not moved") from e
    try:
        if not dry_run and not (champion and champion.version == challenger.version):
            _tag_decision(tracker, name, result, dry_run)
    finally:
        if result.applied:   # announced whatever the tagging did: the champion moved
            announce(tracker, name, urls, "promote", challenger.version,
                     champion.version if champion else None, result.run_id, policy)
    return result


def _tag_decision(tracker: Tracker, name: str, result: PromotionResult, dry_run: bool) -> None:
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


def _announce_quietly(tracker: Tracker, name: str, urls: list[str], r: PromotionResult,
                      policy: ChampionPolicy) -> None:
    try:
        announce(tracker, name, urls, "promote", r.challenger.version,
                 r.champion.version if r.champion else None, r.run_id, policy)
    except _FAILURES:
        log.warning("hooks not sent: the MLflow server failed while reading the decision to "
                    "send")


def _move_champion(tracker: Tracker, name: str, r: PromotionResult, by: str = "promote") -> None:
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
        r.applied = True   # moved: whatever fails after this, the champion is the challenger
        record_champion(tracker, name, r.challenger.version, by, r.run_id)


def rollback(tracker: Tracker, name: str, policy: ChampionPolicy = ChampionPolicy(),
             experiment_name: str = "visiontune") -> tuple[str, str]:
    """Swap `champion` and `previous-champion`, or, when `champion` was moved outside
    visiontune, put back the version the record names. A run (role `rollback`) records the
    move and the hooks' deliveries. Returns (new champion, new previous)."""
    urls = hook_urls(tracker, name, policy)
    client = tracker.client
    with alias_lock(tracker, name):
        previous = get_alias_version(tracker, name, PREVIOUS)
        current = get_alias_version(tracker, name, CHAMPION)
        record = recorded_champion(tracker, name)
        now = str(current.version) if current is not None else None
        if record is not None and str(record["version"]) != now:
            target, keep = get_version(tracker, name, record["version"]), previous
            reason = (f"champion {'v' + now if now else '(none)'} had been moved outside "
                      f"visiontune; restored v{target.version}, the last recorded champion")
        elif previous is None:
            raise NotFoundError(f"model {name!r} has no '{PREVIOUS}' alias: nothing to roll "
                              f"back to")
        else:
            target, keep = previous, current
            reason = f"rolled back from v{now} to v{previous.version}" if now else \
                f"restored v{previous.version}"
        run_id = _rollback_run(tracker, name, str(target.version), now, reason,
                               experiment_name)
        moved = False
        try:
            client.set_registered_model_alias(name, CHAMPION, target.version)
            moved = True
            if keep is not None and str(keep.version) != str(target.version):
                client.set_registered_model_alias(name, PREVIOUS, keep.version)
            else:
                client.delete_registered_model_alias(name, PREVIOUS)
            record_champion(tracker, name, str(target.version), "rollback", run_id)
        except BaseException:   # the record never stays RUNNING, and says if it moved
            with contextlib.suppress(*_FAILURES):
                tracker.end_run(run_id, "FINISHED" if moved else "FAILED")
            raise
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tagged = [(target.version, "restored by rollback")] + (
        [(now, "rolled back")] if now and now != str(target.version) else [])
    try:
        for version, decision in tagged:
            client.set_model_version_tag(name, version, "promotion.decision", decision)
            client.set_model_version_tag(name, version, "promotion.time", stamp)
            client.set_model_version_tag(name, version, "promotion.run_id", run_id)
    finally:   # the champion has moved: announced and recorded whatever the tags did
        try:
            announce(tracker, name, urls, "rollback", str(target.version), now, run_id,
                     policy)
        finally:
            tracker.end_run(run_id, "FINISHED")
    kept = str(keep.version) if keep is not None and str(keep.version) != str(
        target.version) else ""
    return str(target.version), kept


def _rollback_run(tracker: Tracker, name: str, target: str, replaced: str | None, reason: str,
                  experiment_name: str) -> str:
    """The record of a rollback, created before the alias moves (the champion record names
    it)."""
    mv = get_version(tracker, name, target)
    experiment_id = experiment_of(tracker, candidate(tracker, mv), experiment_name)
    run_id = tracker.create_run(
        experiment_id, f"rollback to v{target}",
        {ROLE_TAG: "rollback", MODEL_NAME_TAG: name, "promotion.decision": "rollback",
         "promotion.reason": reason, "promotion.moved_by": moved_by(),
         NOTE_TAG: f"**Rollback of {name}**: {reason}\n"})
    try:
        tracker.log_params(run_id, {"model_name": name, "restored_version": target,
                                    "replaced_version": replaced or ""})
    except BaseException:
        with contextlib.suppress(*_FAILURES):
            tracker.end_run(run_id, "FAILED")
        raise
    return run_id


# ----------------------------------------------------------------------------- approve

def pending_promotion(tracker: Tracker, name: str, version: str, experiment_name: str):
    """The latest promotion run of `name` v`version` that waits for approval, or LookupError."""
    mv = get_version(tracker, name, version)
    experiment_id = experiment_of(tracker, candidate(tracker, mv), experiment_name)
    runs = tracker.client.search_runs(
        [experiment_id], f"tags.`{ROLE_TAG}` = '{ROLE}' and tags.`{MODEL_NAME_TAG}` = '{name}' "
                         f"and params.challenger_version = '{version}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].data.tags.get("promotion.decision") != "pending approval":
        raise NotFoundError(f"no promotion of {name} version {version} waits for approval: run "
                          f"`visiontune promote --model {name} --version {version} "
                          f"--approve-by NAME` first")
    return runs[0]


def approve(tracker: Tracker, name: str, version: str, by: str,
            policy: ChampionPolicy = ChampionPolicy(),
            experiment_name: str = "visiontune") -> tuple[str, str | None]:
    """Move `champion` to `version` as its pending promotion decided, if the champion is still
    the version it was compared with; who approved is recorded. Returns (new, previous)."""
    run = pending_promotion(tracker, name, str(version), experiment_name)
    wanted = run.data.tags.get(APPROVER_TAG, "any")
    if wanted not in ("any", by):
        raise PromotionError(f"the promotion of {name} version {version} waits for approval "
                             f"by {wanted}, not {by}")
    urls = hook_urls(tracker, name, policy)
    compared = run.data.params.get("champion_version") or None
    r = PromotionResult(True, run.data.tags.get("promotion.reason", ""),
                        Candidate(str(version), None, None),
                        Candidate(compared, None, None) if compared else None,
                        run_id=run.info.run_id)
    try:
        _move_champion(tracker, name, r, by=f"approve by {by}")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tracker.set_tags(r.run_id, {"promotion.decision": "promoted",
                                    "promotion.approved_by": by, "promotion.approved_at": stamp,
                                    "promotion.approved_from": moved_by()})
        client = tracker.client
        client.set_model_version_tag(name, version, "promotion.decision",
                                     f"promoted (approved by {by})")
        if compared:
            client.set_model_version_tag(name, compared, "promotion.decision",
                                         f"replaced by v{version}")
    finally:
        if r.applied:   # announced whatever the tagging did: the champion moved
            announce(tracker, name, urls, "approve", str(version), compared, r.run_id, policy)
    return str(version), compared
