"""`visiontune predict` in one process against `visiontune predict --ray` (Ray Data
`map_batches` over a local Ray), side by side on the same images and the same registered model.

The model is a freshly initialised network (`--model resnet18` or `cnn`, at `--size` px, the
folder data's default of 128) logged and registered the way the pipeline registers its
champion; throughput does not depend on what the weights learned. The images are JPEG files
written once under ~/.cache/visiontune/ (the data_scale benchmark's folder), never committed.
Both commands run exactly as a user types them; their own summary lines give the rates (all
images over the whole command, and the rate once answers were coming), and the script checks
that both wrote the same predictions.

    python benchmarks/batch_predict.py                  # 5,000 images, about 4 minutes on 2 cores
    python benchmarks/batch_predict.py --images 1000 --model cnn   # a quick look

Results: benchmarks/results/batch_predict.json (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

_SUMMARY = re.compile(r"^predict: ([\d,]+) images in ([\d.]+) s \(([\d,]+) images/s"
                      r"(?:; ([\d,]+) images/s after (\d+) s of start-up)?\)")


def _num(text: str | None) -> float | None:
    return float(text.replace(",", "")) if text else None


def run_predict(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    p = subprocess.run(["visiontune", "predict", *args], cwd=cwd, env=env,
                       capture_output=True, text=True)
    wall = time.monotonic() - start
    if p.returncode != 0:
        sys.exit(f"visiontune predict {' '.join(args)} failed ({p.returncode}):\n"
                 f"{p.stderr[-3000:]}")
    summary = [m for line in p.stderr.splitlines() if (m := _SUMMARY.match(line))]
    if not summary:
        sys.exit(f"no summary line in:\n{p.stderr[-3000:]}")
    m = summary[-1]
    return {"command": "visiontune predict " + " ".join(args), "wall_s": round(wall, 1),
            "images": _num(m[1]), "inside_s": _num(m[2]), "images_per_s": _num(m[3]),
            "steady_images_per_s": _num(m[4]) or _num(m[3]), "start_up_s": _num(m[5]) or 0.0,
            "stderr": p.stderr.splitlines()}


def main() -> None:
    from data_scale import make_folder

    from tests.conftest import register_untrained_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", type=int, default=128, help="the model's image size")
    ap.add_argument("--model", default="resnet18", help="cnn or a torchvision backbone")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch_predict.json"))
    args = ap.parse_args()

    data = make_folder(Path.home() / ".cache" / "visiontune" / "bench-20000-128", 20000, 128)
    files = sorted(str(f) for f in data.rglob("*.jpg"))[: args.images]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        listing = tmp / "images"
        listing.mkdir()
        for f in files:   # the first N images, as one folder of links
            (listing / f"{Path(f).parent.name}-{Path(f).name}").symlink_to(f)
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        version = register_untrained_model(uri, "bench", classes=("a", "b", "c", "d"),
                                           image_size=args.size, model=args.model,
                                           artifact_location=str(tmp / "mlruns"))
        common = ["--model", "models:/bench@champion", str(listing), "--tracking-uri", uri]
        print(f"{len(files)} JPEG images (128 px) -> {args.model} at {args.size} px, "
              f"model version {version}", flush=True)
        local = run_predict([*common, "-o", str(tmp / "local.csv"), "--no-ray"], tmp)
        print(f"  one process: {local['wall_s']} s wall, {local['images_per_s']:,.0f} images/s "
              f"over the command, {local['steady_images_per_s']:,.0f} once answering", flush=True)
        ray = run_predict([*common, "-o", str(tmp / "ray.csv"), "--ray"], tmp)
        print(f"  Ray Data:    {ray['wall_s']} s wall, {ray['images_per_s']:,.0f} images/s over "
              f"the command, {ray['steady_images_per_s']:,.0f} once answering (after "
              f"{ray['start_up_s']:.0f} s of start-up)", flush=True)
        import pandas as pd

        a, b = pd.read_csv(tmp / "local.csv"), pd.read_csv(tmp / "ray.csv")
        same = (a.path.tolist() == b.path.tolist() and a.prediction.tolist() ==
                b.prediction.tolist() and float((a.probability - b.probability).abs().max())
                <= 2e-6)
        print(f"  same predictions: {same}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "images": len(files), "model": args.model,
              "size": args.size, "local": local, "ray": ray, "same_predictions": same,
              "ray_vs_local_steady": round(ray["steady_images_per_s"] /
                                           local["steady_images_per_s"], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    if not same:
        sys.exit("the two engines disagree")


if __name__ == "__main__":
    main()
