"""The promotion gate: `champion` moves only when the challenger is shown to be better on the
same labelled images, and every decision leaves an MLflow run saying why.

`promote`:
  1. reads the challenger (a version, or the alias `challenger`) and the champion;
  2. chooses the images: the challenger's test split, read back from its pipeline run's
     manifest (the champion must have been tested on the same images: MLflow's lineage of
     the versions' test metrics, else their fingerprint tags), or `data`, any labelled folder
     or CSV manifest, whatever the fingerprints;
  3. loads both registered models (each with its own preprocessing) and classifies the
     images with both;
  4. decides from the per-image results (`components.evaluation.paired.decide`: exact
     McNemar, paired bootstrap interval of the F1 difference, the rule);
  5. records the decision as a run (role `promotion`) in the model's experiment;
  6. moves the aliases under the alias lock, after reading the champion again: a champion
     that changed meanwhile was never compared with this challenger, so nothing moves.

A registry read that fails for any reason other than "not found" raises `RegistryError`
before any alias or tag is written.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

from components.evaluation.paired import DEFAULT_RESAMPLES, PairedDecision, decide
from components.registry.registry import (
    CHALLENGER,
    CHAMPION,
    AliasConflict,
    RegistryError,
    alias_lock,
    get_alias_version,
    get_version,
)
from components.tracking import DATASET_DIGEST_CHARS, ROLE_TAG, Tracker, first_line

PREVIOUS = "previous-champion"
ROLE = "promotion"
MODEL_NAME_TAG = "visiontune.model_name"
NOTE_TAG = "mlflow.note.content"
TEST_METRIC = "test_f1"    # the LoggedModel metric whose dataset says which images were used
Echo = Callable[[str], None]


class PromotionError(RuntimeError):
    """Promote cannot compare: images that cannot be read, classes that differ, a model that
    does not load. Nothing moved."""


@dataclass(frozen=True)
class Candidate:
    version: str
    test_f1: float | None
    data_fingerprint: str | None
    f1_average: str | None = None       # binary | macro | weighted; None: before the tag
    test_fingerprint: str | None = None  # its test images (MLflow lineage, else the tag)
    run_id: str | None = None
    model_id: str | None = None


def same_test_images(a: Candidate, b: Candidate) -> bool:
    """Both versions were tested on the same images (and so trained on none of them): their
    test fingerprints agree, or, for versions from before those, their data fingerprints."""
    if a.test_fingerprint and b.test_fingerprint:
        return a.test_fingerprint == b.test_fingerprint
    return bool(a.data_fingerprint) and a.data_fingerprint == b.data_fingerprint


@dataclass(frozen=True)
class ScoredImages:
    paths: list[str]
    labels: list[str]          # class names
    fingerprint: str
    source: str                # for people: where the images come from
    location: str              # their folder, CSV or the run's data location
    from_test_split: bool      # False: `--data`


@dataclass
class PromotionResult:
    promote: bool
    reason: str
    challenger: Candidate
    champion: Candidate | None
    applied: bool = False      # False on a dry run or when not promoted
    paired: PairedDecision | None = None
    images: ScoredImages | None = None
    left_out: list[tuple[str, str]] = field(default_factory=list)   # (path, why)
    run_id: str | None = None
    experiment_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    predictions: Any = None    # DataFrame: path, label, both models' predictions, error

    @property
    def decision(self) -> str:
        """What the record says: "pending" between the verdict and the champion's move."""
        if not self.promote:
            return "rejected"
        return "promoted" if self.applied else "pending"


# ----------------------------------------------------------------------------- the versions

def _test_digest(tracker: Tracker, model_id: str | None) -> str | None:
    """The dataset digest of the LoggedModel's test metrics (MLflow 3 lineage), if any."""
    if not model_id:
        return None
    try:
        metrics = tracker.model_metrics(model_id)
    except MlflowException:
        return None
    return next((m.dataset_digest for m in metrics if m.key == TEST_METRIC
                 and m.dataset_digest), None)


