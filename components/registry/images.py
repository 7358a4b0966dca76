"""The images `visiontune promote` scores: the challenger's test split (read back from its
run's manifest) or `--data`, minus every image either model trained or was selected on.

A test image only measures what a model learned when the model never saw it. Each version's
run keeps its split manifest with every image's sha256 and perceptual hash; an image to score
whose bytes, or whose near-copy (a re-save, a resize), is in either version's train or val
split is dropped before anything is scored, and the record says how many and why. Two runs
over a folder that grew are then comparable: the champion's test images stay test images
(the split is assigned by content), and the challenger's new training images are dropped."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from components.errors import UserError
from components.tracking import Tracker, first_line

# the splits a model learned from (train) or was chosen on (val)
SEEN_SPLITS = ("train", "val")


class PromotionError(UserError, RuntimeError):
    """Promote cannot compare: images that cannot be read, classes that differ, a model that
    does not load, too few images neither model has seen. Nothing moved."""


@dataclass(frozen=True)
class ScoredImages:
    paths: list[str]
    labels: list[str]          # class names
    fingerprint: str           # of the images as found (before any was dropped)
    source: str                # for people: where the images come from
    location: str              # their folder, CSV or the run's data location
    from_test_split: bool      # False: `--data`
    digests: list[str | None] = field(default_factory=list)
    phashes: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class SeenImages:
    """What one version trained or was selected on, by content."""

    version: str
    digests: frozenset[str]
    phashes: tuple[str, ...]
    known: bool                # False: its run's manifest predates digests (or is missing)


def manifest_of_run(tracker: Tracker, run_id: str | None, version: str):
    """The split manifest the pipeline run that registered `version` logged (data/)."""
    from components.data.split import SplitManifest

    hint = "score both models on labelled images with --data PATH"
    if not run_id:
        raise PromotionError(f"version {version} has no run: its splits are unknown; {hint}")
    # Listed first: a run without a manifest lists nothing, a failing server raises.
    if not any(a.path.endswith("manifest.json")
               for a in tracker.client.list_artifacts(run_id, "data")):
        raise PromotionError(f"version {version}'s run {run_id} has no split manifest "
                             f"(data/manifest.json): {hint}")
    with tempfile.TemporaryDirectory() as d:
        try:
            folder = tracker.client.download_artifacts(run_id, "data", d)
            return SplitManifest.load(folder)
        except (OSError, KeyError, ValueError) as e:
            raise PromotionError(f"version {version}'s run {run_id} has no split manifest "
                                 f"(data/manifest.json: {first_line(e)}); {hint}") from None


def images_of_manifest(manifest, version: str, run_id: str) -> ScoredImages:
    """The test split of the run that registered the version."""
    rows = [i for i, s in enumerate(manifest.splits) if s == "test"]
    return ScoredImages(
        [manifest.paths[i] for i in rows], [manifest.classes[manifest.labels[i]] for i in rows],
        manifest.test_fingerprint or manifest.fingerprint,
        f"the test split of version {version}'s run {run_id}",
        manifest.test_root or manifest.root, True)


def images_of_path(path: str) -> ScoredImages:
    """Every readable image of a labelled folder or CSV manifest (a CSV with a `split` column:
    its test rows only)."""
    from components.data.ingest import index_images
    from components.data.split import compute_fingerprint
    from components.data.validate import validate_images

    try:
        images = validate_images(index_images(path, split="test"), "skip", 1)
    except (OSError, ValueError) as e:   # missing, unreadable, no two classes of images
        raise PromotionError(f"--data {path}: {first_line(e)}; nothing moved") from None
    idx = images.index
    fp = compute_fingerprint(idx.root, idx.paths, images.digests, idx.labels,
                             ["eval"] * len(idx), idx.classes)
    return ScoredImages(list(idx.paths), [idx.classes[y] for y in idx.labels], fp,
                        f"--data {path}", idx.root, False)


def seen_by(manifest, version: str) -> SeenImages:
    """The train and val images of a version's manifest, by content."""
    rows = [i for i, s in enumerate(manifest.splits) if s in SEEN_SPLITS]
    digests = list(getattr(manifest, "digests", []) or [])
    phashes = list(getattr(manifest, "phashes", []) or [])
    if not rows or len(digests) != len(manifest.paths):
        return SeenImages(version, frozenset(), (), False)
    return SeenImages(version, frozenset(digests[i] for i in rows),
                      tuple(phashes[i] for i in rows if i < len(phashes) and phashes[i]), True)


def with_signatures(images: ScoredImages) -> ScoredImages:
    """The images with each file's sha256 and perceptual hash, read now (the files are what
    the models will classify, whatever a manifest said about them once)."""
    from dataclasses import replace

    from components.data import image_signatures

    digests, phashes = image_signatures(images.paths)
    return replace(images, digests=list(digests), phashes=list(phashes))


# The manifests' hashes come from the decoded store at each run's training size, the scored
# images' from a 64 px decode: the same picture can differ by 2 more bits across the two
# decodes (benchmarks/near_copies.py: 1 re-encode in 1,000 missed at the split's distance,
# none at 2 more). Dropping a borderline image only costs evidence; keeping a copy biases it.
CROSS_DECODE_BITS = 2


def drop_seen(images: ScoredImages, seen: list[SeenImages], max_distance: int
              ) -> tuple[list[int], list[tuple[str, str]]]:
    """(indices of the images no version saw, [(path, why) for the dropped ones]): an image
    whose bytes are one a version trained or was selected on, or whose perceptual hash lies
    within `max_distance` (+ CROSS_DECODE_BITS) bits of one."""
    from components.data import near_copy_index

    reach = max_distance + CROSS_DECODE_BITS if max_distance > 0 else 0
    index = {s.version: near_copy_index(list(s.phashes), reach) for s in seen}
    keep, dropped = [], []
    for i, (path, digest, phash) in enumerate(zip(images.paths, images.digests,
                                                  images.phashes)):
        why = None
        for s in seen:
            if digest is not None and digest in s.digests:
                why = f"same bytes as a train/val image of v{s.version}"
            elif phash and reach > 0 and index[s.version].matches(phash):
                why = f"near-copy of a train/val image of v{s.version}"
            if why:
                break
        if why:
            dropped.append((path, why))
        else:
            keep.append(i)
    return keep, dropped


def unknown_line(seen: list[SeenImages]) -> str | None:
    """Versions whose training images are not known by content (registered before digests
    were kept): nothing they trained on can be excluded."""
    unknown = [f"v{s.version}" for s in seen if not s.known]
    if not unknown:
        return None
    return (f"  note: the training images of {' and '.join(unknown)} are not known by content "
            f"(registered before manifests kept digests): images they trained on cannot be "
            f"excluded")
