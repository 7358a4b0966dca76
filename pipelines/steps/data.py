"""The data steps: ingest, validate (decoding once per sweep), split (by groups of copies),
and their record."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.cluster import ray_map, ray_session
from components.config import Config
from components.data.builtin import write_digits_folder
from components.data.ingest import ImageIndex, index_images
from components.data.preprocessed import DecodedImages, open_store
from components.data.split import (
    SplitManifest,
    drop_near_copies_of_test,
    min_images_per_class,
    split_dataset,
)
from components.data.validate import DecodeTarget, ValidatedImages, validate_images
from components.training.metrics import check_average
from pipelines.console import Progress, console

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)


@dataclass(frozen=True)
class Ingested:
    """ingest's output: the image files under data.path, and under data.test_path if set."""

    root: str
    index: ImageIndex
    test_index: ImageIndex | None


@dataclass(frozen=True)
class Validated:
    """validate's output: the images that can be read, and the stores they were decoded into
    once for the sweep (none with data.preprocess=false)."""

    images: ValidatedImages
    test_images: ValidatedImages | None
    stores: tuple[DecodedImages, ...]


@dataclass(frozen=True)
class PreparedData:
    """What the data steps hand on: the split, and where its images lie decoded (trials and
    the test evaluation read them there instead of decoding again)."""

    manifest: SplitManifest
    stores: tuple[DecodedImages, ...] = ()


def prepare_data(cfg: Config, record) -> PreparedData:
    """ingest -> validate -> split, each a step of the run. A resumed run whose split is done
    reads back the manifest it logged and the stores its tag names, without ingesting."""
    if record.step_done("split"):
        return record.read_back("split", lambda: _load_split(record))
    validated = validate(cfg, ingest(cfg, record), record)
    manifest = record.run_step("split", lambda: split(cfg, validated),
                               save=lambda m: _save_split(m, record))
    return PreparedData(manifest, validated.stores)


def ingest(cfg: Config, record) -> Ingested:
    """The image files of data.path (the built-in digits without one) and data.test_path."""
    d = cfg.data
    with record.step("ingest"):
        root = d.path or str(write_digits_folder(d.cache_dir))
        index = index_images(root)
        log.info(f"  {len(index)} image files in {len(index.classes)} classes under {root}")
        test_index = index_images(d.test_path) if d.test_path else None
        if test_index is not None:
            log.info(f"  test set: {len(test_index)} image files in "
                     f"{len(test_index.classes)} classes under {d.test_path}")
    return Ingested(root, index, test_index)


def validate(cfg: Config, ingested: Ingested, record) -> Validated:
    """The images that can be read, each decoded once into the sweep's store when
    data.preprocess is on; the skipped ones listed on the run."""
    d, index, test_index = cfg.data, ingested.index, ingested.test_index
    with record.step("validate"):
        # Known only now, and cheaper to refuse here than in every trial.
        check_average(cfg.evaluation.average, len(index.classes))
        # With a separate test set, data.path only has to fill train and val.
        images = validated_images(cfg, index, min_images_per_class(
            d.val_fraction, d.test_fraction if test_index is None else d.val_fraction))
        test_images = None if test_index is None else validated_images(cfg, test_index, 1)
        if test_images is not None:   # no picture of the test set is trained on
            images = drop_near_copies_of_test(images, test_images, d.near_copy_distance)
        stores = tuple(v.decoded for v in (images, test_images)
                       if v is not None and v.decoded is not None)
        _log_decoded(stores, record)
        skipped = images.skipped + (test_images.skipped if test_images else [])
        for path, reason in skipped[:10]:
            log.warning(f"  skipped {path}: {reason}")
        if len(skipped) > 10:
            log.warning(f"  ... and {len(skipped) - 10} more skipped")
        record.log_metrics({"data_num_images": len(images.index) + (
            len(test_images.index) if test_images else 0), "data_num_skipped": len(skipped)})
        if skipped:
            record.log_text("\n".join(f"{p}\t{r}" for p, r in skipped),
                            "data/skipped_images.tsv")
    return Validated(images, test_images, stores)


def split(cfg: Config, validated: Validated) -> SplitManifest:
    """train/val/test by content hash, each group of copies kept in one split."""
    d = cfg.data
    split_seed = cfg.seed if d.split_seed is None else d.split_seed
    manifest = split_dataset(validated.images, d.val_fraction, d.test_fraction, split_seed,
                             validated.test_images, d.near_copy_distance)
    log.info(f"  split {manifest.counts()} (split seed {split_seed}"
             + (f", test split from {d.test_path}" if d.test_path else "")
             + f"), fingerprint {manifest.fingerprint[:12]}, test images "
             f"{manifest.test_fingerprint[:12]}")
    log.info(copies_line(manifest))
    return manifest


