"""`visiontune promote` as users run it, against a real `mlflow server` on 127.0.0.1: models
trained here (a small CNN, the pipeline's own epoch loop), registered through the pipeline's
data and register steps, compared by the CLI; the record checked through MlflowClient and
recomputed from its predictions CSV with scipy and numpy.

The data make the point of the gate: a 1-epoch model is clearly worse than a 6-epoch one, and
two 6-epoch models that differ only in their seed differ by an image or two."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import (
    cli_env,
    free_port,
    register_like_the_pipeline,
    stop_group,
    wait_until_ok,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CLASSES = ("a", "b", "c", "d")
SIZE = 16


def noisy_folder(root: Path, per_class: int, seed: int, classes=CLASSES) -> Path:
    """A quadrant 30 levels brighter than noise of 0-170: learnable, not in one epoch."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 170, (SIZE, SIZE, 3)).astype(np.int16)
            r, c = divmod(label % 4, 2)
            img[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 30
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:04d}.png")
    return root


def train(manifest, epochs: int, seed: int):
    """The pipeline's CNN and epoch loop, same config, `epochs` and `seed` apart."""
    from torch.utils.data import DataLoader

    from components.augment import build_eval_transform
    from components.config import CnnConfig, ModelConfig
    from components.data.dataset import ImageDataset
    from components.models import build_model
    from components.training.loop import train_one_epoch

    torch.manual_seed(seed)
    net = build_model(ModelConfig(name="cnn", dropout=0.1, cnn=CnnConfig(channels=[8, 16])),
                      len(manifest.classes), 3)
    paths, labels = manifest.subset("train")
    data = ImageDataset(paths, labels, 3, SIZE, build_eval_transform(3, [0.5] * 3, [0.5] * 3))
    loader = DataLoader(data, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        train_one_epoch(net, loader, opt, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    return net.eval()


class MlflowServer:
    """`mlflow server` (SQLite, proxied artifacts) in its own process group; stop() and
    start() again keep its port and its store."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        log = self.tmp / f"mlflow-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.tmp}/mlflow.db",
             "--artifacts-destination", str(self.tmp / "artifacts"), "--workers", "1"],
            cwd=self.tmp, env=cli_env(), start_new_session=True, stdout=open(log, "w"),
            stderr=subprocess.STDOUT)
        wait_until_ok(f"{self.url}/health", self.proc, log, 120)

    def stop(self):
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promote")
    server = MlflowServer(tmp)
    server.start()
    try:
        data = noisy_folder(tmp / "shapes", 250, seed=0)
        torch.set_num_threads(2)
        nets = {}

        def register(name: str, which: str):
            """`which`: one_epoch | six_a | six_b (6 epochs, seeds 0 and 1)."""
            nonlocal nets
            if not nets:   # the split the pipeline's data step makes: train on its train rows
                from components.data import index_images, split_dataset, validate_images

                manifest = split_dataset(validate_images(index_images(str(data))), 0.15, 0.3, 0)
                nets = {"one_epoch": train(manifest, 1, 0), "six_a": train(manifest, 6, 0),
                        "six_b": train(manifest, 6, 1)}
            return register_like_the_pipeline(server.url, None, data, nets[which], name, SIZE,
                                              3, ("data.test_fraction=0.3",),
                                              {"net": which})[0].version

        yield {"server": server, "tmp": tmp, "data": data, "register": register,
               "client": MlflowClient(server.url)}
    finally:
        server.stop()


def cli(world, *args, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "visiontune"), *args,
                           f"tracking.uri={world['server'].url}"],
                          cwd=world["tmp"], env={**cli_env(), **env}, capture_output=True,
                          text=True, timeout=timeout)


def alias(world, name, which):
    try:
        return str(world["client"].get_model_version_by_alias(name, which).version)
    except Exception:  # noqa: BLE001 (no such alias)
        return None


def promotion_runs(world, name):
    client = world["client"]
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`visiontune.model_name` = '{name}'",
                              order_by=["attributes.start_time ASC"])


def _macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Macro F1 from a confusion matrix, written out (every class counts, 0/0 = 0)."""
    cm = np.zeros((k, k))
    np.add.at(cm, (y, p), 1)
    tp, predicted, actual = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    den = predicted + actual
    return float(np.mean(np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)))


def recompute(world, run, tmp_path):
    """The run's McNemar p-value (scipy) and interval (a plain numpy bootstrap with the run's
    seed and resamples, one resample at a time) from its predictions CSV alone."""
    from scipy.stats import binomtest
    from sklearn.metrics import f1_score

    frame = pd.read_csv(world["client"].download_artifacts(
        run.info.run_id, "promotion/predictions.csv", str(tmp_path)))
    params = run.data.params
    b = int((frame.challenger_correct & ~frame.champion_correct).sum())
    c = int((~frame.challenger_correct & frame.champion_correct).sum())
    classes = sorted(set(frame.label))
    y, a, k = (frame[col].map({n: i for i, n in enumerate(classes)}).to_numpy()
               for col in ("label", "challenger_prediction", "champion_prediction"))
    rng = np.random.default_rng(int(params["seed"]))
    n, resamples, nk = len(frame), int(params["resamples"]), len(classes)
    assert params["f1_average"] == "macro"
    # the written-out F1 is scikit-learn's
    assert _macro_f1(y, a, nk) == pytest.approx(f1_score(y, a, labels=list(range(nk)),
                                                         average="macro", zero_division=0))
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        diffs.append(_macro_f1(y[i], a[i], nk) - _macro_f1(y[i], k[i], nk))
    tail = (1 - float(params["confidence"])) / 2 * 100
    return b, c, binomtest(b, b + c, 0.5).pvalue, np.percentile(diffs, [tail, 100 - tail])


def test_better_model_is_promoted_and_a_reseeded_twin_is_not(world, tmp_path):
    reg = world["register"]
    assert reg("pets", "one_epoch") == "1"   # the first version is the champion
    assert reg("pets", "six_a") == "2"
    promoted = cli(world, "promote", "--model", "pets")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    out = promoted.stdout
    assert "promote: pets v2 (challenger) vs v1 (champion)" in out
    assert "300 images: differences below about 0.020 (6 images) cannot be told from noise" in out
    assert "promote: the challenger is better" in out
    assert "models:/pets@champion -> version 2 (previous-champion -> 1)" in out
    assert (alias(world, "pets", "champion"), alias(world, "pets", "previous-champion")) == \
        ("2", "1")

    assert reg("pets", "six_b") == "3"   # same config as v2, another seed
    refused = cli(world, "promote", "--model", "pets")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    out = refused.stdout
    lines = out.splitlines()
    power = next(i for i, line in enumerate(lines) if "cannot be told from noise" in line)
    verdict = next(i for i, line in enumerate(lines) if line.startswith("keep the champion"))
    assert power < verdict   # the power line comes before the decision
    assert "95% interval [" in out and "McNemar exact test" in out and ", p = " in out
    assert "not shown to be better" in lines[verdict] and refused.stderr.strip() == ""
    assert alias(world, "pets", "champion") == "2"

    # the record, through MlflowClient, and recomputed from its predictions
    first, second = promotion_runs(world, "pets")
    for run, decision in ((first, "promoted"), (second, "rejected")):
        assert run.info.status == "FINISHED"
        assert run.data.tags["visiontune.role"] == "promotion"
        assert run.data.tags["promotion.decision"] == decision
        assert run.data.params["from_test_split"] == "True"
        b, c, p, (low, high) = recompute(world, run, tmp_path)
        m = run.data.metrics
        assert (m["challenger_only_right"], m["champion_only_right"]) == (b, c)
        assert m["mcnemar_p"] == pytest.approx(p, rel=1e-9)
        assert (m["ci_low"], m["ci_high"]) == (pytest.approx(low, abs=1e-9),
                                               pytest.approx(high, abs=1e-9))
        assert m["images"] == 300
    # promoted on a lower bound above 0; refused on one at or below it (twins that agree on
    # every image have the interval [0, 0])
    assert first.data.metrics["ci_low"] > 0 >= second.data.metrics["ci_low"]
    v3 = world["client"].get_model_version("pets", "3").tags
    assert v3["promotion.run_id"] == second.info.run_id and v3["promotion.decision"] == "rejected"
    assert v3["promotion.p_value"] and v3["promotion.interval"].endswith("at 95%")
    assert world["client"].get_model_version("pets", "2").tags["promotion.decision"] == \
        "kept (v3 rejected)"


def test_promote_on_new_images_and_on_images_with_an_unknown_class(world):
    reg = world["register"]
    reg("fresh", "one_epoch")
    reg("fresh", "six_a")
    new = noisy_folder(world["tmp"] / "collected", 40, seed=11)
    # A job's environment may name another store: promote still reads its own (MLflow
    # resolved models:/m-<id> through MLFLOW_TRACKING_URI: "Logged model ... not found").
    dry = cli(world, "promote", "--model", "fresh", "--data", str(new), "--dry-run",
              MLFLOW_TRACKING_URI=f"sqlite:///{world['tmp']}/another.db")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"images: 160 from --data {new}" in dry.stdout and "[dry run" in dry.stdout
    assert alias(world, "fresh", "champion") == "1"
    (run,) = promotion_runs(world, "fresh")
    assert run.data.params["data_source"] == f"--data {new}"
    assert run.data.params["from_test_split"] == "False"
    assert run.data.tags["promotion.decision"] == "would promote"
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["fresh-promotion-images"]

    birds = noisy_folder(world["tmp"] / "with_birds", 10, seed=12, classes=("a", "bird"))
    bad = cli(world, "promote", "--model", "fresh", "--data", str(birds))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("visiontune: ") and "classes the models do not know: bird" in line
    missing = cli(world, "promote", "--model", "fresh", "--data", str(world["tmp"] / "none"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert alias(world, "fresh", "champion") == "1"
    assert len(promotion_runs(world, "fresh")) == 1


def test_two_promotes_at_once_never_promote_unseen(world):
    reg = world["register"]
    for which in ("one_epoch", "six_a", "six_b"):
        reg("duel", which)
    procs = [subprocess.Popen([str(Path(sys.executable).parent / "visiontune"), "promote",
                               "--model", "duel", "--version", v,
                               f"tracking.uri={world['server'].url}"],
                              cwd=world["tmp"], env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for v in ("2", "3")]
    outcomes = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(code for _, _, code in outcomes)
    # one promoted; the other saw the champion change (1) or lost to the new one (3)
    assert codes[0] == 0 and codes[1] in (1, 3), outcomes
    for out, err, code in outcomes:
        if code == 1:
            assert "changed from v1 to" in err and "nothing moved" in err, err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    champion, previous = alias(world, "duel", "champion"), alias(world, "duel", "previous-champion")
    runs = {r.info.run_id: r for r in promotion_runs(world, "duel")}
    won = runs[world["client"].get_model_version("duel", champion).tags["promotion.run_id"]]
    assert won.data.tags["promotion.decision"] == "promoted"
    assert won.data.params["challenger_version"] == champion
    assert won.data.params["champion_version"] == previous   # compared with its predecessor
    for run in runs.values():
        if run.data.tags["promotion.decision"] in ("rejected", "aborted"):
            assert run.data.params["challenger_version"] not in (champion, previous)
    assert not [m.name for m in world["client"].search_registered_models()
                if m.name.endswith(".alias-lock")]


def test_tracking_server_stopped_mid_promote_moves_nothing(world):
    reg = world["register"]
    reg("outage", "one_epoch")
    reg("outage", "six_a")
    many = noisy_folder(world["tmp"] / "many", 500, seed=13)   # scoring takes seconds
    proc = subprocess.Popen([str(Path(sys.executable).parent / "visiontune"), "promote",
                             "--model", "outage", "--data", str(many),
                             f"tracking.uri={world['server'].url}"],
                            cwd=world["tmp"], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.lstrip().startswith("scoring"):
                world["server"].stop()
                break
        out, err = proc.communicate(timeout=240)
    finally:
        stop_group(proc)
    try:
        assert proc.returncode == 1, out + err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "the champion was not moved" in err
    finally:
        world["server"].start()
    assert (alias(world, "outage", "champion"), alias(world, "outage", "previous-champion")) == \
        ("1", None)
    assert "promotion.decision" not in world["client"].get_model_version("outage", "2").tags
