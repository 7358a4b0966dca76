"""Which format holds a sweep's decoded images? The candidates, measured side by side on the
same rows, the way a trial's rank reads them: its own shard's rows in a new random order every
epoch (shuffling), one image at a time, as the DataLoader's dataset asks for them.

    npy+pread   one .npy file, a row read by one os.pread at its offset (what visiontune
                uses: components.data.preprocessed.RowReader itself)
    memmap      the same file through np.load(mmap_mode="r"), a row copied out of the map
    parquet     Parquet, one binary column of row bytes, row groups of 256 (pyarrow): a row
                read means reading (and caching) its row group
    tar         tar shards of 1,000 members each (WebDataset's layout: one member per image);
                WebDataset reads shards sequentially and shuffles in a buffer; random access
                needs an index of member offsets, built here by reading every header once
    ray_data    Ray Data: `ray.data.from_numpy(...).materialize()`, then one epoch of
                `iter_batches(local_shuffle_buffer_size=...)`: blocks in the object store of
                one Ray session, not a file a later run or another node's disk can reuse
                (--ray; it starts a local Ray of 1 CPU)

Per format: write seconds, bytes on disk, the first epoch (cold: the page cache dropped where
the OS lets this process, else as written), a second epoch (warm), images/s per core (one
thread), and the reader's resident memory growth over the epochs (what a rank pays for
holding the store open).

    python benchmarks/store_format.py              # 20,000 rows at 64 px RGB, about 2 minutes
    python benchmarks/store_format.py --rows 5000 --size 128 --ray

Results: benchmarks/results/store_format.json (not committed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
SHARD = 1000
ROW_GROUP = 256


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the file's pages (best effort: posix_fadvise DONTNEED)."""
    for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- writers

def write_npy(images: np.ndarray, d: Path) -> Path:
    path = d / "images.npy"
    np.save(path, images)
    return path


