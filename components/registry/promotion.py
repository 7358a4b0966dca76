"""The promotion gate: move `champion` only when the challenger wins on the same test data,
scored with the same F1 averaging.

`decide` is a pure function (the decision table is unit-tested without MLflow); `promote`
and `rollback` apply a decision to the registry with aliases (stages are deprecated). A registry
read that fails for any reason other than "not found" raises `RegistryError` before any alias
or tag is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from components.registry.registry import CHALLENGER, CHAMPION, get_alias_version, get_version
from components.tracking import Tracker

PREVIOUS = "previous-champion"


@dataclass(frozen=True)
class Candidate:
    version: str
    test_f1: float | None
    data_fingerprint: str | None
    f1_average: str | None = None   # binary | macro | weighted; None: registered before the tag


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    gain: float | None = None


def _averaging(c: Candidate) -> str:
    return f'"{c.f1_average}"' if c.f1_average else "unknown (no test_f1_average tag)"


def decide(challenger: Candidate, champion: Candidate | None, min_gain: float = 0.0,
           force: bool = False) -> Decision:
    """Promote only a challenger whose test F1 beats the champion's by more than 0 and by at
    least `min_gain`, on the same test data (data fingerprint) with the same F1 averaging.

    A version without a `test_f1_average` tag (registered before the tag existed) has an
    unknown averaging: two unknowns compare as before, but unknown against a known averaging
    is refused, since a binary F1 and a macro F1 of the same model can differ widely. `force`
    overrides every refusal except "already the champion".
    """
    if champion is None:
        return Decision(True, "no champion yet")
    if champion.version == challenger.version:
        return Decision(False, f"version {challenger.version} already is the champion")
    if challenger.test_f1 is None or champion.test_f1 is None:
        if force:
            return Decision(True, "forced: a version has no test_f1 to compare")
        return Decision(False, "cannot compare: a version has no test_f1 tag")
    gain = challenger.test_f1 - champion.test_f1
    if force:
        return Decision(True, f"forced (test F1 change {gain:+.4f})", gain)
    if challenger.data_fingerprint != champion.data_fingerprint:
        return Decision(False, "different test data (data fingerprints differ): the test F1s "
                               "are not comparable; use --force to promote anyway", gain)
    if challenger.f1_average != champion.f1_average:
        return Decision(False, f"different F1 averaging: the test F1s are not comparable, one "
                               f"is {_averaging(challenger)} and the other "
                               f"{_averaging(champion)}; use --force to promote anyway", gain)
    if gain <= 0 or gain < min_gain:
        return Decision(False, f"test F1 {challenger.test_f1:.4f} vs champion "
                               f"{champion.test_f1:.4f} ({gain:+.4f}); needs an improvement "
                               f"of at least {max(min_gain, 0):.4f} and > 0", gain)
    return Decision(True, f"test F1 {challenger.test_f1:.4f} beats champion "
                          f"{champion.test_f1:.4f} ({gain:+.4f})", gain)


def _candidate(mv) -> Candidate:
    f1 = mv.tags.get("test_f1")
    return Candidate(str(mv.version), float(f1) if f1 not in (None, "") else None,
                     mv.tags.get("data_fingerprint"), mv.tags.get("test_f1_average") or None)


@dataclass(frozen=True)
class PromotionResult:
    decision: Decision
    challenger: Candidate
    champion: Candidate | None
    applied: bool   # False on a dry run or when not promoted


def promote(tracker: Tracker, name: str, version: str | None = None, *, min_gain: float = 0.0,
            force: bool = False, dry_run: bool = False) -> PromotionResult:
    client = tracker.client
    if version is not None:
        mv = get_version(tracker, name, str(version))
    else:
        mv = get_alias_version(tracker, name, CHALLENGER)
        if mv is None:
            raise LookupError(f"model {name!r} has no '{CHALLENGER}' alias; pass --version")
    challenger = _candidate(mv)
    current = get_alias_version(tracker, name, CHAMPION)
    champion = _candidate(current) if current is not None else None
    decision = decide(challenger, champion, min_gain, force)
    applied = decision.promote and not dry_run
    if not dry_run:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tags = {"promotion.decision": "promoted" if decision.promote else "rejected",
                "promotion.reason": decision.reason, "promotion.time": stamp,
                "promotion.challenger_version": challenger.version,
                "promotion.challenger_test_f1": challenger.test_f1,
                "promotion.champion_version": champion.version if champion else "",
                "promotion.champion_test_f1": champion.test_f1 if champion else "",
                "promotion.forced": force}
        for v in {challenger.version, *([champion.version] if champion else [])}:
            for k, val in tags.items():
                client.set_model_version_tag(name, v, k, str(val))
        if applied:
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS, champion.version)
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
    return PromotionResult(decision, challenger, champion, applied)


def rollback(tracker: Tracker, name: str) -> tuple[str, str]:
    """Swap `champion` and `previous-champion`; returns (new champion, new previous)."""
    client = tracker.client
    previous = get_alias_version(tracker, name, PREVIOUS)
    current = get_alias_version(tracker, name, CHAMPION)
    if previous is None:
        raise LookupError(f"model {name!r} has no '{PREVIOUS}' alias: nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, previous.version, "promotion.decision",
                                 "restored by rollback")
    client.set_model_version_tag(name, previous.version, "promotion.time", stamp)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
        client.set_model_version_tag(name, current.version, "promotion.decision",
                                     "rolled back")
        client.set_model_version_tag(name, current.version, "promotion.time", stamp)
        return str(previous.version), str(current.version)
    client.delete_registered_model_alias(name, PREVIOUS)
    return str(previous.version), ""
