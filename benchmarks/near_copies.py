"""Near-copies: what each pHash distance catches, what it merges, and what a split by groups
does to class balance. The numbers behind data.near_copy_distance's default (docs/data.md).

1. Photo-like images (a smooth colour field and shapes with mild noise, 128-256 px, JPEG
   quality 90; --photos of them, written under a temporary folder) and a near-copy of each:
   resized to 90% and saved again at JPEG quality 70. Per distance 0..8: how many of the
   near-copies are within it of their original, with the hashes taken each way the code
   takes them: both from the decoded files (data.preprocess=false), both from a store of
   decoded rows (32 px RGB, 32 px grey, 128 px RGB), the original from a 32 px store and the
   copy by `image_signatures` (what promote compares); and how many pairs of the distinct
   originals the same distance would wrongly link.
2. The built-in digits (1,797 distinct 8x8 handwritten digits) decoded into a store at
   32 px x 1 channel, as the default pipeline does: per distance, the pairs within it (all
   pairs compared; the banded search must find the same), those across two classes, and the
   groups that grouping forms (near-copy merges, images in groups of 2+, the largest group).
3. Class balance of the split by groups on the digits (val 0.15, test 0.15), over --seeds
   split seeds: each class's val and test counts against the stratified expectation
   (n_class x fraction): the largest and the mean absolute deviation, in images.

    python benchmarks/near_copies.py                 # about 1 minute on 2 cores
    python benchmarks/near_copies.py --photos 1000 --seeds 20

Results: benchmarks/results/near_copies.json (not committed).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from components.data import (
    group_copies,
    image_signatures,
    index_image_folder,
    split_dataset,
    validate_images,
    write_digits_folder,
)
from components.data.copies import near_pairs
from components.data.validate import DecodeTarget

RESULTS = Path(__file__).resolve().parent / "results"
DISTANCES = range(9)


def photo(seed: int) -> Image.Image:
    """A photo-like RGB image of 128-256 px a side (the texture a resize or a JPEG pass
    changes: smooth gradients, edges, grain)."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(128, 257, 2))
    field = rng.integers(40, 200, (3, 4, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        r = rng.uniform(0.05, 0.2) * min(w, h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [cx - r, cy - r * rng.uniform(0.6, 1.4), cx + r, cy + r * rng.uniform(0.6, 1.4)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return ImageChops.add(img, Image.effect_noise((w, h), 4).convert("RGB"), 1.0, -128)


def reencoded(jpeg: bytes) -> bytes:
    """The near-copy: 90% of the size, saved again at quality 70."""
    with Image.open(io.BytesIO(jpeg)) as img:
        small = img.resize((round(img.width * 0.9), round(img.height * 0.9)),
                           Image.Resampling.BILINEAR)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=70)
    return out.getvalue()


def write_photos(root: Path, n: int) -> tuple[list[str], list[str]]:
    """root/original/NNNN.jpg and root/reencoded/NNNN.jpg."""
    originals, copies = [], []
    for i in range(n):
        buf = io.BytesIO()
        photo(i).save(buf, "JPEG", quality=90)
        for folder, data, out in (("original", buf.getvalue(), originals),
                                  ("reencoded", reencoded(buf.getvalue()), copies)):
            path = root / folder / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            out.append(str(path))
    return originals, copies


def hashes_by_path(root: Path, store: Path, size: int | None, channels: int) -> dict:
    """Each image's pHash as validate takes it: from the file (size None) or a store."""
    target = None if size is None else DecodeTarget(str(store), size, channels)
    v = validate_images(index_image_folder(root), decode_to=target, min_per_class=1)
    return dict(zip(v.index.paths, v.phashes))


def bits(a: str | None, b: str | None) -> int:
    return 64 if not (a and b) else (int(a, 16) ^ int(b, 16)).bit_count()


def measure_photos(n: int, tmp: Path) -> dict:
    originals, copies = write_photos(tmp / "photos", n)
    ways = {"file": (None, 3), "store 32 px RGB": (32, 3), "store 32 px grey": (32, 1),
            "store 128 px RGB": (128, 3)}
    found = {name: hashes_by_path(tmp / "photos", tmp / "store", size, c)
             for name, (size, c) in ways.items()}
    _, signed = image_signatures(copies)
    dist = {name: [bits(h[o], h[c]) for o, c in zip(originals, copies)]
            for name, h in found.items()}
    dist["store 32 px RGB vs image_signatures"] = [
        bits(found["store 32 px RGB"][o], s) for o, s in zip(originals, signed)]
    values = np.array([int(found["file"][o], 16) for o in originals], np.uint64)
    pair_bits = np.bitwise_count(values[:, None] ^ values[None, :])[np.triu_indices(n, 1)]
    return {"n": n,
            "caught": {name: {d: int(sum(x <= d for x in v)) for d in DISTANCES}
                       for name, v in dist.items()},
            "largest_distance": {name: int(max(v)) for name, v in dist.items()},
            "distinct_pairs_linked": {d: int((pair_bits <= d).sum()) for d in DISTANCES},
            "distinct_pairs": int(len(pair_bits)),
            "closest_distinct_pair": int(pair_bits.min())}


def measure_digits(tmp: Path) -> tuple[dict, object]:
    root = write_digits_folder(tmp / "cache")
    v = validate_images(index_image_folder(root), decode_to=DecodeTarget(str(tmp / "store"),
                                                                         32, 1))
    values = np.array([int(h, 16) for h in v.phashes], np.uint64)
    labels = np.array(v.index.labels)
    iu = np.triu_indices(len(values), 1)
    pair_bits = np.bitwise_count(values[:, None] ^ values[None, :])[iu]
    cross = labels[iu[0]] != labels[iu[1]]
    # How alike linked digits look: mean absolute pixel difference at 8 x 8, 0..255.
    pixels = np.stack([np.asarray(Image.open(p), np.int16) for p in v.index.paths])
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(values), (2, 20000))
    same = (labels[a] == labels[b]) & (a != b)
    random_same_class = float(np.median(np.abs(pixels[a[same]] - pixels[b[same]])
                                        .mean(axis=(1, 2))))
    rows = {}
    for d in DISTANCES:
        banded = {(min(a, b), max(a, b)) for pa, pb in near_pairs(np.unique(values), d)
                  for a, b in zip(pa.tolist(), pb.tolist())} if d else set()
        copies = group_copies(v.digests, v.phashes, d)
        sizes = np.bincount(copies.groups)
        linked = pair_bits <= d
        rows[d] = {"pairs": int(linked.sum()),
                   "median_pixel_difference": round(float(np.median(np.abs(
                       pixels[iu[0][linked]] - pixels[iu[1][linked]]).mean(axis=(1, 2)))), 1)
                   if linked.any() else None,
                   "cross_class_pairs": int(((pair_bits <= d) & cross).sum()),
                   "banded_pairs": len(banded), "groups": len(copies.keys),
                   "near_copy_merges": copies.near_copies,
                   "images_in_multi_image_groups": copies.in_multi_image_groups(),
                   "largest_group": int(sizes.max())}
    return {"images": len(values), "distinct_hashes": int(len(np.unique(values))),
            "random_same_class_pixel_difference": round(random_same_class, 1),
            "rows": rows}, v


def measure_balance(images, seeds: int, val: float = 0.15, test: float = 0.15) -> dict:
    labels = np.array(images.index.labels)
    per_class = np.bincount(labels)
    out = {}
    for split, share in (("val", val), ("test", test)):
        devs = []
        for seed in range(seeds):
            m = split_dataset(images, val, test, seed)
            _, got = m.subset(split)
            devs.append(np.abs(np.bincount(got, minlength=len(per_class))
                               - per_class * share))
        devs = np.array(devs)
        out[split] = {"expected_per_class": [round(float(x), 1) for x in per_class * share],
                      "max_abs_deviation": round(float(devs.max()), 1),
                      "mean_abs_deviation": round(float(devs.mean()), 2),
                      "seed0_counts": [int(x) for x in np.bincount(
                          np.array(split_dataset(images, val, test, 0).subset(split)[1]),
                          minlength=len(per_class))]}
    return {"seeds": seeds, **out}


def print_tables(out: dict) -> None:
    p = out["photos"]
    print(f"\n  photo-like near-copies caught (of {p['n']}), by distance")
    print("  " + f"{'hashes':40}" + "".join(f"{d:>6}" for d in DISTANCES) + "   max")
    for name, caught in p["caught"].items():
        print(f"  {name:40}" + "".join(f"{caught[d]:>6}" for d in DISTANCES)
              + f"{p['largest_distance'][name]:>6}")
    print(f"  {'distinct pairs linked (of ' + format(p['distinct_pairs'], ',') + ')':40}"
          + "".join(f"{p['distinct_pairs_linked'][d]:>6}" for d in DISTANCES))
    g = out["digits"]
    print(f"\n  digits: {g['images']} images, {g['distinct_hashes']} distinct hashes")
    cols = ["pairs", "cross_class_pairs", "banded_pairs", "groups", "near_copy_merges",
            "images_in_multi_image_groups", "largest_group", "median_pixel_difference"]
    print("  d " + "".join(f"{c:>{len(c) + 2}}" for c in cols))
    for d, row in g["rows"].items():
        print(f"  {d} " + "".join(f"{str(row[c]):>{len(c) + 2}}" for c in cols))
    print("  (median_pixel_difference: of the linked pairs, mean absolute difference at 8 x 8 "
          f"in 0..255; two random digits of one class: {g['random_same_class_pixel_difference']})")
    b = out["balance"]
    print(f"\n  class balance over {b['seeds']} split seeds (deviation from stratified, "
          "images per class)")
    for split in ("val", "test"):
        s = b[split]
        print(f"  {split:5} max {s['max_abs_deviation']}, mean {s['mean_abs_deviation']} "
              f"(expected about {s['expected_per_class'][0]} per class; seed 0: "
              f"{s['seed0_counts']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=300, help="photo-like originals")
    ap.add_argument("--seeds", type=int, default=10, help="split seeds for the balance")
    args = ap.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = {"command": " ".join(["python", "benchmarks/near_copies.py", *sys.argv[1:]]),
               "photos": measure_photos(args.photos, Path(tmp))}
        out["digits"], digits = measure_digits(Path(tmp))
        out["balance"] = measure_balance(digits, args.seeds)
    out["seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "near_copies.json").write_text(json.dumps(out, indent=1))
    print_tables(out)
    print(f"\n  {out['seconds']} s; results in {RESULTS / 'near_copies.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
