"""Photo-sized images: what decoding costs, per core, per rank and per sweep.

One run writes its own photo-like JPEGs (a smooth colour field and shapes with mild noise,
quality 90, 4:2:0) in two classes (warm- vs cool-coloured shapes, so the CNN learns
something), once, under benchmarks/results/photos_data/ (reused by later runs):

    large    N at 4000 x 3000 (12 MP, phone-photo size)
    small    N at 500 x 375
    resized  the large set pre-resized on disk to 64 x 64 PNG (what a user who pre-resizes
             has; resized with the project's own preprocessing, so its pixels are exactly the
             ones the sweep over `large` trains on)

and measures, in the same run:

1. decode + resize per core (this process, one thread), on a sample of each set, at 224 and
   64 px: the full decode (`to_array(open_image(data), 3, s)`) against the reduced-scale one
   (`to_array(open_image(data, s), 3, s)`, libjpeg's DCT scaling): images/s, the speedup and
   the mean absolute pixel difference between the two outputs (0..255 scale). The files are
   read into memory first: this is decoding, not disk.
2. the decode floor: one plain reduced-scale decode pass over all of `large` at 64 px with
   all cores (a process pool of os.cpu_count()), wall seconds (files read from disk).
3. the training data path per rank (no Ray): an `ImageDataset` over a subset of `large`
   (default 300 images) at 64 px through a DataLoader as a trial reads it, two epochs,
   images/s of each: without the cache (decodes every epoch), with the cache (decodes epoch 1,
   memory after) and from a store of decoded images (built first, as the validate step
   builds it: `validate_images(..., decode_to=DecodeTarget(...))`; its build time too).
4. the same 8-trial CNN sweep (grid: optimizer x initializer x lr, 2 epochs, 64 px, RGB,
   augment=none), each `visiontune run` as a subprocess in a fresh temporary directory
   (fresh Ray storage: nothing reused from an earlier run), timed from outside, over
   (A) `large` with data.preprocess=true (the default: decoded once, for the sweep),
   (B) `resized` (pre-resized on disk), and with --with-old
   (C) `large` with data.preprocess=false (each trial decodes its own rows; slow).
   Per sweep: wall seconds, the validate and tune steps' seconds (from the console), the
   images decoded (the parent run's `data_decoded_images` + each trial's last
   `images_decoded`: rank 0's train and val rows), the first trial's (the first to start)
   and the median trial's `time_to_first_batch_s`, test F1. Not counted in (C): the validate
   step's check, which decodes every file once at full scale, and the evaluate step's decode
   of the test split.

What the content does to speed: a reduced-scale decode skips most of the IDCT, colour
conversion and upsampling but still entropy-decodes every coefficient, so the more detail
(bytes) a file holds, the smaller its speedup. The noise sets it (--noise, its sigma; default
4: a 12 MP file of about 2.4 MB). Measured once on 2 cores, 12 MP to 224 px, full vs reduced:
sigma 0 (0.3 MB a file) 8.4x, 2 (1.3 MB) 6.0x, 4 (2.4 MB) 4.1x, 8 (3.9 MB) 3.4x,
12 (4.8 MB) 3.0x. Phone photos of 12 MP are often 3-5 MB. Pure noise would be slower still.

Then it checks the issue's criteria: reduced-scale decode + resize of 12 MP JPEGs to 224 px
at least 4x faster per core than full decode + resize; sweep (A) decodes each image once
(decodes == images); wall(A) <= wall(B) + 1.5 x the decode floor (both sides printed).

    python benchmarks/photos.py               # N = 2000 per set: roughly 10-15 minutes on
                                              # 2 cores the first time (writing the 2,000
                                              # 12 MP JPEGs, about 4.5 GB, takes about 5),
                                              # 6-10 minutes once they exist (an estimate:
                                              # only --quick was timed)
    python benchmarks/photos.py --with-old    # + sweep (C): about 5 minutes more
    python benchmarks/photos.py --n 500       # fewer images per set
    python benchmarks/photos.py --noise 8     # noisier, bigger JPEGs (another folder)
    python benchmarks/photos.py --quick       # smoke check: 60 images per set, a sample of 10,
                                              # the same sweeps: about 1.5 minutes (2 with
                                              # --with-old)

Results: benchmarks/results/photos.json (`--quick`: photos_quick.json), each sweep's output in
benchmarks/results/photos_logs/, the images in benchmarks/results/photos_data/n<N>/ (none of
it committed). Run it on an otherwise idle machine: other work skews every timing here, and
the sweep criterion compares walls measured one after the other.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DATA = RESULTS / "photos_data"
LOGS = RESULTS / "photos_logs"
CLI = ROOT / ".venv" / "bin" / "visiontune"
SUFFIX = ""  # "_quick" for a --quick run: its results do not replace a full run's
GENERATOR = 1   # bump when the images change: folders written by another version are redone
NOISE = 4.0     # the noise's sigma (--noise): it sets the files' entropy, hence decode speed
SIZES = {"large": (4000, 3000), "small": (500, 375)}
CLASSES = ("cool", "warm")   # shape colours: blue-ish vs red-ish
SWEEP_SIZE, CHANNELS = 64, 3
SPACE = ("{train.optimizer: {grid: [sgd_momentum, adam]}, model.initializer: {grid: "
         "[xavier_uniform, kaiming_normal]}, train.lr: {grid: [0.001, 0.003]}}")
SWEEP = ["data=folder", "model=cnn", "augment=none", "search.mode=grid",
         f"search.space={SPACE}", f"data.image_size={SWEEP_SIZE}", f"data.channels={CHANNELS}",
         "train.epochs=2", "train.patience=0"]
SWEEPS = {"A": ("large", ["data.preprocess=true"], "(A) 12 MP JPEGs, decoded once"),
          "B": ("resized", ["data.preprocess=true"], "(B) pre-resized on disk (64 px PNG)"),
          "C": ("large", ["data.preprocess=false"], "(C) 12 MP JPEGs, each trial decodes")}


# ----------------------------------------------------------------------------- the images

def _photo(width: int, height: int, label: int, seed: int, noise: float = NOISE):
    """A photo-like RGB image: a smooth colour field, a few ellipses and rectangles in the
    class's colour (1: red-ish, 0: blue-ish), mild luminance noise (sigma `noise`)."""
    import numpy as np
    from PIL import Image, ImageChops, ImageDraw

    rng = np.random.default_rng(seed)
    field = rng.integers(40, 200, (3, 4, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    base = np.array([200, 60, 50] if label == 1 else [50, 80, 200])
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        r = rng.uniform(0.05, 0.2) * min(width, height)
        colour = tuple(int(v) for v in np.clip(base + rng.integers(-40, 41, 3), 0, 255))
        box = [cx - r, cy - r * rng.uniform(0.6, 1.4), cx + r, cy + r * rng.uniform(0.6, 1.4)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    if not noise:
        return img
    # The noise: a 256 px tile repeated, as costly to decode as noise everywhere, much
    # cheaper to make.
    tile = Image.effect_noise((256, 256), noise).convert("RGB")
    grain = Image.new("RGB", (width, height))
    for x in range(0, width, 256):
        for y in range(0, height, 256):
            grain.paste(tile, (x, y))
    return ImageChops.add(img, grain, 1.0, -128)


def _write_photo(job: tuple) -> int:
    path, width, height, label, seed, noise = job
    path = Path(path)
    if path.exists():
        return 0
    part = path.with_name(f".{path.name}.part")
    _photo(width, height, label, seed, noise).save(part, "JPEG", quality=90)
    os.replace(part, path)   # an interrupted run leaves no half-written image
    return 1


def _write_resized(job: tuple) -> int:
    from PIL import Image

    from components.imaging import open_image, to_array

    src, dst, size = job
    dst = Path(dst)
    if dst.exists():
        return 0
    part = dst.with_name(f".{dst.name}.part")
    with open_image(src, size) as img:
        Image.fromarray(to_array(img, CHANNELS, size)).save(part, "PNG")
    os.replace(part, dst)
    return 1


def _pool(processes: int | None = None):
    return multiprocessing.get_context("fork").Pool(processes or os.cpu_count() or 1)


def _fill(folder: Path, marker: Path, meta: dict, jobs: list[tuple], fn, what: str) -> dict:
    """Run `fn` over `jobs` (the files of `folder`) on all cores, unless `marker` says the
    folder is complete with these settings. Returns what was done and how long it took."""
    if marker.is_file():
        if json.loads(marker.read_text()) == meta:
            return {"written": 0, "seconds": 0.0}
        shutil.rmtree(folder, ignore_errors=True)   # written with other settings
        marker.unlink()
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for part in (folder / name).glob(".*.part"):
            part.unlink()
    started = time.monotonic()
    written, done = 0, 0
    print(f"  writing {what} into {folder} ({os.cpu_count()} processes)", flush=True)
    with _pool() as pool:
        for w in pool.imap_unordered(fn, jobs, chunksize=4):
            written, done = written + w, done + 1
            if done % max(1, len(jobs) // 10) == 0 or done == len(jobs):
                print(f"    {done}/{len(jobs)} ({time.monotonic() - started:.0f} s)", flush=True)
    marker.write_text(json.dumps(meta))
    return {"written": written, "seconds": time.monotonic() - started}


def make_sets(n: int, noise: float) -> tuple[dict[str, Path], dict]:
    """The three folders of `n` images each (written now, or found complete)."""
    base = DATA / (f"n{n}" if noise == NOISE else f"n{n}-noise{noise:g}")
    folders = {name: base / name for name in ("large", "small", "resized")}
    made = {}
    for k, (name, (w, h)) in enumerate(SIZES.items()):
        jobs = [(str(folders[name] / CLASSES[i % 2] / f"{i:05d}.jpg"), w, h, i % 2,
                 (k + 1) * 1_000_003 + i, noise) for i in range(n)]
        meta = {"n": n, "size": [w, h], "quality": 90, "noise": noise,
                "generator": GENERATOR}
        made[name] = _fill(folders[name], base / f"{name}.done.json", meta, jobs,
                           _write_photo, f"{n} JPEGs of {w} x {h}")
    jobs = [(str(folders["large"] / CLASSES[i % 2] / f"{i:05d}.jpg"),
             str(folders["resized"] / CLASSES[i % 2] / f"{i:05d}.png"), SWEEP_SIZE)
            for i in range(n)]
    meta = {"n": n, "from": "large", "size": SWEEP_SIZE, "generator": GENERATOR,
            "large": json.loads((base / "large.done.json").read_text())}
    made["resized"] = _fill(folders["resized"], base / "resized.done.json", meta, jobs,
                            _write_resized, f"{n} PNGs of {SWEEP_SIZE} x {SWEEP_SIZE}")
    return folders, made


def _files(folder: Path) -> list[str]:
    from components.data import index_images

    return index_images(folder).paths


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


# ----------------------------------------------------------------------------- 1. per core

def decode_rates(paths: list[str], sizes=(224, 64)) -> dict:
    """Full vs reduced-scale decode + resize of the files (already in memory), one thread."""
    import numpy as np

    from components.imaging import open_image, to_array

    datas = [Path(p).read_bytes() for p in paths]
    to_array(open_image(datas[0]), CHANNELS, sizes[0])   # warm up (imports, tables)
    out = {}
    for size in sizes:
        timed, arrays = {}, {}
        for mode, draft in (("full", None), ("reduced", size)):
            started = time.perf_counter()
            arrays[mode] = [to_array(open_image(d, draft), CHANNELS, size) for d in datas]
            timed[mode] = time.perf_counter() - started
        with open_image(datas[0], size) as img:
            decoded_at = list(img.size)
        diff = [float(np.abs(a.astype(np.int16) - b).mean())
                for a, b in zip(arrays["full"], arrays["reduced"])]
        out[str(size)] = {"images": len(datas),
                          "full_images_per_s": len(datas) / timed["full"],
                          "reduced_images_per_s": len(datas) / timed["reduced"],
                          "speedup": timed["full"] / timed["reduced"],
                          "reduced_decoded_at": decoded_at,
                          "mean_abs_diff": statistics.fmean(diff),
                          "max_image_mean_abs_diff": max(diff)}
    return out


def real_photos() -> list[str]:
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return sorted(str(p) for p in folder.glob("*.jpg"))


# ----------------------------------------------------------------------------- 2. the floor

def _floor_one(path: str) -> int:
    from components.imaging import open_image, to_array

    with open_image(path, SWEEP_SIZE) as img:
        to_array(img, CHANNELS, SWEEP_SIZE)
    return 1


def decode_floor(paths: list[str]) -> dict:
    """One reduced-scale decode pass over `paths` at the sweep's size with all cores."""
    processes = os.cpu_count() or 1
    started = time.monotonic()
    with _pool(processes) as pool:
        done = sum(pool.imap_unordered(_floor_one, paths, chunksize=8))
    wall = time.monotonic() - started
    return {"images": done, "processes": processes, "wall_s": wall, "images_per_s": done / wall}


# ----------------------------------------------------------------------------- 3. per rank

def data_path(paths: list[str], labels: list[int], classes: list[str], root: str) -> dict:
    """Two epochs of one rank's DataLoader over `paths` at the sweep's size: no cache, the
    cache, the store of decoded images."""
    import torch
    from torch.utils.data import DataLoader

    from components.augment import build_train_transform, eval_preprocessing
    from components.data.dataset import EpochShuffle, ImageDataset
    from components.data.ingest import ImageIndex
    from components.data.preprocessed import DecodedLookup
    from components.data.validate import DecodeTarget, validate_images
    from pipelines.compose import load_config

    torch.set_num_threads(1)   # one rank's data path: what one core does
    cfg = load_config(SWEEP + [f"data.path={root}"])
    prep = eval_preprocessing(cfg.data, cfg.model)
    out: dict = {"images": len(paths), "batch_size": cfg.train.batch_size}

    def epochs(ds: ImageDataset) -> dict:
        loader = DataLoader(ds, batch_size=cfg.train.batch_size,
                            sampler=(sampler := EpochShuffle(len(ds), seed=0)), num_workers=0)
        rates = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            started = time.perf_counter()
            seen = sum(len(batch[0]) for batch in loader)
            rates.append(seen / (time.perf_counter() - started))
        return {"epoch1_images_per_s": rates[0], "epoch2_images_per_s": rates[1],
                "decodes": ds.decodes}

    def dataset(**kw) -> ImageDataset:
        transform = build_train_transform(cfg.augment.train, SWEEP_SIZE, CHANNELS,
                                          prep["mean"], prep["std"], seed=0)
        return ImageDataset(paths, labels, CHANNELS, SWEEP_SIZE, transform, **kw)

    out["no_cache"] = epochs(dataset(cache=False))
    out["cache"] = epochs(dataset(cache=True))
    with tempfile.TemporaryDirectory(prefix="vt-photos-store-") as d:
        started = time.monotonic()
        validated = validate_images(ImageIndex(root, paths, labels, classes), "skip", 1,
                                    decode_to=DecodeTarget(d, SWEEP_SIZE, CHANNELS))
        build = time.monotonic() - started
        lookup = DecodedLookup([validated.decoded], SWEEP_SIZE, CHANNELS)
        out["store"] = epochs(dataset(decoded=lookup))
        out["store"].update({"build_s": build, "build_images_per_s": len(paths) / build,
                             "build_decoded": validated.decoded.decoded})
        for reader in lookup.readers:
            reader.close()
    return out


# ----------------------------------------------------------------------------- 4. sweeps

def run_logged(cmd: list[str], cwd: Path, log_path: Path) -> tuple[float, int, list[str]]:
    """Run `cmd` in `cwd`, its output to `log_path` (and its step and decode lines here);
    returns (wall seconds around the subprocess, exit code, output lines). Interrupted, the
    subprocess's whole process group is ended (a visiontune run then shuts its Ray down)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))
                if re.match(r"\[visiontune\] \w+ (done|stopped)|  (decoded|reusing) |"
                            r"visiontune run \S+ finished|  test F1:", lines[-1]):
                    print("    | " + lines[-1], flush=True)
        rc = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return time.monotonic() - started, rc, lines


def _number(pattern: str, lines: list[str]) -> float | None:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return float(m.group(1))
    return None


def _mlflow_runs(workdir: Path) -> dict:
    """The parent run's data metrics and each trial's, in launch order."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("visiontune")
    parent = client.search_runs([exp.experiment_id], "tags.`visiontune.role` = 'pipeline'",
                                max_results=1)[0]
    runs = client.search_runs([exp.experiment_id], "tags.`visiontune.role` = 'trial'",
                              max_results=1000, order_by=["attributes.start_time ASC"])
    keys = ("images_decoded", "time_to_first_batch_s", "data_rss_mb", "peak_rss_mb",
            "best_val_f1")
    trials = [{"trial_id": r.data.tags.get("visiontune.trial_id"), "status": r.info.status,
               "seconds": ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000,
               **{k: r.data.metrics.get(k) for k in keys}} for r in runs]
    pm = parent.data.metrics
    return {"data_decoded_images": pm.get("data_decoded_images"),
            "step_seconds": {k.removeprefix("step_seconds_"): v for k, v in pm.items()
                             if k.startswith("step_seconds_")},
            "trials": trials}


def cli_sweep(key: str, folder: Path, images: int, tmp: Path) -> dict:
    """`visiontune run` of the 8-trial sweep over `folder` in a fresh directory."""
    _, extra, name = SWEEPS[key]
    overrides = [*SWEEP, f"data.path={folder}", *extra]
    workdir = tmp / key
    workdir.mkdir(parents=True)
    print(f"  $ visiontune run {' '.join(o if ' ' not in o else repr(o) for o in overrides)}",
          flush=True)
    wall, rc, lines = run_logged([str(CLI), "run", *overrides], workdir,
                                 LOGS / f"{key}{SUFFIX}.log")
    out = {"name": name, "command": "visiontune run " + " ".join(overrides), "images": images,
           "wall_s": wall, "rc": rc,
           "steps_s": {m.group(1): float(m.group(2)) for ln in lines
                       if (m := re.match(r"\[visiontune\] (\w+) done in ([0-9.]+)s", ln))},
           "reported_s": _number(r"^visiontune run \S+ finished in ([0-9.]+)s", lines),
           "test_f1": _number(r"^\s+test F1:\s+([0-9.]+|nan)", lines),
           "decode_lines": [ln.strip() for ln in lines
                            if ln.startswith(("  decoded ", "  reusing "))]}
    if rc != 0:
        out["error"] = "\n".join(lines[-40:])
        print(f"  !! exit code {rc}; the last lines:\n{out['error']}", flush=True)
    try:
        runs = _mlflow_runs(workdir)
    except Exception as e:   # a run that failed early may have no store
        out.setdefault("error", f"reading its MLflow runs: {type(e).__name__}: {e}")
        return out
    trials = runs["trials"]
    out["trials"] = trials
    out["data_decoded_images"] = int(runs["data_decoded_images"] or 0)
    out["trial_decodes"] = int(sum(t["images_decoded"] or 0 for t in trials))
    out["decodes"] = out["data_decoded_images"] + out["trial_decodes"]
    firsts = [t["time_to_first_batch_s"] for t in trials if t["time_to_first_batch_s"] is not None]
    out["first_trial_first_batch_s"] = firsts[0] if firsts else None
    out["median_first_batch_s"] = statistics.median(firsts) if firsts else None
    out["median_trial_s"] = statistics.median(t["seconds"] for t in trials) if trials else None
    for step, secs in runs["step_seconds"].items():
        out["steps_s"].setdefault(step, secs)
    return out


# ----------------------------------------------------------------------------- report

def save(out: dict) -> None:
    """Results so far (a later part that fails keeps the earlier ones)."""
    (RESULTS / f"photos{SUFFIX}.json").write_text(json.dumps(out, indent=1, default=str))


def _f(value, fmt: str) -> str:
    width = int(re.match(r"\d*", fmt).group(0) or 0)
    return "-".rjust(width) if value is None else format(value, fmt)


def criteria(out: dict) -> list[dict]:
    checks = []
    rates = out.get("per_core", {}).get("large", {}).get("224")
    # (the sklearn_photos rows only show the pixel difference on real photographs)
    if rates:
        checks.append({"check": "12 MP JPEG -> 224 px: reduced-scale decode >= 4x full decode "
                                "per core", "value": f"{rates['speedup']:.2f}x",
                       "passed": rates["speedup"] >= 4})
    a, b = out.get("sweeps", {}).get("A"), out.get("sweeps", {}).get("B")
    if a and a.get("decodes") is not None:
        checks.append({"check": "sweep (A) decodes each image once",
                       "value": f"{a['decodes']} decodes for {a['images']} images "
                                f"({a['data_decoded_images']} building the store + "
                                f"{a['trial_decodes']} in trials)",
                       "passed": a["rc"] == 0 and a["decodes"] == a["images"]})
    floor = out.get("decode_floor", {}).get("wall_s")
    if a and b and floor is not None:
        bound = b["wall_s"] + 1.5 * floor
        checks.append({"check": "wall(A) <= wall(B) + 1.5 x decode floor",
                       "value": f"{a['wall_s']:.1f} s <= {b['wall_s']:.1f} + 1.5 x "
                                f"{floor:.1f} = {bound:.1f} s",
                       "passed": a["rc"] == 0 and b["rc"] == 0 and a["wall_s"] <= bound})
    return checks


def print_summary(out: dict) -> None:
    n = out["n"]
    print(f"\n== photos benchmark, {n} images per set, {out['machine']['cpus']} CPUs")
    print(f"  data (noise sigma {out['noise']:g}): " + ", ".join(
        f"{k} {v['mb']:.1f} MB ({v['mb'] * 1024 / max(v['images'], 1):.0f} KB an image)"
        for k, v in out["sets"].items()))
    print(f"\n  decode + resize, one thread, files in memory (sample of {out['sample']})")
    print(f"  {'set':<8} {'px':>4} {'full img/s':>10} {'reduced img/s':>13} {'speedup':>8} "
          f"{'decoded at':>11} {'mean |diff|':>11}")
    for name, sizes in out.get("per_core", {}).items():
        for size, r in sizes.items():
            at = "x".join(map(str, r["reduced_decoded_at"]))
            print(f"  {name:<8} {size:>4} {r['full_images_per_s']:>10.1f} "
                  f"{r['reduced_images_per_s']:>13.1f} {r['speedup']:>7.2f}x {at:>11} "
                  f"{r['mean_abs_diff']:>11.2f}")
    fl = out.get("decode_floor")
    if fl:
        print(f"\n  decode floor: {fl['images']} large JPEGs at {SWEEP_SIZE} px, reduced scale, "
              f"{fl['processes']} processes: {fl['wall_s']:.1f} s ({fl['images_per_s']:.1f} "
              "img/s)")
    dp = out.get("data_path")
    if dp:
        print(f"\n  one rank's data path, {dp['images']} large JPEGs at {SWEEP_SIZE} px, "
              f"batch {dp['batch_size']}, 1 thread (images/s)")
        print(f"  {'':<10} {'epoch 1':>8} {'epoch 2':>8} {'decodes':>8}")
        for mode in ("no_cache", "cache", "store"):
            r = dp[mode]
            print(f"  {mode:<10} {r['epoch1_images_per_s']:>8.1f} {r['epoch2_images_per_s']:>8.1f}"
                  f" {r['decodes']:>8}")
        s = dp["store"]
        print(f"  (store built first: {s['build_s']:.1f} s, {s['build_images_per_s']:.1f} img/s "
              "on the validate step's threads, read and hashed included)")
    if out.get("sweeps"):
        print(f"\n  8-trial CNN sweep at {SWEEP_SIZE} px, 2 epochs ({n} images)")
        print(f"  {'sweep':<40} {'wall s':>7} {'valid. s':>8} {'tune s':>7} {'decodes':>8} "
              f"{'1st TTFB':>8} {'med TTFB':>8} {'trials':>6} {'test F1':>7}")
        for s in out["sweeps"].values():
            failed = "" if s["rc"] == 0 else f"  (exit {s['rc']})"
            print(f"  {s['name']:<40} {s['wall_s']:>7.1f} "
                  f"{_f(s['steps_s'].get('validate'), '8.1f')} "
                  f"{_f(s['steps_s'].get('tune'), '7.1f')} {_f(s.get('decodes'), '8d')} "
                  f"{_f(s.get('first_trial_first_batch_s'), '8.2f')} "
                  f"{_f(s.get('median_first_batch_s'), '8.2f')} "
                  f"{len(s.get('trials', [])):>6} {_f(s.get('test_f1'), '7.4f')}{failed}")
        print("  (TTFB: a trial's time_to_first_batch_s, from its training function's start)")
    print("\n  criteria")
    for c in out.get("criteria", []):
        print(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['check']}: {c['value']}")


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="images per set (default 2000)")
    ap.add_argument("--sample", type=int, default=None,
                    help="images per set for the per-core decode rates (default 50)")
    ap.add_argument("--rank-images", type=int, default=None,
                    help="images of the large set for the per-rank data path (default 300)")
    ap.add_argument("--with-old", action="store_true",
                    help="also sweep (C): data.preprocess=false, every trial decodes")
    ap.add_argument("--noise", type=float, default=NOISE,
                    help=f"sigma of the JPEGs' noise (default {NOISE:g}; more noise, bigger "
                         "files, slower entropy decoding, a smaller reduced-scale speedup)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke check: 60 images per set, a sample of 10")
    args = ap.parse_args()
    global SUFFIX
    SUFFIX = "_quick" if args.quick else ""
    n = args.n or (60 if args.quick else 2000)
    sample = min(n, args.sample or (10 if args.quick else 50))
    rank_images = min(n, args.rank_images or (n if args.quick else 300))
    RESULTS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "platform": platform.platform(), "load_avg_at_start": load},
                 "command": " ".join(["python", "benchmarks/photos.py", *sys.argv[1:]]),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "n": n, "sample": sample,
                 "noise": args.noise,
                 "sweep_overrides": SWEEP}
    if load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f} at start: other work on this machine "
              "skews the timings", flush=True)
    started = time.monotonic()

    print(f"0/4 the images ({n} per set)", flush=True)
    folders, made = make_sets(n, args.noise)
    files = {name: _files(folder) for name, folder in folders.items()}
    out["sets"] = {name: {"folder": str(folders[name]), "images": len(files[name]),
                          "mb": folder_mb(folders[name]), **made[name]} for name in folders}
    save(out)

    print(f"1/4 decode + resize per core, a sample of {sample} per set", flush=True)
    out["per_core"] = {}
    for name in SIZES:
        step = max(1, len(files[name]) // sample)
        out["per_core"][name] = decode_rates(files[name][::step][:sample])
        r = out["per_core"][name]["224"]
        print(f"  {name}: 224 px {r['full_images_per_s']:.1f} vs {r['reduced_images_per_s']:.1f}"
              f" img/s ({r['speedup']:.2f}x)", flush=True)
    # Real photographs (scikit-learn's two sample JPEGs, 640 x 427): what reduced-scale
    # decoding changes in real content, at the sizes it applies to (a side >= 2x the target).
    out["per_core"]["sklearn_photos"] = decode_rates(real_photos(), sizes=(64, 112))
    save(out)

    print(f"2/4 decode floor: every large JPEG at {SWEEP_SIZE} px on {os.cpu_count()} cores",
          flush=True)
    out["decode_floor"] = decode_floor(files["large"])
    print(f"  {out['decode_floor']['wall_s']:.1f} s", flush=True)
    save(out)

    print(f"3/4 one rank's data path over {rank_images} large JPEGs, two epochs", flush=True)
    from components.data import index_images

    index = index_images(folders["large"])
    step = max(1, len(index.paths) // rank_images)
    rows = list(range(0, len(index.paths), step))[:rank_images]
    out["data_path"] = data_path([index.paths[i] for i in rows], [index.labels[i] for i in rows],
                                 index.classes, index.root)
    save(out)

    keys = ["A", "B"] + (["C"] if args.with_old else [])
    print(f"4/4 the 8-trial sweep: {', '.join(SWEEPS[k][2] for k in keys)}", flush=True)
    out["sweeps"] = {}
    with tempfile.TemporaryDirectory(prefix="vt-photos-") as d:
        for key in keys:
            print(f"  {SWEEPS[key][2]}", flush=True)
            folder = folders[SWEEPS[key][0]]
            out["sweeps"][key] = cli_sweep(key, folder, len(files[SWEEPS[key][0]]), Path(d))
            save(out)
    out["criteria"] = criteria(out)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["benchmark_s"] = time.monotonic() - started
    save(out)
    print_summary(out)
    print(f"\nresults: {RESULTS / f'photos{SUFFIX}.json'}, logs: {LOGS}/ "
          f"({out['benchmark_s']:.0f} s in all)")
    return 0 if all(s["rc"] == 0 for s in out["sweeps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
