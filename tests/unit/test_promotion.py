"""The promotion decision table, and promote/rollback on a SQLite registry (no server)."""

import pytest
import torch

from components.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    Candidate,
    decide,
    get_alias_version,
    promote,
    register_challenger,
    rollback,
)
from components.tracking import Tracker

FP = "a" * 64


@pytest.mark.parametrize("challenger,champion,kw,promoted,reason", [
    (Candidate("2", 0.90, FP), Candidate("1", 0.85, FP), {}, True, "beats champion"),
    (Candidate("2", 0.85, FP), Candidate("1", 0.85, FP), {}, False, "improvement"),
    (Candidate("2", 0.80, FP), Candidate("1", 0.85, FP), {}, False, "-0.0500"),
    (Candidate("2", 0.86, FP), Candidate("1", 0.85, FP), {"min_gain": 0.02}, False,
     "at least 0.0200"),
    (Candidate("2", 0.90, FP), None, {}, True, "no champion yet"),
    (Candidate("2", 0.99, "b" * 64), Candidate("1", 0.85, FP), {}, False,
     "data fingerprints differ"),
    (Candidate("2", 0.99, "b" * 64), Candidate("1", 0.85, FP), {"force": True}, True, "forced"),
    (Candidate("2", 0.50, FP), Candidate("1", 0.85, FP), {"force": True}, True, "forced"),
    (Candidate("1", 0.85, FP), Candidate("1", 0.85, FP), {}, False, "already is the champion"),
    (Candidate("2", 0.90, FP, "macro"), Candidate("1", 0.85, FP, "macro"), {}, True,
     "beats champion"),
    (Candidate("2", 0.99, FP, "binary"), Candidate("1", 0.85, FP, "macro"), {}, False,
     'one is "binary" and the other "macro"'),
    (Candidate("2", 0.99, FP, "binary"), Candidate("1", 0.85, FP, "macro"), {"force": True}, True,
     "forced"),
    # A champion registered before the tag existed: unknown is not "macro".
    (Candidate("2", 0.99, FP, "macro"), Candidate("1", 0.85, FP), {}, False,
     'one is "macro" and the other unknown'),
    (Candidate("2", 0.99, FP, "weighted"), Candidate("1", 0.85, FP), {"force": True}, True,
     "forced"),
])
def test_decision_table(challenger, champion, kw, promoted, reason):
    d = decide(challenger, champion, **kw)
    assert d.promote is promoted and reason in d.reason


_PREP = {"image_size": 4, "channels": 1, "color_mode": "L", "mean": [0.5], "std": [0.5]}
_TINY_NET = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()


@pytest.fixture
def registry(tmp_path):
    import mlflow

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracker.ensure_experiment("promo", str(tmp_path / "art"))
    mlflow.set_tracking_uri(tracker.uri)

    def register(test_f1, fingerprint=FP, average="macro", log_model=True):
        run = tracker.create_run(exp, "pipeline", {})
        # Logging a model takes seconds; the gate itself reads only aliases and tags.
        uri = tracker.log_image_classifier(run, _TINY_NET, ["a", "b"], _PREP,
                                           {"class_names": ["a", "b"], "preprocessing": _PREP}) \
            if log_model else str(tmp_path / "art" / "model")
        return register_challenger(tracker, uri, "m", run,
                                   {"test_f1": test_f1, "data_fingerprint": fingerprint,
                                    "test_f1_average": average})
    return tracker, register


def _alias(tracker, alias):
    mv = get_alias_version(tracker, "m", alias)
    return None if mv is None else str(mv.version)


def test_promote_dry_run_force_and_rollback(registry):
    tracker, register = registry
    first = register(0.9)
    assert first.aliases == (CHALLENGER, CHAMPION)
    register(0.8)  # worse
    r = promote(tracker, "m")
    assert not r.decision.promote and _alias(tracker, CHAMPION) == "1"
    assert tracker.client.get_model_version("m", "2").tags["promotion.decision"] == "rejected"
    r = promote(tracker, "m", force=True, dry_run=True)
    assert r.decision.promote and not r.applied and _alias(tracker, CHAMPION) == "1"
    r = promote(tracker, "m", force=True)
    assert r.applied and _alias(tracker, CHAMPION) == "2" and _alias(tracker, PREVIOUS) == "1"
    tags = tracker.client.get_model_version("m", "1").tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.challenger_version"] == "2"
    assert "promotion.time" in tags and tags["promotion.champion_test_f1"] == "0.9"
    assert rollback(tracker, "m") == ("1", "2")
    assert _alias(tracker, CHAMPION) == "1" and _alias(tracker, PREVIOUS) == "2"
    register(0.95)
    assert promote(tracker, "m").applied and _alias(tracker, CHAMPION) == "3"


def test_fingerprint_mismatch_is_refused(registry):
    tracker, register = registry
    register(0.5)
    register(0.99, fingerprint="c" * 64)
    r = promote(tracker, "m")
    assert not r.decision.promote and "fingerprints differ" in r.decision.reason


def test_averaging_mismatch_is_refused(registry):
    tracker, register = registry
    register(0.5, average="macro", log_model=False)
    register(0.99, average="binary", log_model=False)  # higher, but of the positive class only
    r = promote(tracker, "m")
    assert not r.decision.promote and not r.applied
    assert (r.challenger.f1_average, r.champion.f1_average) == ("binary", "macro")
    assert 'one is "binary" and the other "macro"' in r.decision.reason
    assert _alias(tracker, CHAMPION) == "1" and _alias(tracker, PREVIOUS) is None
    assert tracker.client.get_model_version("m", "2").tags["promotion.decision"] == "rejected"