def _save_split(manifest: SplitManifest, record) -> None:
    """The manifest (data/ artifacts), its fingerprints and the split's dataset inputs."""
    record.set_tags({"visiontune.data_fingerprint": manifest.fingerprint,
                     "visiontune.test_fingerprint": manifest.test_fingerprint})
    record.log_params({"data_fingerprint": manifest.fingerprint,
                       "data_classes": ",".join(manifest.classes)})
    c = manifest.copies
    if c:
        record.log_metrics({"data_copy_groups": c["groups"],
                            "data_exact_copies": c["exact_copies"],
                            "data_near_copies": c["near_copies"],
                            "data_label_conflicts": c["label_conflicts"]})
    with tempfile.TemporaryDirectory() as d:
        for path in manifest.save(d):
            record.log_artifact(path, "data")
    log_split_datasets(manifest, record)


def copies_line(manifest: SplitManifest) -> str:
    """What grouping found, in one console line."""
    c = manifest.copies
    near = (f"{c['near_copies']:,} near-copies (pHash <= {c['near_copy_distance']} bits)"
            if c["near_copy_distance"] else "near-copies not looked for "
            "(data.near_copy_distance=0)")
    dropped = c.get("near_copies_of_test_dropped", 0)
    return (f"  copies: {len(manifest.paths):,} images in {c['groups']:,} groups: "
            f"{c['exact_copies']:,} exact copies, {near}, {c['label_conflicts']:,} label "
            f"conflicts" + (f" ({c['label_conflict_files']:,} files left out)"
                            if c["label_conflicts"] else "")
            + (f", {dropped:,} near-copies of test images left out" if dropped else "")
            + "; each group kept in one split")


def _load_split(record) -> PreparedData:
    """The manifest a run saved, and the stores of decoded images its tag names (the stores
    are not saved with the manifest: they lie under ray.storage_path, shared by runs)."""
    with tempfile.TemporaryDirectory() as d:
        record.download("data", d)
        manifest = SplitManifest.load(Path(d) / "data")
    names = record.run().data.tags.get(DECODED_TAG, "")
    stores = tuple(s for s in map(open_store, filter(None, names.split("\n"))) if s is not None)
    log.info(f"  data: the run's manifest {manifest.counts()}, fingerprint "
             f"{manifest.fingerprint[:12]}")
    return PreparedData(manifest, stores)


DECODED_TAG = "visiontune.decoded_images"   # the stores of decoded images, one per line


def validated_images(cfg: Config, index: ImageIndex, min_per_class: int, *,
                     quiet: bool = False) -> ValidatedImages:
    """The readable images of `index`; with data.preprocess, decoded once into a store (or
    found in one an earlier run built). `quiet`: without the progress lines."""
    d = cfg.data
    target = None
    if d.preprocess:
        # On a cluster the images are decoded by Ray tasks on every node.
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        target = DecodeTarget(cfg.ray.storage_path, d.image_size, d.channels,
                              cluster=(lambda: _cluster_session(cfg)) if address else None)
    return validate_images(
        index, d.on_bad_image, min_per_class,
        progress=None if quiet else Progress("  read" if target else "  checked", log=log),
        decode_to=target, decoding=None if quiet else Progress("  decoded", log=log))


@contextlib.contextmanager
def _cluster_session(cfg: Config):
    """The cluster's Ray for a step before the sweep (Ray's own output to a log), and the map
    that runs the decoding as Ray tasks on it."""
    ray_log = Path(tempfile.gettempdir()) / "visiontune" / "ray-data-step.log"
    ray_log.parent.mkdir(parents=True, exist_ok=True)
    with console.ray_output_to(ray_log), ray_session(cfg.ray.address, cfg.ray.num_cpus):
        yield ray_map


def _log_decoded(stores: tuple[DecodedImages, ...], record) -> None:
    for s in stores:
        size = f"{len(s.paths)} images at {s.image_size} px x {s.channels} channel(s)"
        if s.decoded:
            log.info(f"  decoded {size} once for the sweep into {s.location}")
        else:
            log.info(f"  reusing the decoded images of an earlier run: {s.location} ({size}; "
                     "nothing decoded)")
    if stores:
        record.set_tags({DECODED_TAG: "\n".join(s.location for s in stores)})
        record.log_metrics({"data_decoded_images": sum(s.decoded for s in stores)})


# The run page's "Datasets": one input per split, in MLflow's context words.
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
DIGEST_CHARS = 12  # the prefix of the data fingerprint the console shows too


def _dataset_base(manifest: SplitManifest) -> str:
    return manifest.root.rstrip("/").rsplit("/", 1)[-1] or "images"


def test_dataset_name(manifest: SplitManifest) -> str:
    """The test split's name as the run's datasets and the model's metrics name it."""
    return f"{_dataset_base(manifest)}-test"


def log_split_datasets(manifest: SplitManifest, record) -> None:
    """The split manifest's train/val/test rows (path, label) as the parent run's dataset
    inputs, named after the data folder, with the data fingerprint as their digest."""
    base = _dataset_base(manifest)
    datasets = []
    for split, context in DATASET_CONTEXTS.items():
        paths, labels = manifest.subset(split)
        frame = pd.DataFrame({"path": paths, "label": [manifest.classes[y] for y in labels]})
        datasets.append((f"{base}-{split}", context, frame))
    record.log_datasets(datasets, manifest.root, manifest.fingerprint[:DIGEST_CHARS],
                        targets="label")
