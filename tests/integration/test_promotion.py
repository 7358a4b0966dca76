"""promote and rollback on a SQLite registry (no server): both registered models score the same
images, the decision is recorded as a run, the alias lock keeps concurrent commands honest.

The versions are registered through the pipeline's own data and register steps
(`register_like_the_pipeline`), with hand-set networks whose answers are known: `_perfect`
reads the bright quadrant that tells the classes apart, `_always_cat` ignores the image."""

import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from components.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    AliasConflict,
    Candidate,
    Evidence,
    PromotionError,
    alias_lock,
    get_alias_version,
    register_challenger,
    rollback,
    same_test_images,
)
from components.registry import registry as registry_module
from components.tracking import Tracker
from tests.conftest import log_lines, make_image_folder, register_like_the_pipeline

pytestmark = pytest.mark.integration   # opens a SQLite MLflow store

FP = "a" * 64
# The images here are one bright quadrant plus pixel noise: every image of a class is a
# perceptual near-copy of the others by design, and a test split holds about 28 of them.
# These tests are about the gate's mechanics; copies are tested in tests/unit/test_copies.py
# and tests/e2e/test_promote.py on photo-like images, with the defaults.
EVIDENCE = Evidence(min_images=10, near_copy_distance=0)
EVIDENCE_ARGS = ("registry.min_images=10", "data.near_copy_distance=0")


def promote(*args, **kwargs):
    from components.registry import promote as promote_

    return promote_(*args, **{"evidence": EVIDENCE, **kwargs})