def candidate(tracker: Tracker, mv) -> Candidate:
    f1 = mv.tags.get("test_f1")
    # MLflow 3.17 returns no model_id with a version (also when it was registered with one);
    # its source is the LoggedModel's URI.
    source = mv.source or ""
    model_id = getattr(mv, "model_id", None) or (
        source.removeprefix("models:/") if source.startswith("models:/m-") else None)
    tag_fp = mv.tags.get("test_fingerprint") or None
    test_fp = _test_digest(tracker, model_id) or (tag_fp[:DATASET_DIGEST_CHARS]
                                                  if tag_fp else None)
    return Candidate(str(mv.version), float(f1) if f1 not in (None, "") else None,
                     mv.tags.get("data_fingerprint"), mv.tags.get("test_f1_average") or None,
                     test_fp, mv.run_id or None, model_id)


# ----------------------------------------------------------------------------- the images

def images_of_run(tracker: Tracker, run_id: str | None, version: str) -> ScoredImages:
    """The test split of the pipeline run that registered the version (its manifest)."""
    from components.data.split import SplitManifest

    if not run_id:
        raise PromotionError(f"version {version} has no run: its test split is unknown; "
                             f"score both models on labelled images with --data PATH")
    # Listed first: a run without a manifest lists nothing, a failing server raises.
    if not any(a.path.endswith("manifest.json")
               for a in tracker.client.list_artifacts(run_id, "data")):
        raise PromotionError(f"version {version}'s run {run_id} has no split manifest "
                             f"(data/manifest.json): score both models on labelled images "
                             f"with --data PATH")
    with tempfile.TemporaryDirectory() as d:
        try:
            folder = tracker.client.download_artifacts(run_id, "data", d)
            manifest = SplitManifest.load(folder)
        except (OSError, KeyError, ValueError) as e:
            raise PromotionError(f"version {version}'s run {run_id} has no split manifest "
                                 f"(data/manifest.json: {first_line(e)}); score both models on "
                                 f"labelled images with --data PATH") from None
    paths, labels = manifest.subset("test")
    return ScoredImages(paths, [manifest.classes[y] for y in labels],
                        manifest.test_fingerprint or manifest.fingerprint,
                        f"the test split of version {version}'s run {run_id}",
                        manifest.test_root or manifest.root, True)


def images_of_path(path: str) -> ScoredImages:
    """Every readable image of a labelled folder (root/<class>/...) or CSV manifest."""
    from components.data.ingest import index_images
    from components.data.split import compute_fingerprint
    from components.data.validate import validate_images

    try:
        images = validate_images(index_images(path), "skip", 1)
    except (OSError, ValueError) as e:   # missing, unreadable, no two classes of images
        raise PromotionError(f"--data {path}: {first_line(e)}; nothing moved") from None
    idx = images.index
    fp = compute_fingerprint(idx.root, idx.paths, images.digests, idx.labels,
                             ["eval"] * len(idx), idx.classes)
    return ScoredImages(list(idx.paths), [idx.classes[y] for y in idx.labels], fp,
                        f"--data {path}", idx.root, False)


# ----------------------------------------------------------------------------- the models

def load_version(tracker: Tracker, name: str, version: str, dst: str):
    """The registered model as a pyfunc (its own preprocessing inside), and its classes."""
    import mlflow

    from components.inference import check_model, class_names
    from components.serving import CODE_TAG, CodeMismatch, verify_code

    try:
        mv = tracker.client.get_model_version(name, version)
        local = tracker.download_model(f"models:/{name}/{version}", dst)
        try:
            verify_code(local, mv.tags.get(CODE_TAG), f"{name} version {version}")
        except CodeMismatch as e:
            raise PromotionError(f"{e}; nothing moved") from None
        info = mlflow.models.Model.load(local)
        check_model(info.metadata or {}, info.flavors)
        model = mlflow.pyfunc.load_model(local)
    except (MlflowException, OSError, ValueError, ImportError, RuntimeError) as e:
        raise PromotionError(f"cannot load {name} version {version}: {first_line(e)}; "
                             f"nothing moved") from None
    return model, class_names(model)


def classify(model, paths: list[str], batch_size: int) -> tuple[list[str | None], list]:
    """(predicted class or None, error or None) per image."""
    from components.inference import ERROR, PREDICTION, predict_images
    from components.serving.image_classifier import is_missing

    frame = predict_images(model, list(paths), batch_size)
    errors = [None if is_missing(e) else str(e) for e in frame[ERROR]]
    preds = [None if e else str(p) for p, e in zip(frame[PREDICTION], errors)]
    return preds, errors


