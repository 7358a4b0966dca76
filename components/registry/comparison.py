"""What `visiontune promote` compares: the two versions (their test images, by MLflow's
lineage or their fingerprint tags), the labelled images both models classify (the
challenger's test split, or `--data`, minus every image either model trained or was selected
on: `components.registry.images`), both registered models loaded as they are served, and the
paired decision over their per-image answers (`components.evaluation.paired.decide`).
Nothing here writes to MLflow: `promotion_record` records, `promotion` moves the aliases."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from components.evaluation.paired import PairedDecision, decide, derive_seed, min_images_line
from components.registry.images import (
    PromotionError,
    ScoredImages,
    SeenImages,
    drop_seen,
    images_of_manifest,
    images_of_path,
    manifest_of_run,
    seen_by,
    unknown_line,
    with_signatures,
)
from components.tracking import DATASET_DIGEST_CHARS, Tracker, first_line

TEST_METRIC = "test_f1"    # the LoggedModel metric whose dataset says which images were used
log = logging.getLogger(__name__)
__all__ = ["Candidate", "Evidence", "PromotionError", "PromotionResult", "ScoredImages",
           "candidate", "compare", "same_test_images"]


@dataclass(frozen=True)
class Evidence:
    """What promote needs of the images before it decides (registry.* in the config)."""

    min_images: int = 30           # fewest images neither model saw
    max_comparisons: int = 10      # comparisons on the same images before fresh ones
    near_copy_distance: int = 4    # pHash bits: a near-copy of a training image is dropped
    max_class_drop: float | None = None
    # earlier comparisons recorded on images with this fingerprint
    count_prior: Callable[[str], int] = field(default=lambda fingerprint: 0, compare=False)


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


@dataclass
class PromotionResult:
    promote: bool
    reason: str
    challenger: Candidate
    champion: Candidate | None
    applied: bool = False      # False on a dry run or when not promoted
    paired: PairedDecision | None = None
    images: ScoredImages | None = None
    left_out: list[tuple[str, str]] = field(default_factory=list)   # (path, why) unreadable
    dropped: list[tuple[str, str]] = field(default_factory=list)    # (path, why) seen
    comparison: int = 0        # this is comparison #N on these images
    class_names: list[str] = field(default_factory=list)   # the decision's class indices
    run_id: str | None = None
    experiment_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    predictions: Any = None    # DataFrame: path, label, both models' predictions, error
    awaiting: str | None = None   # who must approve the move ("any": anyone), if anyone

    @property
    def decision(self) -> str:
        """What the record says: "pending" between the verdict and the champion's move,
        "pending approval" until `visiontune approve` moves it."""
        if not self.promote:
            return "rejected"
        if self.applied:
            return "promoted"
        return "pending approval" if self.awaiting else "pending"


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


# ----------------------------------------------------------------------------- the models

def load_version(tracker: Tracker, name: str, version: str, dst: str):
    """The registered model as a pyfunc (its own preprocessing inside), and its classes."""
    import mlflow

    from components.inference.formats import check_model_format, class_names
    from components.serving import CODE_TAG, CodeMismatch, verify_code

    try:
        mv = tracker.client.get_model_version(name, version)
        local = tracker.download_model(f"models:/{name}/{version}", dst)
        try:
            verify_code(local, mv.tags.get(CODE_TAG), f"{name} version {version}")
        except CodeMismatch as e:
            raise PromotionError(f"{e}; nothing moved") from None
        info = mlflow.models.Model.load(local)
        check_model_format(info.metadata or {}, info.flavors)
        model = mlflow.pyfunc.load_model(local)
    except (MlflowException, OSError, ValueError, ImportError, RuntimeError) as e:
        raise PromotionError(f"cannot load {name} version {version}: {first_line(e)}; "
                             f"nothing moved") from None
    return model, class_names(model)


def classes_and_errors(model, paths: list[str], batch_size: int
                       ) -> tuple[list[str | None], list]:
    """(predicted class or None, error or None) per image: what promote scores."""
    from components.inference.local import ERROR, PREDICTION, predict_images
    from components.serving.image_classifier import is_missing

    frame = predict_images(model, list(paths), batch_size)
    errors = [None if is_missing(e) else str(e) for e in frame[ERROR]]
    preds = [None if e else str(p) for p, e in zip(frame[PREDICTION], errors)]
    return preds, errors


# ----------------------------------------------------------------------------- comparing

def compare(tracker: Tracker, name: str, challenger: Candidate, champion: Candidate | None,
            data: str | None, force: bool, decide_kw: dict, f1_average: str,
            batch_size: int, evidence: Evidence = Evidence()) -> PromotionResult:
    if champion is None:
        return PromotionResult(True, "no champion yet", challenger, None)
    if champion.version == challenger.version:
        return PromotionResult(False, f"version {challenger.version} already is the champion",
                               challenger, champion)
    t = time.perf_counter()
    manifests, missing = _manifests(tracker, challenger, champion)
    seen = [seen_by(m, c.version) if m is not None else SeenImages(c.version, frozenset(), (),
                                                                   False)
            for c, m in ((challenger, manifests[0]), (champion, manifests[1]))]
    refusal = _unknown_training_images(name, challenger, champion, data, force, seen)
    if refusal is not None:
        return refusal
    if data is None and manifests[0] is None:
        raise missing
    images = images_of_path(data) if data else images_of_manifest(
        manifests[0], challenger.version, challenger.run_id)
    if not images.paths:
        raise PromotionError(f"no images to score in {images.source}")
    comparison = evidence.count_prior(images.fingerprint) + 1
    log.info(f"  images: {len(images.paths):,} from {images.source} (fingerprint "
             f"{images.fingerprint[:12]}); comparison #{comparison} on these images")
    if comparison > evidence.max_comparisons and not force:
        raise PromotionError(
            f"these images were used in {comparison - 1} comparisons already "
            f"(registry.max_comparisons={evidence.max_comparisons}): every look at them spends "
            f"their evidence, and one of many challengers no better than the champion would "
            f"pass by chance; score on fresh labelled images with --data PATH; nothing moved")
    seconds = {"images": time.perf_counter() - t}
    # The models first: images of a class they do not know are the first thing to say.
    with _loaded(tracker, name, challenger, champion, images, seconds) as (models, classes):
        t = time.perf_counter()
        images, dropped = _unseen(images, seen, evidence)
        seconds["images"] += time.perf_counter() - t
        log.info(f"  scoring {len(images.paths):,} images with v{challenger.version} and "
                 f"v{champion.version} ...")
        t = time.perf_counter()
        preds = {role: classes_and_errors(m, images.paths, batch_size)
                 for role, m in models.items()}
        seconds["scoring"] = time.perf_counter() - t
    left_out = [(p, ea or eb) for p, ea, eb in zip(images.paths, preds["challenger"][1],
                                                    preds["champion"][1]) if ea or eb]
    keep = [i for i, (ea, eb) in enumerate(zip(preds["challenger"][1], preds["champion"][1]))
            if not (ea or eb)]
    if not keep:
        raise PromotionError(f"none of the {len(images.paths):,} images of {images.source} "
                             f"could be read (first: {left_out[0][0]}: {left_out[0][1]}); "
                             f"nothing moved")
    if decide_kw.get("non_inferior") is None:
        log.info(f"  {min_images_line(len(keep), decide_kw.get('confidence', 0.95))}")
    seed, seed_set = decide_kw.get("seed"), decide_kw.get("seed") is not None
    if not seed_set:   # the same comparison gets the same resamples, whoever runs it
        seed = derive_seed(name, challenger.version, champion.version, images.fingerprint)
    lookup = {c: i for i, c in enumerate(classes)}
    t = time.perf_counter()
    paired = decide([lookup[images.labels[i]] for i in keep],
                    [lookup[preds["challenger"][0][i]] for i in keep],
                    [lookup[preds["champion"][0][i]] for i in keep], len(classes), f1_average,
                    force=force, max_class_drop=evidence.max_class_drop,
                    **{**decide_kw, "seed": seed}, seed_set=seed_set)
    seconds["decision"] = time.perf_counter() - t
    reason = _name_classes(paired.reason, classes)
    if force and not all(s.known for s in seen) and not same_test_images(challenger, champion):
        reason += "; the champion was tested on other images (it may have trained on these)"
    return PromotionResult(paired.promote, reason, challenger, champion, paired=paired,
                           images=images, left_out=left_out, dropped=dropped,
                           comparison=comparison, seconds=seconds, class_names=list(classes),
                           predictions=_predictions_frame(images, preds))


def _manifests(tracker: Tracker, challenger: Candidate, champion: Candidate):
    """Both versions' split manifests (None where a version has none), and why the
    challenger's is missing (raised when its test split is what gets scored)."""
    found, missing = [], None
    for c in (challenger, champion):
        try:
            found.append(manifest_of_run(tracker, c.run_id, c.version))
        except PromotionError as e:
            missing = missing or e
            found.append(None)
    return tuple(found), missing


