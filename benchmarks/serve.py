"""`visiontune serve` against the same decode + forward without HTTP and against `mlflow
models serve`: the same registered model, the same images; then what following the alias costs.

The model is a freshly initialised network (`--model cnn` or `resnet18` at `--image-size` px;
what the weights learned does not change the speed) registered as the pipeline registers its
champion (tests.conftest's `register_untrained_model`, a SQLite store in a temporary folder).
The images are `--images` photo-like JPEGs of `--photo-size` px (gradients and noise, seeded),
so every request decodes real JPEGs. At 1 and 32 images a request, each for `--seconds`:
  bare loop            the pyfunc loaded here, `predict` on DataFrames of the image bytes
  visiontune serve     1 worker, defaults  } a client here posts base64 JSON (dataframe_split),
  mlflow models serve  1 worker            } one request at a time on one keep-alive connection
requests/s, images/s, p50 and p95 latency, after 3 warm-up requests; the engines take turns.
Then the swap: `visiontune serve --poll 1` under the 32-image loop while `champion` moves to a
new version: failed requests, seconds to the first answer from it, p95 from the move until 5 s
after that answer against the steady p95 before. And where the HTTP path's time goes: MLflow's
request parsing and answer (what both servers run around `predict`) timed in this process,
and HTTP alone (a 32-image body that the server reads and refuses).

    python benchmarks/serve.py                          # about 3 minutes on 2 cores
    python benchmarks/serve.py --model resnet18 --image-size 128 --seconds 10

The client shares the cores with the servers (2 on the reference machine). Results:
benchmarks/results/serve.json (not committed). Exits 1 if a server answers otherwise than
the bare loop or a request fails in the swap; a server that does not start ends it too.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.conftest as fixtures  # noqa: E402  (from ROOT, above)

NAME = "bench-serve"
BATCHES = (1, 32)
WARM_UP = 3
VERSION_HEADER = "X-Visiontune-Model-Version"
BIN = Path(sys.executable).parent
ROUNDS = 3   # turns per cell (see measure_cells)
LABELS = {"visiontune": "visiontune serve", "mlflow": "mlflow models serve"}


def make_photos(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: colour gradients (smooth areas, as photos have) plus noise (detail
    that the DCT must code), so decoding costs what a photo of that size costs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        field = np.stack([a[k] * x + b[k] * y + c[k] * x * y for k in range(3)], axis=-1)
        pixels = 128 + 90 * field + rng.normal(0, 18, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def register(uri: str, tmp: Path, args) -> str:
    """A new version of the model: the first is the champion, a later one the challenger."""
    return fixtures.register_untrained_model(uri, NAME, image_size=args.image_size,
                                             model=args.model, artifact_location=f"{tmp}/art")


def request_body(images: list[bytes]) -> bytes:
    """MLflow's scoring protocol: one row per image, base64 in JSON (a `binary` column)."""
    rows = [[base64.b64encode(im).decode("ascii")] for im in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def batches(photos: list[bytes], batch: int) -> list[list[bytes]]:
    """Batch 1 cycles through every image; batch 32 sends them all (the same bytes)."""
    return [[p] for p in photos] if batch == 1 else [[photos[i % len(photos)]
                                                      for i in range(batch)]]


def summary(records: list[tuple], batch: int, seconds: float) -> dict:
    """records: (end time, latency s, ok, version) for each measured request."""
    lat, n = np.array([r[1] for r in records]) * 1000, len(records)
    return {"requests": n, "failed": sum(not r[2] for r in records),
            "seconds": round(seconds, 2), "requests_per_s": round(n / seconds, 2),
            "images_per_s": round(n * batch / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if n else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 2) if n else None}


def in_thread(fn, *args):
    """fn(*args) in a new thread, as both servers call `predict` (asyncio.to_thread). Not in
    the main thread: there torch's OpenMP team stalls at every op's barrier whenever another
    process holds a core (about 90 ms per CNN forward measured on 2 busy cores, 5 ms in a
    thread), which would make the floor slower than the servers built on it."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def closed_loop(call, seconds: float, stop=None, records=None) -> tuple[list, float]:
    """call(i) -> (ok, version), one after the other: WARM_UP untimed, then timed for `seconds`
    (or until stop()), appended to `records` as they end. -> (records, measured seconds)"""
    [call(i) for i in range(WARM_UP)]
    records = [] if records is None else records
    start, i = time.monotonic(), 0
    while not (stop() if stop else time.monotonic() - start >= seconds):
        t = time.perf_counter()
        ok, version = call(i)
        records.append((time.monotonic(), time.perf_counter() - t, ok, version))
        i += 1
    return records, time.monotonic() - start


def bare_runner(model, photos: list[bytes]):
    """The same decode + forward as a server's `predict`, in this process: no HTTP, no JSON."""
    import pandas as pd

    frames = {b: [pd.DataFrame({"image": x}) for x in batches(photos, b)] for b in BATCHES}

    def call(batch: int, i: int) -> tuple:
        fs = frames[batch]
        return bool(model.predict(fs[i % len(fs)])["error"].isna().all()), None
    return lambda batch, seconds: in_thread(closed_loop, lambda i: call(batch, i), seconds)


class Client:
    """One keep-alive connection, one request at a time; a failure reconnects. post() ->
    (answered 200?, the version header, the answer)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, body: bytes, ctype: str = "application/json") -> tuple:
        try:
            self.conn.request("POST", "/invocations", body, {"Content-Type": ctype})
            r = self.conn.getresponse()
            return r.status == 200, r.getheader(VERSION_HEADER), r.read()
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()   # the next request connects again
            return False, None, str(e).encode()


def http_runner(port: int, photos: list[bytes]):
    client = Client(port)
    bodies = {b: [request_body(x) for x in batches(photos, b)] for b in BATCHES}  # not timed

    def run(batch: int, seconds: float):
        bs = bodies[batch]
        return closed_loop(lambda i: client.post(bs[i % len(bs)])[:2], seconds)
    return run


def measure_cells(runners: dict, seconds: float) -> dict:
    """Each cell in ROUNDS slices, the engines taking turns: load from elsewhere on the
    machine that comes and goes falls on every engine alike, not on whichever ran then."""
    got = {e: {b: ([], 0.0, []) for b in BATCHES} for e in runners}
    for _ in range(ROUNDS):
        for b in BATCHES:
            for engine, run in runners.items():
                records, elapsed = run(b, seconds / ROUNDS)
                old = got[engine][b]
                got[engine][b] = (old[0] + records, old[1] + elapsed,
                                  old[2] + [round(len(records) * b / elapsed, 1)])
    return {e: {str(b): {**summary(r, b, el), "images_per_s_by_round": by_round}
                for b, (r, el, by_round) in cells.items()} for e, cells in got.items()}


def transport_ms(port: int, body: bytes) -> float:
    """p50 ms of a request that the server reads whole and refuses (415: text/plain): HTTP
    and the body's trip through uvicorn and the thread hop, no parsing, no `predict`."""
    client = Client(port)
    records, _ = closed_loop(lambda i: (True, client.post(body, "text/plain")[1]), 2)
    return summary(records, 1, 2)["p50_ms"]


def start_server(cmd: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    """The server in its own process group; exits non-zero unless /ping answers in 180 s."""
    proc = subprocess.Popen(cmd, env=env, cwd=log.parent, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        fixtures.wait_until_ok(f"http://127.0.0.1:{port}/ping", proc, log, 180)
    except RuntimeError as e:
        fixtures.stop_group(proc)
        sys.exit(f"{cmd[0]} {cmd[1]} did not start: {e}")
    return proc


def serve_cmds(engine: str, uri: str, port: int, poll: float | None = None) -> list[str]:
    if engine == "visiontune":
        return [str(BIN / "visiontune"), "serve", "--model", NAME, "--port", str(port),
                "--tracking-uri", uri, *(["--poll", str(poll)] if poll else [])]
    return [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]


def measure_swap(env: dict, uri: str, tmp: Path, photos, steady_s: float, args) -> dict:
    """visiontune serve --poll 1 under the 32-image closed loop; champion moved to a second
    version (registered before the load starts: registering is the trainer's work, not the
    server's, and would otherwise take this machine's cores in the window)."""
    from mlflow import MlflowClient

    v2 = register(uri, tmp, args)  # challenger
    port, log = fixtures.free_port(), tmp / "swap.log"
    proc = start_server(serve_cmds("visiontune", uri, port, poll=1), env, port, log)
    records, done = [], threading.Event()   # records grow as requests end: watched for v2
    body, client = request_body(batches(photos, 32)[0]), Client(port)
    load = threading.Thread(target=closed_loop, args=(lambda i: client.post(body)[:2], 0,
                                                      done.is_set, records))
    try:
        load.start()
        time.sleep(steady_s + 2)   # + the warm-up
        moved = time.monotonic()
        MlflowClient(uri).set_registered_model_alias(NAME, "champion", v2)
        first = None
        while first is None and time.monotonic() - moved < 120:
            time.sleep(0.05)
            first = next((r[0] for r in records if r[3] == v2), None)
        if first is None:
            sys.exit(f"no answer from version {v2} 120 s after the move:\n"
                     f"{log.read_text()[-2000:]}")
        time.sleep(5)
    finally:
        done.set()
        load.join(timeout=180)
        fixtures.stop_group(proc)
    steady = [r for r in records if moved - steady_s <= r[0] < moved]
    during = [r for r in records if moved <= r[0] <= first + 5]
    warmed = re.findall(r"warmed in ([\d.]+) s", log.read_text())
    s, d = summary(steady, 32, steady_s), summary(during, 32, first + 5 - moved)
    return {"to_version": v2, "steady": s, "during": d,
            "failed": sum(not r[2] for r in records), "requests": len(records),
            "move_to_first_answer_s": round(first - moved, 2),
            "server_load_s": float(warmed[-1]) if warmed else None,
            "swap_cost_p95_ms": round(d["p95_ms"] - s["p95_ms"], 2)}


def codec_cost(model, photos: list[bytes], repeats: int = 20) -> dict:
    """ms per 32-image payload: base64 + JSON both ways, and MLflow's own request parsing
    (JSON, DataFrame, base64 per cell: what both servers do before `predict`) and answer."""
    from mlflow.pyfunc.scoring_server import _parse_json_data, predictions_to_json

    images = batches(photos, 32)[0]
    body, schema = request_body(images), model.metadata.get_input_schema()
    out = model.predict(_parse_json_data(body, model.metadata, schema).data)

    def ms(fn) -> float:
        t = time.perf_counter()
        [fn() for _ in range(repeats)]
        return round((time.perf_counter() - t) / repeats * 1000, 2)

    return {"payload_bytes": len(body), "image_bytes": sum(map(len, images)),
            "encode_ms": ms(lambda: request_body(images)),
            "decode_ms": ms(lambda: [base64.b64decode(r[0]) for r in
                                     json.loads(body)["dataframe_split"]["data"]]),
            "mlflow_parse_ms": ms(lambda: _parse_json_data(body, model.metadata, schema)),
            "mlflow_answer_ms": ms(lambda: predictions_to_json(out, io.StringIO()))}


def print_table(out: dict) -> None:
    print(f"\n== serve benchmark: {out['model']} at {out['image_size']} px, {out['images']} "
          f"JPEGs of {out['photo_size']} px, {out['seconds']:g} s a cell in {ROUNDS} turns, "
          f"{out['cpus']} CPUs")
    print(f"  {'engine':<20} {'batch':>5} {'req/s':>7} {'images/s':>9} {'p50 ms':>7} "
          f"{'p95 ms':>7} {'failed':>6}  images/s by turn")
    for engine, cells in out["engines"].items():
        for batch, c in cells.items():
            print(f"  {engine:<20} {batch:>5} {c['requests_per_s']:>7.1f} "
                  f"{c['images_per_s']:>9.1f} {c['p50_ms']:>7.1f} {c['p95_ms']:>7.1f} "
                  f"{c['failed']:>6}  {c['images_per_s_by_round']}")
    c = out["codec"]
    print(f"\n  32 images = {c['payload_bytes']:,} bytes of JSON ({c['image_bytes']:,} of JPEG):"
          f" client encode {c['encode_ms']} ms, plain decode {c['decode_ms']} ms; MLflow's "
          f"request parsing {c['mlflow_parse_ms']} ms, answer {c['mlflow_answer_ms']} ms")
    print("  HTTP alone (that body read and refused), p50: " + ", ".join(
        f"{LABELS[e]} {ms} ms" for e, ms in out["transport_ms"].items()))
    s = out.get("swap")
    if s:
        print(f"\n  swap to version {s['to_version']} (--poll 1, 32 images/request): first "
              f"answer {s['move_to_first_answer_s']} s after the move (the server loaded it in "
              f"{s['server_load_s']} s); {s['failed']} failed of {s['requests']} requests")
        print(f"  p95 steady {s['steady']['p95_ms']} ms, in the window {s['during']['p95_ms']} "
              f"ms ({s['during']['requests']} requests): swap cost at p95 = "
              f"{s['swap_cost_p95_ms']} ms = {s['swap_cost_vs_request_p95']}x one request's "
              f"p95 ({s['steady']['p95_ms']} ms)")
    print(f"\n  {out['verdict']}\n  {out['where_the_rest_goes']}")


def verdict(out: dict) -> None:
    bare, vt = out["engines"]["bare loop"]["32"], out["engines"]["visiontune serve"]["32"]
    ratio = vt["images_per_s"] / bare["images_per_s"]
    turns = [round(a / b, 2) for a, b in zip(vt["images_per_s_by_round"],
                                             bare["images_per_s_by_round"])]
    out["ratio_vs_bare"], out["ratio_vs_bare_by_turn"] = round(ratio, 2), turns
    out["verdict"] = (f"visiontune serve at 32 images/request: {vt['images_per_s']:.1f} "
                      f"images/s = {ratio:.2f}x the bare loop (target >= 0.8x): "
                      f"{'PASS' if ratio >= 0.8 else 'FAIL'} (by turn: {turns})")
    gap, c = vt["p50_ms"] - bare["p50_ms"], out["codec"]
    # visiontune serve parses image requests itself (json + base64), answers with MLflow's
    codec = c["decode_ms"] + c["mlflow_answer_ms"]   # the client's body is pre-encoded
    http = out["transport_ms"]["visiontune"]
    out["overhead_ms"] = {"p50_gap": round(gap, 1), "parse_and_answer": round(codec, 1),
                          "http": http, "rest": round(gap - codec - http, 1)}
    out["where_the_rest_goes"] = (
        f"where the rest goes: a 32-image request takes {gap:.1f} ms more (p50) than the "
        f"bare `predict` ({bare['p50_ms']:.1f} ms): JSON + base64 parsing and the answer "
        f"{codec:.1f} ms (MLflow's generic parsing, which mlflow models serve runs, "
        f"{c['mlflow_parse_ms']} ms), HTTP {http} ms, the other {gap - codec - http:.1f} ms "
        f"the event loop, the thread hand-off and the client sharing the cores")


def run_engines(out: dict, env: dict, uri: str, tmp: Path, photos, model, seconds: float):
    """Both servers up at once, each checked against the bare loop's answer; then the cells,
    the engines taking turns; both servers stopped whatever happens."""
    import pandas as pd

    expected = model.predict(pd.DataFrame({"image": batches(photos, 32)[0]}))["prediction"]
    procs, ports = [], {}
    try:
        for engine in ("visiontune", "mlflow"):
            ports[engine] = port = fixtures.free_port()
            print(f"starting {engine} ...", flush=True)
            procs.append(start_server(serve_cmds(engine, uri, port), env, port,
                                      tmp / f"{engine}.log"))
        body = request_body(batches(photos, 32)[0])
        for engine, port in ports.items():   # the same answers as the bare loop
            ok, _, data = Client(port).post(body)
            out[f"{engine}_same_predictions_as_bare"] = ok and [
                r["prediction"] for r in json.loads(data)["predictions"]] == expected.tolist()
        out["transport_ms"] = {e: transport_ms(p, body) for e, p in ports.items()}
        print(f"measuring {len(BATCHES)} batch sizes x 3 engines x {seconds:g} s", flush=True)
        runners = {"bare loop": bare_runner(model, photos), **{
            LABELS[e]: http_runner(p, photos) for e, p in ports.items()}}
        out["engines"] = measure_cells(runners, seconds)
    finally:
        for proc in procs:
            fixtures.stop_group(proc)


def main() -> int:
    import mlflow

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", help="cnn or resnet18 (or another backbone)")
    ap.add_argument("--image-size", type=int, default=64, help="the model's input size")
    ap.add_argument("--images", type=int, default=32, help="distinct JPEGs")
    ap.add_argument("--photo-size", type=int, default=256, help="side of each JPEG")
    ap.add_argument("--seconds", type=float, default=15, help="measured seconds per cell")
    ap.add_argument("--no-swap", action="store_true", help="skip the swap measurement")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args()

    photos = make_photos(args.images, args.photo_size)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
           "cpus": os.cpu_count(), "model": args.model, "image_size": args.image_size,
           "images": args.images, "photo_size": args.photo_size, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="visiontune-bench-serve-") as d:
        tmp, uri = Path(d), f"sqlite:///{d}/mlflow.db"
        os.environ.update(MLFLOW_LOGGING_LEVEL="WARNING",
                          MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        v1 = register(uri, tmp, args)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "MLFLOW_TRACKING_URI": uri}   # `mlflow models serve` resolves models:/ with it
        [env.pop(key, None) for key in ("RAY_ADDRESS", "MLFLOW_MODELS_WORKERS")]
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/{v1}")
        print(f"{args.model} at {args.image_size} px, version {v1}", flush=True)
        out["codec"] = codec_cost(model, photos)
        run_engines(out, env, uri, tmp, photos, model, args.seconds)
        if not args.no_swap:
            print("swap ...", flush=True)
            out["swap"] = s = measure_swap(env, uri, tmp, photos, min(args.seconds, 10), args)
            s["swap_cost_vs_request_p95"] = round(s["swap_cost_p95_ms"] / s["steady"]["p95_ms"], 2)
    verdict(out)
    print_table(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")
    same = all(out[f"{e}_same_predictions_as_bare"] for e in ("visiontune", "mlflow"))
    # a failed request in the swap, or a server that answers otherwise than the model
    return 1 if out.get("swap", {}).get("failed") or not same else 0


if __name__ == "__main__":
    sys.exit(main())