def _perfect():
    """4x4 grey input: cat = top-left quadrant bright, dog = top-right (tests/conftest.py)."""
    w = torch.zeros(2, 16)
    for i in (0, 1, 4, 5):
        w[0, i], w[1, i] = 1.0, -1.0
    for i in (2, 3, 6, 7):
        w[0, i], w[1, i] = -1.0, 1.0
    lin = torch.nn.Linear(16, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.zero_()
    return torch.nn.Sequential(torch.nn.Flatten(), lin).eval()


def _always_cat():
    lin = torch.nn.Linear(16, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([1.0, 0.0]))
    return torch.nn.Sequential(torch.nn.Flatten(), lin).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promotion")
    data = make_image_folder(tmp / "pets", per_class=100, corrupt=False)
    other = make_image_folder(tmp / "other_pets", per_class=60, seed=5, corrupt=False)
    uri = f"sqlite:///{tmp}/mlflow.db"

    def register(net, name, folder=data, **kw):
        return register_like_the_pipeline(uri, str(tmp / "art"), folder, net, name, **kw)[0]

    return {"tracker": Tracker(uri), "register": register, "data": data, "other": other,
            "tmp": tmp}


def _alias(tracker, name, alias):
    mv = get_alias_version(tracker, name, alias)
    return None if mv is None else str(mv.version)


def _run(tracker, run_id):
    return tracker.client.get_run(run_id)


def test_a_worse_challenger_is_rejected_with_its_evidence_recorded(store, tmp_path):
    tracker, register = store["tracker"], store["register"]
    assert register(_perfect(), "worse").aliases == (CHALLENGER, CHAMPION)
    register(_always_cat(), "worse")
    with log_lines("components.registry") as lines:
        r = promote(tracker, "worse")
    assert not r.promote and not r.applied and _alias(tracker, "worse", CHAMPION) == "1"
    p = r.paired
    n = len(r.images.paths)
    assert 20 <= p.n == n and p.f1_champion == 1.0 and p.f1_challenger < 0.8
    assert p.ci_high < 0 and "not shown to be better" in r.reason
    assert f"  {n} images: at least 6 must differ, all in the challenger's favour, before " \
           "anything can be promoted (exact permutation p = 2^-6 = 0.01562 < 0.025)" in lines
    assert any(line.startswith(f"  images: {n} from the test split") and
               line.endswith("comparison #1 on these images") for line in lines)
    # the record: a promotion run in the model's experiment with everything it decided on
    run = _run(tracker, r.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["visiontune.role"] == "promotion"
    assert run.data.tags["promotion.decision"] == "rejected"
    assert run.info.experiment_id == _run(tracker, r.challenger.run_id).info.experiment_id
    assert run.data.params["challenger_version"] == "2"
    assert run.data.params["champion_version"] == "1"
    assert run.data.params["from_test_split"] == "True"
    assert run.data.metrics["ci_high"] == pytest.approx(p.ci_high)
    predictions = pd.read_csv(tracker.client.download_artifacts(
        r.run_id, "promotion/predictions.csv", str(tmp_path)))
    assert len(predictions) == n and predictions.champion_correct.all()
    assert (predictions.challenger_prediction == "cat").all()
    assert {a.path for a in tracker.client.list_artifacts(r.run_id, "promotion")} >= {
        "promotion/predictions.csv", "promotion/bootstrap.png", "promotion/decision.json",
        "promotion/images.csv"}
    # both versions point at it; the champion says it was kept
    tags = {v: tracker.client.get_model_version("worse", v).tags for v in ("1", "2")}
    assert tags["2"]["promotion.run_id"] == tags["1"]["promotion.run_id"] == r.run_id
    assert tags["2"]["promotion.decision"] == "rejected"
    assert tags["1"]["promotion.decision"] == "kept (v2 rejected)"
    assert tags["2"]["promotion.interval"].endswith("at 95%")


def test_better_is_promoted_forced_is_recorded_and_rollback_swaps(store):
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "better")
    register(_perfect(), "better")
    dry = promote(tracker, "better", dry_run=True)
    assert dry.promote and not dry.applied and _alias(tracker, "better", CHAMPION) == "1"
    assert _run(tracker, dry.run_id).data.tags["promotion.decision"] == "would promote"
    assert "promotion.run_id" not in tracker.client.get_model_version("better", "2").tags
    r = promote(tracker, "better")
    assert r.applied and r.paired.ci_low > 0 and "the challenger is better" in r.reason
    assert _run(tracker, r.run_id).data.tags["promotion.decision"] == "promoted"
    assert "promoted**" in _run(tracker, r.run_id).data.tags["mlflow.note.content"]
    assert _alias(tracker, "better", CHAMPION) == "2"
    assert _alias(tracker, "better", PREVIOUS) == "1"
    assert tracker.client.get_model_version("better", "1").tags["promotion.decision"] == \
        "replaced by v2"
    # the same version again: nothing to compare
    again = promote(tracker, "better")
    assert not again.promote and "already is the champion" in again.reason
    assert rollback(tracker, "better") == ("1", "2")
    assert _alias(tracker, "better", CHAMPION) == "1" and _alias(tracker, "better", PREVIOUS) == "2"
    # forced against the evidence: promoted, and the record says so
    register(_always_cat(), "better")
    forced = promote(tracker, "better", version="3", force=True)
    assert forced.applied and forced.paired.rule == "forced"
    assert _run(tracker, forced.run_id).data.params["forced"] == "True"


def test_two_equal_models_are_not_promoted(store):
    tracker, register = store["tracker"], store["register"]
    register(_perfect(), "equal")
    register(_perfect(), "equal")
    r = promote(tracker, "equal")
    assert not r.promote and (r.paired.ci_low, r.paired.ci_high) == (0.0, 0.0)
    assert r.paired.mcnemar_p == 1.0 and _alias(tracker, "equal", CHAMPION) == "1"


def test_versions_over_other_folders_are_compared_on_images_neither_saw(store):
    """The champion trained on one folder, the challenger on another that holds copies of
    some of the champion's images: promote scores the challenger's test split minus every
    image either trained or was selected on, by content, without --force."""
    import shutil

    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "mixed")
    grown = store["tmp"] / "grown_pets"
    shutil.copytree(store["other"], grown)
    for p in sorted((store["data"] / "cat").glob("*"))[:40]:   # champion images, renamed
        shutil.copy(p, grown / "cat" / f"from_first_{p.name}")
    register(_perfect(), "mixed", folder=grown)
    r = promote(tracker, "mixed", dry_run=True)
    assert r.paired is not None and r.promote and "different test images" not in r.reason
    champion_seen = {_sha(p) for p, s in _rows(tracker, "mixed", "1") if s != "test"}
    scored = {_sha(p) for p in r.images.paths}
    assert scored and not scored & champion_seen
    assert len(r.dropped) == sum(_sha(p) in champion_seen
                                 for p, s in _rows(tracker, "mixed", "2") if s == "test")
    # --data: both scored on a folder neither was trained on, whatever their fingerprints
    fresh = make_image_folder(store["tmp"] / "fresh", per_class=20, seed=9, corrupt=False)
    scored = promote(tracker, "mixed", data=str(fresh))
    assert scored.applied and scored.paired.n == 40 and not scored.images.from_test_split
    run = _run(tracker, scored.run_id)
    assert run.data.params["data_source"] == f"--data {fresh}"
    assert run.data.params["from_test_split"] == "False"