# ----------------------------------------------------------------------------- comparing

def _compare(tracker: Tracker, name: str, challenger: Candidate, champion: Candidate | None,
             data: str | None, force: bool, echo: Echo, decide_kw: dict,
             f1_average: str, batch_size: int) -> PromotionResult:
    if champion is None:
        return PromotionResult(True, "no champion yet", challenger, None)
    if champion.version == challenger.version:
        return PromotionResult(False, f"version {challenger.version} already is the champion",
                               challenger, champion)
    if data is None and not same_test_images(challenger, champion) and not force:
        unknown = [f"v{c.version}" for c in (challenger, champion)
                   if not (c.test_fingerprint or c.data_fingerprint)]
        if unknown:
            raise PromotionError(
                f"{' and '.join(unknown)} of {name} carry no test or data fingerprint (not "
                f"registered by the pipeline?): which images they were tested on is unknown; "
                f"score both on labelled images with --data PATH; nothing moved")
        return PromotionResult(
            False, "different test images (test/data fingerprints differ): the champion may "
                   "have trained on the challenger's test split; score both on the same "
                   "labelled images with --data PATH (or --force)", challenger, champion)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    images = images_of_path(data) if data else images_of_run(tracker, challenger.run_id,
                                                             challenger.version)
    seconds["images"] = time.perf_counter() - t
    if not images.paths:
        raise PromotionError(f"no images to score in {images.source}")
    echo(f"  images: {len(images.paths):,} from {images.source} (fingerprint "
         f"{images.fingerprint[:12]})")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visiontune-promote-") as d:
        models = {}
        for role, c in (("challenger", challenger), ("champion", champion)):
            models[role] = load_version(tracker, name, c.version, str(Path(d) / role))
        seconds["load_models"] = time.perf_counter() - t
        classes = models["challenger"][1]
        if set(classes) != set(models["champion"][1]):
            raise PromotionError(
                f"the two versions know different classes: v{challenger.version} "
                f"{sorted(classes)}, v{champion.version} {sorted(models['champion'][1])}; "
                f"nothing moved")
        unknown = sorted(set(images.labels) - set(classes))
        if unknown:
            raise PromotionError(f"{images.source} has classes the models do not know: "
                                 f"{', '.join(unknown)} (they know {', '.join(classes)}); "
                                 f"nothing moved")
        echo(f"  scoring {len(images.paths):,} images with v{challenger.version} and "
             f"v{champion.version} ...")
        t = time.perf_counter()
        preds = {role: classify(m, images.paths, batch_size) for role, (m, _) in models.items()}
        seconds["scoring"] = time.perf_counter() - t
    left_out = [(p, ea or eb) for p, ea, eb in zip(images.paths, preds["challenger"][1],
                                                    preds["champion"][1]) if ea or eb]
    keep = [i for i, (ea, eb) in enumerate(zip(preds["challenger"][1], preds["champion"][1]))
            if not (ea or eb)]
    if not keep:
        raise PromotionError(f"none of the {len(images.paths):,} images of {images.source} "
                             f"could be read (first: {left_out[0][0]}: {left_out[0][1]}); "
                             f"nothing moved")
    from components.evaluation.paired import power_line

    echo(f"  {power_line(len(keep), decide_kw['confidence'])}")
    lookup = {c: i for i, c in enumerate(classes)}
    t = time.perf_counter()
    paired = decide([lookup[images.labels[i]] for i in keep],
                    [lookup[preds["challenger"][0][i]] for i in keep],
                    [lookup[preds["champion"][0][i]] for i in keep], len(classes), f1_average,
                    force=force, **decide_kw)
    seconds["decision"] = time.perf_counter() - t
    reason = paired.reason
    if force and data is None and not same_test_images(challenger, champion):
        reason += "; the champion was tested on other images (it may have trained on these)"
    return PromotionResult(paired.promote, reason, challenger, champion, paired=paired,
                           images=images, left_out=left_out, seconds=seconds,
                           predictions=_predictions_frame(images, preds))