def _unknown_training_images(name: str, challenger: Candidate, champion: Candidate,
                             data: str | None, force: bool, seen: list[SeenImages]):
    """Versions registered before manifests kept digests: their training images cannot be
    excluded, so the old rule stands for the test split: both tested on the same images."""
    if data is not None or force or all(s.known for s in seen) or \
            same_test_images(challenger, champion):
        return None
    unknown = [f"v{c.version}" for c in (challenger, champion)
               if not (c.test_fingerprint or c.data_fingerprint)]
    if unknown:
        raise PromotionError(
            f"{' and '.join(unknown)} of {name} carry no test or data fingerprint (not "
            f"registered by the pipeline?): which images they were tested on is unknown; "
            f"score both on labelled images with --data PATH; nothing moved")
    return PromotionResult(
        False, "different test images (test/data fingerprints differ) and the training images "
               "of a version are not known by content: the champion may have trained on the "
               "challenger's test split; score both on the same labelled images with --data "
               "PATH (or --force)", challenger, champion)


def _unseen(images: ScoredImages, seen: list[SeenImages], evidence: Evidence
            ) -> tuple[ScoredImages, list[tuple[str, str]]]:
    """The images neither version trained or was selected on; too few of them is an error."""
    images = with_signatures(images)
    keep, dropped = drop_seen(images, [s for s in seen if s.known],
                              evidence.near_copy_distance)
    versions = " or ".join(f"v{s.version}" for s in seen)
    if dropped:
        near = sum(why.startswith("near-copy") for _, why in dropped)
        log.info(f"  dropped {len(dropped):,} of {len(images.paths):,} images that {versions} "
                 f"trained or was selected on ({len(dropped) - near} same bytes, {near} "
                 f"near-copies); {len(keep):,} remain")
    line = unknown_line(seen)
    if line:
        log.info(line)
    if len(keep) < evidence.min_images:
        raise PromotionError(
            f"only {len(keep):,} of the {len(images.paths):,} images of {images.source} were "
            f"seen by neither {versions} in training or selection ({len(dropped):,} dropped; "
            f"registry.min_images={evidence.min_images}): score both on fresh labelled "
            f"images with --data PATH; nothing moved")
    return replace(images, paths=[images.paths[i] for i in keep],
                   labels=[images.labels[i] for i in keep],
                   digests=[images.digests[i] for i in keep],
                   phashes=[images.phashes[i] for i in keep]), dropped


