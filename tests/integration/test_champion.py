"""The champion's record, the guard, approval and rollback on a SQLite registry (no server):
versions registered through the pipeline's own steps with networks whose answers are known
(tests/integration/test_promotion.py), hooks delivered to a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from mlflow import MlflowClient

from components.registry import (
    CHAMPION,
    PREVIOUS,
    AliasConflict,
    ChampionPolicy,
    PromotionError,
    UnrecordedChampion,
    approve,
    champion_problem,
    get_alias_version,
    rollback,
)
from components.registry.champion import HOOKS_TAG, hook_urls, recorded_champion
from components.registry.hooks import HookError
from components.tracking import Tracker
from tests.conftest import (
    hook_receiver,
    log_lines,
    make_image_folder,
    register_like_the_pipeline,
)
from tests.integration.test_promotion import _always_cat, _perfect, promote

pytestmark = pytest.mark.integration   # opens a SQLite MLflow store

SECRET = "test-hook-secret-2f9c"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("champion")
    data = make_image_folder(tmp / "pets", per_class=100, corrupt=False)
    uri = f"sqlite:///{tmp}/mlflow.db"

    def register(net, name):
        return register_like_the_pipeline(uri, str(tmp / "art"), data, net, name)[0]

    return {"tracker": Tracker(uri), "register": register}


@pytest.fixture
def receiver():
    """A hook receiver on 127.0.0.1: answers 500 to the first delivery, then 200."""
    with hook_receiver([500]) as (url, got):
        yield url, got


def _alias(tracker, name, alias=CHAMPION):
    mv = get_alias_version(tracker, name, alias)
    return None if mv is None else str(mv.version)


def test_every_recorded_move_matches_and_a_hand_move_is_named(store):
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "guard")
    record = recorded_champion(tracker, "guard")
    assert record["version"] == "1" and record["by"] == "first registration"
    assert champion_problem(tracker, "guard", "1") is None
    register(_perfect(), "guard")
    r = promote(tracker, "guard")
    assert r.applied and recorded_champion(tracker, "guard")["run_id"] == r.run_id
    assert champion_problem(tracker, "guard", "2") is None
    # moved by hand, as the MLflow UI does
    MlflowClient(tracker.uri).set_registered_model_alias("guard", CHAMPION, "1")
    problem = champion_problem(tracker, "guard", "1")
    assert problem.startswith("models:/guard@champion is version 1, moved there outside "
                              "visiontune (the last recorded move made version 2 champion "
                              "(promote, ") and "visiontune rollback --model guard" in problem
    assert "\n" not in problem
    # promote says so; with the record required it refuses before comparing
    register(_perfect(), "guard")
    with pytest.raises(UnrecordedChampion, match="refusing it"):
        promote(tracker, "guard", policy=ChampionPolicy(require_record=True))
    with log_lines("components.registry") as lines:
        promote(tracker, "guard", dry_run=True)
    assert lines[0].startswith("warning: models:/guard@champion is version 1, moved there")
    # rollback restores the recorded champion, and records that it did
    assert rollback(tracker, "guard") == ("2", "1")
    assert _alias(tracker, "guard") == "2" and champion_problem(tracker, "guard", "2") is None
    run = tracker.client.get_run(recorded_champion(tracker, "guard")["run_id"])
    assert run.data.tags["visiontune.role"] == "rollback"
    assert "moved outside visiontune" in run.data.tags["promotion.reason"]


def test_a_promotion_waits_for_its_approver(store):
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "approved")
    register(_perfect(), "approved")
    r = promote(tracker, "approved", policy=ChampionPolicy(approver="alice"))
    assert r.promote and not r.applied and r.decision == "pending approval"
    assert _alias(tracker, "approved") == "1"
    run = tracker.client.get_run(r.run_id)
    assert run.data.tags["promotion.decision"] == "pending approval"
    assert run.data.tags["promotion.approver"] == "alice"
    assert tracker.client.get_model_version("approved", "1").tags["promotion.decision"] == \
        "kept (v2 awaits approval)"
    with pytest.raises(PromotionError, match="waits for approval by alice, not bob"):
        approve(tracker, "approved", "2", "bob")
    with pytest.raises(LookupError, match="no promotion of approved version 1 waits"):
        approve(tracker, "approved", "1", "alice")
    assert approve(tracker, "approved", "2", "alice") == ("2", "1")
    assert _alias(tracker, "approved") == "2" and _alias(tracker, "approved", PREVIOUS) == "1"
    run = tracker.client.get_run(r.run_id)
    assert run.data.tags["promotion.decision"] == "promoted"
    assert run.data.tags["promotion.approved_by"] == "alice"
    assert recorded_champion(tracker, "approved")["by"] == "approve by alice"
    with pytest.raises(LookupError):   # approved once: nothing waits any more
        approve(tracker, "approved", "2", "alice")


def test_approval_refused_when_the_champion_moved_since_the_decision(store):
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "raced")
    register(_perfect(), "raced")
    register(_perfect(), "raced")
    promote(tracker, "raced", "2", policy=ChampionPolicy(approver="any"))
    promote(tracker, "raced", "3")       # v3 moved the champion meanwhile
    assert _alias(tracker, "raced") == "3"
    with pytest.raises(AliasConflict, match="changed from v1 to v3"):
        approve(tracker, "raced", "2", "carol")
    assert _alias(tracker, "raced") == "3"


def test_hooks_are_checked_before_anything_moves(store, monkeypatch, receiver):
    tracker, register = store["tracker"], store["register"]
    url, got = receiver
    register(_always_cat(), "hooked")
    register(_perfect(), "hooked")
    monkeypatch.delenv("VISIONTUNE_HOOK_SECRET", raising=False)
    with pytest.raises(HookError, match="VISIONTUNE_HOOK_SECRET"):
        promote(tracker, "hooked", policy=ChampionPolicy(hooks=(url,)))
    assert _alias(tracker, "hooked") == "1" and got == []
    # the model's own hooks (a tag) join the config's, once each
    MlflowClient(tracker.uri).set_registered_model_tag("hooked", HOOKS_TAG, f"{url}, {url}x")
    monkeypatch.setenv("VISIONTUNE_HOOK_SECRET", SECRET)
    assert hook_urls(tracker, "hooked", ChampionPolicy(hooks=(url,))) == [url, url + "x"]


def test_a_promotion_and_a_rollback_are_delivered_signed_and_recorded(store, monkeypatch,
                                                                      receiver):
    tracker, register = store["tracker"], store["register"]
    url, got = receiver
    monkeypatch.setenv("VISIONTUNE_HOOK_SECRET", SECRET)
    register(_always_cat(), "told")
    register(_perfect(), "told")
    policy = ChampionPolicy(hooks=(url,), hook_attempts=3)
    r = promote(tracker, "told", policy=policy)
    assert r.applied and len(got) == 2   # 500, then 200
    first, second = got
    assert first["body"] == second["body"]
    assert first["headers"]["X-Visiontune-Delivery"] == second["headers"]["X-Visiontune-Delivery"]
    for delivery in got:
        expected = hmac.new(SECRET.encode(), delivery["body"], hashlib.sha256).hexdigest()
        assert delivery["headers"]["X-Visiontune-Signature"] == f"sha256={expected}"
    body = json.loads(first["body"])
    assert (body["event"], body["version"], body["previous_version"]) == \
        ("champion.promoted", "2", "1")
    assert body["decision"]["decision"] == "promoted" and body["run"]["id"] == r.run_id
    assert body["decision"]["p_value"] == pytest.approx(r.paired.p_value)
    assert SECRET not in first["body"].decode()
    run = tracker.client.get_run(r.run_id)
    assert run.data.tags["promotion.hooks"] == "1 of 1 delivered"
    assert run.data.metrics["hook_attempts"] == 2
    hooks = json.loads(open(tracker.client.download_artifacts(
        r.run_id, "promotion/hooks.json")).read())
    assert [a["status"] for a in hooks[0]["attempts"]] == [500, 200]
    assert rollback(tracker, "told", policy) == ("1", "2")
    body = json.loads(got[2]["body"])
    assert (body["event"], body["version"], body["previous_version"]) == \
        ("champion.rolled_back", "1", "2")
    rolled = tracker.client.get_run(body["run"]["id"])
    assert rolled.data.tags["promotion.hooks"] == "1 of 1 delivered"


def test_promote_prints_both_versions_measured_speed_and_approve_moves(store, capsys):
    """As users type it: promote prints the speed and size registration measured for both
    versions (ratios recomputed here from the version tags), waits for its approver, and
    `visiontune approve` moves the champion."""
    import re

    from pipelines.cli import main
    from tests.integration.test_promotion import EVIDENCE_ARGS

    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "timed")
    register(_perfect(), "timed")
    args = [f"tracking.uri={tracker.uri}", *EVIDENCE_ARGS]
    assert main(["promote", "--model", "timed", "--approve-by", "dana", *args]) == 4
    out = capsys.readouterr().out.splitlines()
    (line,) = [line for line in out if line.startswith("  speed (CPU, batch 32): ")]
    tags = {v: tracker.client.get_model_version("timed", v).tags for v in ("1", "2")}
    rate = {v: float(t["speed.images_per_s_batch32"]) for v, t in tags.items()}
    found = re.search(r"images/s \((?:([\d.]+)x (faster|slower)|same)\)", line)
    assert found, line
    if found.group(1) is None:   # within 1%
        assert rate["2"] / rate["1"] == pytest.approx(1, abs=0.0101)
    else:
        assert float(found.group(1)) == pytest.approx(
            max(rate["2"] / rate["1"], rate["1"] / rate["2"]), rel=0.01)
        assert found.group(2) == ("faster" if rate["2"] > rate["1"] else "slower")
    assert "size:" in line and "M parameters" in line
    assert out[-2] == ("pending approval: nothing moved until `visiontune approve --model timed "
                       "--version 2 --by dana`") and out[-1].startswith("record: ")
    assert _alias(tracker, "timed") == "1"
    assert main(["approve", "--model", "timed", "--version", "2", "--by", "erin", *args]) == 1
    assert capsys.readouterr().err.strip() == ("visiontune: error: the promotion of timed "
                                               "version 2 waits for approval by dana, not erin")
    assert main(["approve", "--model", "timed", "--version", "2", "--by", "dana", *args]) == 0
    assert capsys.readouterr().out.strip() == ("models:/timed@champion -> version 2 (approved "
                                               "by dana) (previous-champion -> 1)")
    assert _alias(tracker, "timed") == "2"


def test_rollback_of_a_deleted_champion_restores_the_recorded_one(store):
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "deleted")
    MlflowClient(tracker.uri).delete_registered_model_alias("deleted", CHAMPION)
    assert rollback(tracker, "deleted") == ("1", "")
    assert _alias(tracker, "deleted") == "1"


def test_a_champion_from_before_the_record_counts_as_recorded_when_its_tags_say_so(store):
    """Models whose champion moved before visiontune kept `visiontune.champion_record`: the
    first version, or one tagged promoted / restored by rollback, is not named as a hand move;
    another version is."""
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "legacy")
    register(_perfect(), "legacy")
    client = MlflowClient(tracker.uri)
    client.delete_registered_model_tag("legacy", "visiontune.champion_record")
    assert champion_problem(tracker, "legacy", "1") is None          # the first version
    problem = champion_problem(tracker, "legacy", "2")
    assert "no promotion or rollback of this model is recorded" in problem
    client.set_model_version_tag("legacy", "2", "promotion.decision", "promoted")
    assert champion_problem(tracker, "legacy", "2") is None


def test_hook_urls_in_the_config_are_recorded_without_their_secret_path(tmp_path):
    """A run records its config (params, config.yaml); a hook URL's token never reaches it."""
    from pipelines.compose import load_config
    from pipelines.steps import open_record

    secret = "T000/B000/s3cr3tT0ken"
    cfg = load_config([f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                       f"registry.hooks=[https://hooks.example.com/services/{secret}]"])
    record = open_record(cfg, None, None)
    run = record.run()
    assert run.data.params["registry.hooks"] == "['https://hooks.example.com/services/…']"
    config = open(record.tracker.client.download_artifacts(
        record.run_id, "config.yaml", str(tmp_path))).read()
    assert secret not in config and "s3cr3t" not in str(run.data)
    record.close("FINISHED")