def _predictions_frame(images: ScoredImages, preds: dict):
    import pandas as pd

    frame = pd.DataFrame({
        "path": images.paths, "label": images.labels,
        "challenger_prediction": preds["challenger"][0],
        "champion_prediction": preds["champion"][0],
        "error": [ea or eb for ea, eb in zip(preds["challenger"][1], preds["champion"][1])]})
    frame["challenger_correct"] = frame.challenger_prediction == frame.label
    frame["champion_correct"] = frame.champion_prediction == frame.label
    return frame


# ----------------------------------------------------------------------------- the record

def _experiment_of(tracker: Tracker, c: Candidate, fallback: str) -> str:
    if c.run_id:
        try:
            return tracker.client.get_run(c.run_id).info.experiment_id
        except MlflowException:
            pass
    return tracker.ensure_experiment(fallback)


def _note(name: str, r: PromotionResult, dry_run: bool) -> str:
    champ = f"v{r.champion.version}" if r.champion else "no champion"
    verdict = f"dry run, would {'promote' if r.promote else 'reject'}" if dry_run else r.decision
    lines = [f"**Promotion of {name} v{r.challenger.version} over {champ}: {verdict}**", "",
             f"- Reason: {r.reason}"]
    if r.paired is not None:
        p = r.paired
        lines += [f"- Images: {p.n:,} from {r.images.source} (fingerprint "
                  f"`{r.images.fingerprint[:12]}`)",
                  f"- {p.average} F1: challenger {p.f1_challenger:.4f}, champion "
                  f"{p.f1_champion:.4f}, difference {p.difference:+.4f}, {p.confidence:.0%} "
                  f"interval {p.interval()} ({p.resamples:,} paired resamples, seed {p.seed})",
                  f"- McNemar exact: {p.challenger_only} images only the challenger gets "
                  f"right, {p.champion_only} only the champion; p = {p.mcnemar_p:.4g}",
                  f"- {p.power_line()}",
                  "- Artifacts: `promotion/predictions.csv` (both models, every image), "
                  "`promotion/bootstrap.png`, `promotion/decision.json`"]
    return "\n".join(lines) + "\n"


def record_promotion(tracker: Tracker, experiment_id: str, name: str, r: PromotionResult, *,
                     dry_run: bool, force: bool, settings: dict) -> str:
    """The promotion run: both versions, the images, both models' per-image predictions,
    the 2x2 table, the p-value, the interval, the decision and its reason."""
    import matplotlib.pyplot as plt

    from components.evaluation.paired import plot_bootstrap

    champ = r.champion.version if r.champion else ""
    run_id = tracker.create_run(
        experiment_id, f"promote v{r.challenger.version} vs v{champ or '-'}",
        {ROLE_TAG: ROLE, MODEL_NAME_TAG: name, "promotion.decision":
            ("would promote" if r.promote else "rejected") if dry_run else r.decision,
         "promotion.reason": r.reason[:5000], "promotion.dry_run": str(dry_run).lower(),
         NOTE_TAG: _note(name, r, dry_run)})
    try:
        params = {"model_name": name, "challenger_version": r.challenger.version,
                  "champion_version": champ, "forced": force, "dry_run": dry_run, **settings}
        if r.images is not None:
            params.update(data_source=r.images.source, data_location=r.images.location,
                          data_fingerprint=r.images.fingerprint,
                          from_test_split=r.images.from_test_split,
                          images_left_out=len(r.left_out))
        if r.paired is not None:
            p = r.paired
            params.update(rule=p.rule, threshold=p.threshold, f1_average=p.average,
                          classes=",".join(sorted(set(r.images.labels))))
        tracker.log_params(run_id, params)
        if r.paired is not None:
            _record_evidence(tracker, run_id, name, r)
            fig = plot_bootstrap(r.paired, f"{name}: v{r.challenger.version} vs v{champ}")
            tracker.log_figure(run_id, fig, "promotion/bootstrap.png")
            plt.close(fig)
        tracker.end_run(run_id, "FINISHED")
    except BaseException:
        try:
            tracker.end_run(run_id, "FAILED")
        except Exception:  # the store itself may be what failed
            pass
        raise
    return run_id