@contextlib.contextmanager
def _loaded(tracker: Tracker, name: str, challenger: Candidate, champion: Candidate,
            images: ScoredImages, seconds: dict):
    """Both registered models loaded as served ({role: model}), and the classes they know,
    checked against each other and the images' labels."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visiontune-promote-") as d:
        loaded = {role: load_version(tracker, name, c.version, str(Path(d) / role))
                  for role, c in (("challenger", challenger), ("champion", champion))}
        seconds["load_models"] = time.perf_counter() - t
        classes = loaded["challenger"][1]
        if set(classes) != set(loaded["champion"][1]):
            raise PromotionError(
                f"the two versions know different classes: v{challenger.version} "
                f"{sorted(classes)}, v{champion.version} {sorted(loaded['champion'][1])}; "
                f"nothing moved")
        unknown = sorted(set(images.labels) - set(classes))
        if unknown:
            raise PromotionError(f"{images.source} has classes the models do not know: "
                                 f"{', '.join(unknown)} (they know {', '.join(classes)}); "
                                 f"nothing moved")
        yield {role: m for role, (m, _) in loaded.items()}, classes


def _name_classes(reason: str, classes: list[str]) -> str:
    """The decision names a class by its index (the statistics know no names)."""
    import re

    return re.sub(r"class #(\d+)", lambda m: f"class {classes[int(m.group(1))]}", reason)


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
