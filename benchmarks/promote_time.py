"""How long `visiontune promote` takes, and how much of it is the decision's statistics.

Two registered models of the default search's kinds (the default CNN and ResNet-18, freshly
initialised at the default 32 px, 10 classes: the time to classify does not depend on what
the weights learned) are compared with `visiontune promote --data FOLDER --dry-run`, exactly
as a user types it, on a generated labelled folder of 270 images (the default run's test
split) and of 5,000. Both models classify every image; the promotion run's own timings
(`seconds_images`: reading, hashing and fingerprinting the images and dropping those either
model saw; `seconds_load_models`, `seconds_scoring`, `seconds_decision`: the permutation
test, 2,000+ bootstrap resamples, the floor and McNemar's check) give the split; the
command's wall time includes Python, torch and MLflow start-up.

    python benchmarks/promote_time.py              # about 2 minutes on 2 cores
    python benchmarks/promote_time.py --images 270 # one size

Results: benchmarks/results/promote_time.json (not committed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runs import save_results  # noqa: E402  (beside this script)

CLASSES = tuple(str(d) for d in range(10))
NAME = "bench-promote"


def write_folder(root: Path, images: int, size: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        label = CLASSES[i % len(CLASSES)]
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            root / label / f"{i:05d}.png")
    return root


def run_promote(tmp: Path, uri: str, folder: Path) -> dict:
    from mlflow import MlflowClient

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.monotonic()
    p = subprocess.run(["visiontune", "promote", "--model", NAME, "--version", "2", "--data",
                        str(folder), "--dry-run", f"tracking.uri={uri}"], cwd=tmp, env=env,
                       capture_output=True, text=True)
    wall = time.monotonic() - start
    if p.returncode not in (0, 3):
        sys.exit(f"promote failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    client = MlflowClient(uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             f"tags.`visiontune.model_name` = '{NAME}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    m = run.data.metrics
    parts = {k.removeprefix("seconds_"): round(v, 2) for k, v in m.items()
             if k.startswith("seconds_")}
    parts["images_s"] = parts.pop("images")
    return {"images": int(m["images"]), "wall_s": round(wall, 1), **parts,
            "bootstrap_share_of_wall": round(parts["decision"] / wall, 4),
            "stdout": p.stdout.splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[270, 5000])
    args = ap.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from tests.conftest import register_untrained_model

    results = []
    with tempfile.TemporaryDirectory(prefix="visiontune-bench-promote-") as d:
        tmp = Path(d)
        uri = f"sqlite:///{tmp}/mlflow.db"
        for model in ("cnn", "resnet18"):   # v1 = the CNN (champion), v2 = ResNet-18
            register_untrained_model(uri, NAME, classes=CLASSES, image_size=32, model=model,
                                     artifact_location=str(tmp / "art"))
        for n in args.images:
            folder = write_folder(tmp / f"images-{n}", n)
            r = run_promote(tmp, uri, folder)
            print(f"{r['images']:>6,} images: promote {r['wall_s']:.1f} s wall; reading and "
                  f"checking the images {r['images_s']:.1f} s, loading both models "
                  f"{r['load_models']:.1f} s, scoring both {r['scoring']:.1f} s, "
                  f"the decision (permutation test, bootstrap, floor) {r['decision']:.2f} s "
                  f"({100 * r['bootstrap_share_of_wall']:.1f}% of the wall time)", flush=True)
            results.append(r)
    save_results("promote_time", results)

if __name__ == "__main__":
    main()
