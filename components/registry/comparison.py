"""What `visiontune promote` compares: the two versions (their test images, by MLflow's
lineage or their fingerprint tags), the labelled images both models classify (the
challenger's test split, or `--data`), both registered models loaded as they are served, and
the paired decision over their per-image answers (`components.evaluation.paired.decide`).
Nothing here writes to MLflow: `record` records, `promotion` moves the aliases."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from components.evaluation.paired import PairedDecision, decide
from components.tracking import DATASET_DIGEST_CHARS, Tracker, first_line

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

    from components.inference import check_model_format, class_names
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


def classify(model, paths: list[str], batch_size: int) -> tuple[list[str | None], list]:
    """(predicted class or None, error or None) per image."""
    from components.inference import ERROR, PREDICTION, predict_images
    from components.serving.image_classifier import is_missing

    frame = predict_images(model, list(paths), batch_size)
    errors = [None if is_missing(e) else str(e) for e in frame[ERROR]]
    preds = [None if e else str(p) for p, e in zip(frame[PREDICTION], errors)]
    return preds, errors


# ----------------------------------------------------------------------------- comparing

def compare(tracker: Tracker, name: str, challenger: Candidate, champion: Candidate | None,
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