def test_unusable_data_and_classes_move_nothing(store):
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "strict")
    register(_perfect(), "strict")
    birds = make_image_folder(store["tmp"] / "birds", classes=("cat", "bird"), per_class=5,
                              seed=3, corrupt=False)
    with pytest.raises(PromotionError, match="classes the models do not know: bird"):
        promote(tracker, "strict", data=str(birds))
    with pytest.raises(PromotionError, match="--data .*nowhere: .*not a directory"):
        promote(tracker, "strict", data=str(store["tmp"] / "nowhere"))
    assert _alias(tracker, "strict", CHAMPION) == "1"
    assert "promotion.decision" not in tracker.client.get_model_version("strict", "2").tags


def test_a_champion_that_changes_meanwhile_moves_nothing(store):
    """A rollback (or another promote) lands while this promote scores: it compared the old
    champion, so it must not replace the new one."""
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "race")
    register(_always_cat(), "race")
    register(_perfect(), "race")

    def meanwhile(line):
        if line.lstrip().startswith("scoring"):
            tracker.client.set_registered_model_alias("race", CHAMPION, "2")

    with pytest.raises(AliasConflict, match="changed from v1 to v2 while this promote ran"), \
            log_lines("components.registry", on_line=meanwhile):
        promote(tracker, "race", version="3")
    assert _alias(tracker, "race", CHAMPION) == "2" and _alias(tracker, "race", PREVIOUS) is None
    runs = tracker.client.search_runs(
        [e.experiment_id for e in tracker.client.search_experiments()],
        "tags.`visiontune.model_name` = 'race'")
    assert [r.data.tags["promotion.decision"] for r in runs] == ["aborted"]


def test_the_alias_lock_is_exclusive_and_a_stale_one_is_taken_over(store, monkeypatch):
    tracker = store["tracker"]
    monkeypatch.setattr(registry_module, "LOCK_WAIT_S", 1.0)
    with alias_lock(tracker, "locked"):
        with pytest.raises(AliasConflict, match="being moved by another command"):
            with alias_lock(tracker, "locked"):
                pass
    with alias_lock(tracker, "locked"):   # released after use
        pass
    # one left behind by a killed process, older than LOCK_STALE_S
    tracker.client.create_registered_model("locked" + registry_module.LOCK_SUFFIX)
    monkeypatch.setattr(registry_module, "LOCK_STALE_S", 0.0)
    with alias_lock(tracker, "locked"):
        pass
    names = [m.name for m in tracker.client.search_registered_models()]
    assert not any(n.endswith(registry_module.LOCK_SUFFIX) for n in names)


def test_two_new_registrations_at_once_both_register_and_one_is_champion(store):
    tracker = store["tracker"]
    exp = tracker.ensure_experiment("race-new", str(store["tmp"] / "art"))
    runs = [tracker.create_run(exp, "pipeline", {}) for _ in range(2)]
    results, errors = [], []

    def register(run):
        try:
            # each thread its own client, as two pipelines would be
            results.append(register_challenger(Tracker(tracker.uri), "/nowhere", "brand-new",
                                               run, {"test_f1": 0.5}))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=register, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r.version for r in results) == ["1", "2"]
    assert sum(CHAMPION in r.aliases for r in results) == 1
    champion = _alias(tracker, "brand-new", CHAMPION)
    assert champion in ("1", "2")
    assert [CHAMPION in r.aliases for r in results if r.version == champion] == [True]
    # the other is the challenger, so a plain `promote` compares it with the champion
    other = next(r for r in results if r.version != champion)
    assert other.aliases == (CHALLENGER,) and _alias(tracker, "brand-new", CHALLENGER) == \
        other.version


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rows(tracker, name, version):
    """(path, split) of the version's run's manifest, read back as CSV."""
    import tempfile

    run_id = tracker.client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as d:
        frame = pd.read_csv(Path(tracker.client.download_artifacts(
            run_id, "data/split_manifest.csv", d)))
    return list(zip(frame.path, frame.split))