def _record_evidence(tracker: Tracker, run_id: str, name: str, r: PromotionResult) -> None:
    import pandas as pd

    p = r.paired
    tracker.log_metrics(run_id, {
        "images": p.n, "f1_difference": p.difference, "ci_low": p.ci_low, "ci_high": p.ci_high,
        "mcnemar_p": p.mcnemar_p, "both_right": p.both_right,
        "challenger_only_right": p.challenger_only, "champion_only_right": p.champion_only,
        "both_wrong": p.both_wrong, "detectable_difference": p.detectable,
        **{f"seconds_{k}": v for k, v in r.seconds.items()}})
    dataset = f"{name}-promotion-images"
    for role, c, f1 in (("challenger", r.challenger, p.f1_challenger),
                        ("champion", r.champion, p.f1_champion)):
        if c.model_id:   # MLflow's lineage: this model's F1 on these images
            tracker.log_model_metrics(run_id, c.model_id, {f"{role}_f1": f1}, dataset,
                                      r.images.fingerprint)
        else:
            tracker.log_metrics(run_id, {f"{role}_f1": f1})
    frame = pd.DataFrame({"path": r.images.paths, "label": r.images.labels})
    tracker.log_datasets(run_id, [(dataset, "evaluation", frame)], r.images.location,
                         r.images.fingerprint)
    with tempfile.TemporaryDirectory() as d:
        r.predictions.to_csv(Path(d) / "predictions.csv", index=False)
        frame.to_csv(Path(d) / "images.csv", index=False)
        (Path(d) / "decision.json").write_text(json.dumps(
            {**p.as_dict(), "promote": r.promote, "reason": r.reason,
             "images_fingerprint": r.images.fingerprint, "images_source": r.images.source,
             "left_out": r.left_out[:1000]}, indent=1))
        for f in ("predictions.csv", "images.csv", "decision.json"):
            tracker.log_artifact(run_id, Path(d) / f, "promotion")
    tracker.log_text(run_id, "\n".join(f"{k}\t{v}" for k, v in r.left_out) or "(none)\n",
                     "promotion/left_out.tsv")


def _tag_versions(tracker: Tracker, name: str, r: PromotionResult) -> None:
    """Each version's page shows its latest decision and the run that holds the evidence."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {"promotion.run_id": r.run_id or "", "promotion.time": stamp,
              "promotion.challenger_version": r.challenger.version,
              "promotion.champion_version": r.champion.version if r.champion else "",
              "promotion.reason": r.reason[:5000]}
    if r.paired is not None:
        common.update({"promotion.p_value": f"{r.paired.mcnemar_p:.4g}",
                       "promotion.interval": f"{r.paired.interval()} at "
                                             f"{r.paired.confidence:.0%}",
                       "promotion.f1_difference": f"{r.paired.difference:+.4f}"})
    roles = [(r.challenger.version, "challenger", r.decision)]
    if r.champion is not None and r.champion.version != r.challenger.version:
        kept = f"replaced by v{r.challenger.version}" if r.applied else \
            f"kept (v{r.challenger.version} rejected)"
        roles.append((r.champion.version, "champion", kept))
    for version, role, decision in roles:
        for k, v in {**common, "promotion.role": role, "promotion.decision": decision}.items():
            tracker.client.set_model_version_tag(name, version, k, str(v))


# ----------------------------------------------------------------------------- promote

_FAILURES = (MlflowException, RequestException)


def promote(tracker: Tracker, name: str, version: str | None = None, *,
            data: str | None = None, confidence: float = 0.95, min_gain: float = 0.0,
            non_inferior: float | None = None, resamples: int = DEFAULT_RESAMPLES,
            seed: int = 0, force: bool = False, dry_run: bool = False,
            echo: Echo = lambda line: None, experiment_name: str = "visiontune",
            batch_size: int = 64) -> PromotionResult:
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
        result = _compare(tracker, name, challenger, champion, data, force, echo, decide_kw,
                          average, batch_size)
        result.experiment_id = _experiment_of(tracker, challenger, experiment_name)
        settings = {**decide_kw, "min_f1_gain": min_gain, "non_inferior_margin": non_inferior,
                    "data": data or "",
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
                                                 NOTE_TAG: _note(name, result, dry_run)})
            _tag_versions(tracker, name, result)
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