def write_parquet(images: np.ndarray, d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = d / "images.parquet"
    col = pa.array([row.tobytes() for row in images], pa.binary())
    pq.write_table(pa.table({"image": col}), path, row_group_size=ROW_GROUP,
                   compression="none")
    return path


def write_tar(images: np.ndarray, d: Path) -> Path:
    folder = d / "shards"
    folder.mkdir()
    for s in range(0, len(images), SHARD):
        with tarfile.open(folder / f"shard-{s // SHARD:05d}.tar", "w") as tar:
            for i in range(s, min(s + SHARD, len(images))):
                data = images[i].tobytes()
                info = tarfile.TarInfo(f"{i:08d}.raw")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


# ----------------------------------------------------------------------------- readers

class NpyPread:
    def __init__(self, path: Path, n: int, size: int, channels: int):
        from components.data.preprocessed import DecodedImages, RowReader

        store = DecodedImages(str(path.parent), "bench", tuple(str(i) for i in range(n)),
                              size, channels)
        self.reader = RowReader(store)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.reader[i]


class Memmap:
    def __init__(self, path: Path, *_):
        self.array = np.load(path, mmap_mode="r")

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(self.array[i])


class Parquet:
    def __init__(self, path: Path, n: int, size: int, channels: int):
        import pyarrow.parquet as pq

        self.file = pq.ParquetFile(path)
        self.shape = (size, size, channels)
        self.group, self.rows = None, None

    def __getitem__(self, i: int) -> np.ndarray:
        g = i // ROW_GROUP
        if g != self.group:   # random order: almost every row reads a whole row group
            self.group, self.rows = g, self.file.read_row_group(g, columns=["image"])[0]
        data = self.rows[i - g * ROW_GROUP].as_py()
        return np.frombuffer(data, np.uint8).reshape(self.shape).copy()


class Tar:
    def __init__(self, folder: Path, n: int, size: int, channels: int):
        self.shape = (size, size, channels)
        self.where = {}
        for shard in sorted(folder.glob("*.tar")):   # the offset index: every header once
            with tarfile.open(shard) as tar:
                for m in tar:
                    self.where[int(m.name.split(".")[0])] = (str(shard), m.offset_data, m.size)
        self.fds: dict[str, int] = {}

    def __getitem__(self, i: int) -> np.ndarray:
        shard, offset, size = self.where[i]
        fd = self.fds.get(shard)
        if fd is None:
            fd = self.fds[shard] = os.open(shard, os.O_RDONLY)
        return np.frombuffer(os.pread(fd, size, offset), np.uint8).reshape(self.shape).copy()


READERS = {"npy+pread": (write_npy, NpyPread), "memmap": (write_npy, Memmap),
           "parquet": (write_parquet, Parquet), "tar": (write_tar, Tar)}


def epoch(reader, order: np.ndarray) -> float:
    started = time.perf_counter()
    total = 0
    for i in order:
        total += int(reader[int(i)][0, 0, 0])
    return len(order) / (time.perf_counter() - started)


def measure(name: str, images: np.ndarray, d: Path, seed: int) -> dict:
    write, Reader = READERS[name]
    n, size, _, channels = images.shape
    sub = d / name.replace("+", "_")
    sub.mkdir()
    started = time.perf_counter()
    path = write(images, sub)
    write_s = time.perf_counter() - started
    drop_cache(path)
    before = rss_mb()
    started = time.perf_counter()
    reader = Reader(path, n, size, channels)
    open_s = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    cold = epoch(reader, rng.permutation(n))
    warm = epoch(reader, rng.permutation(n))
    return {"write_s": round(write_s, 2), "bytes": size_on_disk(path),
            "open_s": round(open_s, 3), "cold_images_per_s": round(cold),
            "warm_images_per_s": round(warm),
            "reader_rss_growth_mb": round(rss_mb() - before, 1)}


def measure_ray_data(images: np.ndarray, seed: int) -> dict:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        import ray.data

        started = time.perf_counter()
        ds = ray.data.from_numpy(images).materialize()
        write_s = time.perf_counter() - started
        before = rss_mb()
        rates = []
        for e in range(2):
            started = time.perf_counter()
            seen = 0
            for batch in ds.iter_batches(batch_size=64, batch_format="numpy",
                                         local_shuffle_buffer_size=2048,
                                         local_shuffle_seed=seed + e):
                seen += len(batch["data"])
            rates.append(seen / (time.perf_counter() - started))
        return {"write_s": round(write_s, 2), "bytes": int(ds.size_bytes()),
                "open_s": 0.0, "cold_images_per_s": round(rates[0]),
                "warm_images_per_s": round(rates[1]),
                "reader_rss_growth_mb": round(rss_mb() - before, 1),
                "note": "batches of 64 through a 2,048-row shuffle buffer, not random "
                        "access; blocks live in this Ray session's object store"}
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--ray", action="store_true", help="also Ray Data materialized blocks")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.rows, args.size, args.size, args.channels),
                          dtype=np.uint8)
    mb = images.nbytes / 2**20
    print(f"{args.rows} rows of {args.size} x {args.size} x {args.channels} uint8 "
          f"({mb:.0f} MiB); one thread; a random order each epoch", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="vt-store-format-") as d:
        for name in READERS:
            print(f"  {name} ...", flush=True)
            results[name] = measure(name, images, Path(d), seed=1)
    if args.ray:
        print("  ray_data ...", flush=True)
        results["ray_data"] = measure_ray_data(images, seed=1)
    out = {"command": "python benchmarks/store_format.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": args.rows,
           "image_size": args.size, "channels": args.channels, "decoded_mib": round(mb, 1),
           "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "store_format.json").write_text(json.dumps(out, indent=2))
    print(f"\n{'format':<10} {'write s':>8} {'MiB':>7} {'open s':>7} {'cold img/s':>11} "
          f"{'warm img/s':>11} {'RSS growth':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['write_s']:>8.2f} {r['bytes'] / 2**20:>7.0f} {r['open_s']:>7.3f} "
              f"{r['cold_images_per_s']:>11} {r['warm_images_per_s']:>11} "
              f"{r['reader_rss_growth_mb']:>7.1f} MiB")
    print(f"written to {RESULTS / 'store_format.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