def test_same_test_images_rule():
    a = Candidate("1", 0.9, FP, "macro", "t" * 36)
    assert same_test_images(a, Candidate("2", 0.9, "b" * 64, "macro", "t" * 36))
    assert not same_test_images(a, Candidate("2", 0.9, FP, "macro", "u" * 36))
    # a version from before test fingerprints: the data fingerprint decides
    assert same_test_images(a, Candidate("2", 0.9, FP))
    assert not same_test_images(a, Candidate("2", 0.9, "c" * 64))
    assert not same_test_images(Candidate("1", 0.9, None), Candidate("2", 0.9, None))


def test_the_record_recomputes_from_its_predictions(store, tmp_path):
    """The McNemar table and p-value of a recorded promotion follow from its predictions CSV
    (scipy), and the registered versions' test metrics are linked to their test images in
    MLflow's own lineage."""
    from scipy.stats import binomtest

    tracker, register = store["tracker"], store["register"]
    register(_perfect(), "recompute")
    register(_always_cat(), "recompute")
    r = promote(tracker, "recompute", dry_run=True)
    frame = pd.read_csv(tracker.client.download_artifacts(
        r.run_id, "promotion/predictions.csv", str(tmp_path)))
    b = int((frame.challenger_correct & ~frame.champion_correct).sum())
    c = int((~frame.challenger_correct & frame.champion_correct).sum())
    metrics = MlflowClient(tracker.uri).get_run(r.run_id).data.metrics
    assert (metrics["challenger_only_right"], metrics["champion_only_right"]) == (b, c)
    assert metrics["mcnemar_p"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    mv = tracker.client.get_model_version("recompute", "1")
    linked = tracker.client.get_logged_model(mv.source.removeprefix("models:/")).metrics
    digests = {m.dataset_digest for m in linked if m.key == "test_f1"}
    assert digests == {mv.tags["test_fingerprint"][:36]}


def test_a_version_that_does_not_load_moves_nothing(store):
    """Its network file gone from the artifact store: one line naming the version."""
    from urllib.parse import urlparse

    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "broken")
    register(_perfect(), "broken")
    mv = tracker.client.get_model_version("broken", "2")
    model = tracker.client.get_logged_model(mv.source.removeprefix("models:/"))
    (network,) = Path(urlparse(model.artifact_location).path).rglob("*.pt2")
    network.unlink()
    with pytest.raises(PromotionError, match="cannot load broken version 2: .*nothing moved"):
        promote(tracker, "broken")
    assert _alias(tracker, "broken", CHAMPION) == "1"
    assert "promotion.decision" not in tracker.client.get_model_version("broken", "2").tags


def test_versions_without_fingerprints_need_data(store):
    """Versions registered outside the pipeline (no run manifest, no fingerprint tags)."""
    tracker = store["tracker"]
    exp = tracker.ensure_experiment("outside", str(store["tmp"] / "art"))
    for _ in range(2):
        register_challenger(tracker, "/nowhere", "outside", tracker.create_run(exp, "x", {}),
                            {"test_f1": 0.5})
    with pytest.raises(PromotionError, match="v2 and v1 of outside carry no test or data "
                                             "fingerprint.*--data PATH"):
        promote(tracker, "outside")
    assert _alias(tracker, "outside", CHAMPION) == "1"


def test_promote_refuses_credentials_in_data(capsys):
    from pipelines.cli import main

    assert main(["promote", "--model", "m", "--data", "s3://AKIA:PLANTED@bucket/new"]) == 2
    err = capsys.readouterr().err
    assert "PLANTED" not in err and "--data=s3://***@bucket/new carries credentials" in err



def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    from pipelines.cli import main

    code = main(args)
    return code, capsys.readouterr().out.splitlines()


def test_the_cli_rule_options_change_the_decision_and_say_so(store, capsys):
    """`--non-inferior`, `--confidence` and `registry.min_f1_gain` through the command as
    users type it, with the printed decision and the recorded rule."""
    tracker, register = store["tracker"], store["register"]
    uri = f"tracking.uri={tracker.uri}"
    register(_perfect(), "rules")
    uri_args = [uri, *EVIDENCE_ARGS]
    register(_perfect(), "rules")     # v2: as good as the champion, no better
    code, out = _cli(["promote", "--model", "rules", *uri_args], capsys)
    assert code == 3 and out[-2].startswith("keep the champion: not shown to be better")
    assert _alias(tracker, "rules", CHAMPION) == "1"
    # a smaller or faster model that is not worse: promoted, stated as non-inferiority
    code, out = _cli(["promote", "--model", "rules", "--non-inferior", "0.05", *uri_args], capsys)
    assert code == 0, out
    assert any("not worse by more than 0.0500 (non-inferiority, not superiority)" in line
               for line in out), out
    assert _alias(tracker, "rules", CHAMPION) == "2"
    runs = tracker.client.search_runs(
        [e.experiment_id for e in tracker.client.search_experiments()],
        "tags.`visiontune.model_name` = 'rules'", order_by=["attributes.start_time DESC"])
    assert runs[0].data.params["rule"] == "non-inferiority"
    # better, but not by the gain asked for; the interval at the confidence asked for
    register(_always_cat(), "rules")
    register(_perfect(), "rules")      # v4, against v3 as the champion: binary F1 1 vs 0
    tracker.client.set_registered_model_alias("rules", CHAMPION, "3")
    code, out = _cli(["promote", "--model", "rules", "--version", "4", "--confidence", "0.8",
                      "registry.min_f1_gain=1.0", *uri_args], capsys)
    assert code == 3, out
    assert any("80% interval [+1.0000, +1.0000]" in line for line in out), out
    assert out[-2].startswith("keep the champion: not shown to be better") and \
        "reaches +1.0000 (registry.min_f1_gain)" in out[-2]
    code, out = _cli(["promote", "--model", "rules", "--version", "4",
                      "registry.min_f1_gain=0.1", *uri_args], capsys)
    assert code == 0 and _alias(tracker, "rules", CHAMPION) == "4"


def test_the_same_images_serve_a_limited_number_of_comparisons(store):
    """Every look at the same test images spends their evidence: after
    registry.max_comparisons of them, promote asks for fresh images instead of deciding."""
    from dataclasses import replace

    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "peek")
    register(_perfect(), "peek")
    limited = replace(EVIDENCE, max_comparisons=2)
    for n in (1, 2):
        with log_lines("components.registry") as lines:
            promote(tracker, "peek", dry_run=True, evidence=limited)
        assert any(line.endswith(f"comparison #{n} on these images") for line in lines)
    with pytest.raises(PromotionError, match="used in 2 comparisons already "
                                             r"\(registry.max_comparisons=2\).*--data PATH"):
        promote(tracker, "peek", evidence=limited)
    assert _alias(tracker, "peek", CHAMPION) == "1"
    fresh = make_image_folder(store["tmp"] / "fresh_peek", per_class=20, seed=21, corrupt=False)
    assert promote(tracker, "peek", data=str(fresh), evidence=limited).applied


def test_a_manifest_given_as_data_is_scored_on_its_test_rows_only(store, tmp_path):
    """`promote --data split_manifest.csv`: its train and val rows are what a model trained
    and was selected on; only the test rows count, and a CSV without any is refused."""
    tracker, register = store["tracker"], store["register"]
    register(_always_cat(), "csv")
    register(_perfect(), "csv")
    rows = _rows(tracker, "csv", "2")
    csv = tmp_path / "split_manifest.csv"
    pd.DataFrame({"path": [p for p, _ in rows], "split": [s for _, s in rows],
                  "label": [Path(p).parent.name for p, _ in rows]}).to_csv(csv, index=False)
    r = promote(tracker, "csv", data=str(csv), dry_run=True)
    tests = sorted(p for p, s in rows if s == "test")
    assert sorted(r.images.paths) == tests and not r.dropped
    pd.DataFrame({"path": [p for p, s in rows if s == "train"], "split": "train",
                  "label": "cat"}).to_csv(tmp_path / "train_only.csv", index=False)
    with pytest.raises(PromotionError, match="has a split column but no 'test' rows"):
        promote(tracker, "csv", data=str(tmp_path / "train_only.csv"))
