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
    MLFLOW_SERVER_ENV,
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
            cwd=self.tmp, env=cli_env(**MLFLOW_SERVER_ENV), start_new_session=True,
            stdout=open(log, "w"),
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

        def trained(which: str):
            """`which`: one_epoch | six_a | six_b (6 epochs, seeds 0 and 1)."""
            if not nets:   # the split the pipeline's data step makes: train on its train rows
                from components.data import index_images, split_dataset, validate_images

                manifest = split_dataset(validate_images(index_images(str(data))), 0.15, 0.3, 0)
                nets.update(one_epoch=train(manifest, 1, 0), six_a=train(manifest, 6, 0),
                            six_b=train(manifest, 6, 1))
            return nets[which]

        def register_on(folder: Path, name: str, which: str):
            """`trained(which)` registered over `folder` (its own split, test fraction 0.3)."""
            return register_like_the_pipeline(server.url, None, folder, trained(which), name,
                                              SIZE, 3, ("data.test_fraction=0.3",),
                                              {"net": which})

        def register(name: str, which: str):
            return register_on(data, name, which)[0].version

        yield {"server": server, "tmp": tmp, "data": data, "register": register,
               "register_on": register_on, "client": MlflowClient(server.url)}
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
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0   # twins that agree everywhere
    return b, c, p, np.percentile(diffs, [tail, 100 - tail])


def permutation_p(world, run, tmp_path, draws: int = 400) -> float:
    """The decision's p from the predictions CSV alone: random swaps of each image's two
    answers, one at a time (p = 1 when no image gets different answers)."""
    frame = pd.read_csv(world["client"].download_artifacts(
        run.info.run_id, "promotion/predictions.csv", str(tmp_path)))
    classes = sorted(set(frame.label))
    y, a, k = (frame[col].map({n: i for i, n in enumerate(classes)}).to_numpy()
               for col in ("label", "challenger_prediction", "champion_prediction"))
    nk = len(classes)
    observed = _macro_f1(y, a, nk) - _macro_f1(y, k, nk)
    if (a == k).all():
        return 1.0
    rng, hits = np.random.default_rng(0), 0
    for _ in range(draws):
        swap = rng.random(len(y)) < 0.5
        a2, k2 = np.where(swap, k, a), np.where(swap, a, k)
        hits += _macro_f1(y, a2, nk) - _macro_f1(y, k2, nk) >= observed - 1e-12
    return (1 + hits) / (1 + draws)


def test_better_model_is_promoted_and_a_reseeded_twin_is_not(world, tmp_path):
    reg = world["register"]
    assert reg("pets", "one_epoch") == "1"   # the first version is the champion
    assert reg("pets", "six_a") == "2"
    promoted = cli(world, "promote", "--model", "pets")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    out = promoted.stdout
    print(out)   # docs/promotion.md shows it (pytest -s)
    assert "promote: pets v2 (challenger) vs v1 (champion)" in out
    assert "images: at least 6 must differ, all in the challenger's favour" in out
    assert "comparison #1 on these images" in out
    assert "smallest difference this rule can promote on these" in out
    assert "promote: the challenger is better: permutation p = " in out
    assert "models:/pets@champion -> version 2 (previous-champion -> 1)" in out
    assert (alias(world, "pets", "champion"), alias(world, "pets", "previous-champion")) == \
        ("2", "1")

    assert reg("pets", "six_b") == "3"   # same config as v2, another seed
    refused = cli(world, "promote", "--model", "pets")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    out = refused.stdout
    print(out)
    lines = out.splitlines()
    power = next(i for i, line in enumerate(lines) if "at least 6 must differ" in line)
    verdict = next(i for i, line in enumerate(lines) if line.startswith("keep the champion"))
    assert power < verdict   # what any challenger needs comes before the decision
    assert "95% interval [" in out and "accuracy check (McNemar, not the decision)" in out
    assert "decision's test: paired permutation test of the macro F1 difference, p = " in out
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
        independent = permutation_p(world, run, tmp_path)
        if independent == 1.0:
            assert m["p_value"] == 1.0
        else:   # no random swap did as well: both at their resolution
            assert independent == 1 / 401 and m["p_value"] <= 1 / 401
        assert (m["ci_low"], m["ci_high"]) == (pytest.approx(low, abs=1e-9),
                                               pytest.approx(high, abs=1e-9))
        assert 250 <= m["images"] <= 350   # a test fraction of 0.3 of 1,000 images
        assert run.data.params["seed_set"] == "False"   # derived from the versions and images
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


def photo(rng: np.random.Generator, label: int, size: int = 128) -> Image.Image:
    """A smooth random colour field (photo-like: its low frequencies differ from image to
    image) with the class's quadrant brighter, as the nets above learned."""
    small = rng.integers(0, 170, (8, 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), np.int16)
    r, c = divmod(label % 4, 2)
    h = size // 2
    img[r * h:(r + 1) * h, c * h:(c + 1) * h] += 40
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def users_folder(root: Path, per_class: int, seed: int, start: int = 0) -> dict:
    """What users' folders hold: distinct photos, exact copies under other names, re-encoded
    near-copies (90% size, JPEG quality 70) and the same bytes filed under two classes.
    Returns the planted pairs."""
    rng = np.random.default_rng(seed)
    planted = {"copies": [], "near": [], "conflicts": []}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            photo(rng, label).save(root / name / f"{i:04d}.jpg", quality=90)
    if start:
        return planted
    for label, name in enumerate(CLASSES):
        for i in range(5):   # 20 exact copies
            src = root / name / f"{i:04d}.jpg"
            dst = root / name / f"copy_{i:04d}.jpg"
            dst.write_bytes(src.read_bytes())
            planted["copies"].append((src, dst))
        for i in range(5, 8):   # 12 near-copies
            src = root / name / f"{i:04d}.jpg"
            dst = root / name / f"resaved_{i:04d}.jpg"
            with Image.open(src) as im:
                im.resize((115, 115), Image.BILINEAR).save(dst, quality=70)   # 90%
            planted["near"].append((src, dst))
    for i in range(3):   # the same bytes as class a and as class b
        src = root / "a" / f"{10 + i:04d}.jpg"
        dst = root / "b" / f"also_a_{i:04d}.jpg"
        dst.write_bytes(src.read_bytes())
        planted["conflicts"].append((src, dst))
    return planted


def _splits(world, run_id: str, tmp_path: Path) -> pd.DataFrame:
    folder = world["client"].download_artifacts(run_id, "data", str(tmp_path / run_id))
    return pd.read_csv(Path(folder) / "split_manifest.csv")


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_grown_folder_is_compared_on_images_neither_model_saw(world, tmp_path):
    """The issue's folder: copies, near-copies and label conflicts; the champion trained on it,
    the challenger on it plus 30 new images. The test split stays put, promote decides without
    --force on images neither trained or selected on, and refuses the challenger's own
    training images as evidence."""
    import shutil

    old = world["tmp"] / "users_v1"
    planted = users_folder(old, 60, seed=21)
    grown = world["tmp"] / "users_v2"
    shutil.copytree(old, grown)
    users_folder(grown, 8, seed=22, start=1000)   # 32 new images
    v1, m1 = world["register_on"](old, "grown", "one_epoch")
    v2, m2 = world["register_on"](grown, "grown", "six_a")
    assert (v1.version, v2.version) == ("1", "2")
    s1, s2 = (_splits(world, _run_of(world, "grown", v), tmp_path) for v in ("1", "2"))
    # the split stays put: rows of the old folder keep their split in the grown one
    rel = lambda frame, root: {str(Path(p).relative_to(root)): s   # noqa: E731
                               for p, s in zip(frame.path, frame.split)}
    before, after = rel(s1, old), rel(s2, grown)
    assert all(after[p] == "test" for p, s in before.items() if s == "test")
    assert not [p for p, s in before.items() if s != "test" and after[p] == "test"]
    # copies never straddle a split, conflicting bytes under no label
    for src, dst in planted["copies"] + planted["near"]:
        a, b = (after.get(str(Path(x).relative_to(old))) for x in (src, dst))
        assert a == b, (src, dst, a, b)
    for src, dst in planted["conflicts"]:
        assert str(Path(src).relative_to(old)) not in after
        assert str(Path(dst).relative_to(old)) not in after

    out = cli(world, "promote", "--model", "grown", "--dry-run")   # v1 stays the champion
    assert out.returncode in (0, 3), out.stdout + out.stderr
    assert "different test images" not in out.stdout and "comparison #1" in out.stdout
    print(out.stdout)
    (run,) = promotion_runs(world, "grown")
    scored = pd.read_csv(world["client"].download_artifacts(
        run.info.run_id, "promotion/images.csv", str(tmp_path)))
    seen = {_sha(p) for frame in (s1, s2) for p, s in zip(frame.path, frame.split)
            if s in ("train", "val")}
    assert len(scored) >= 30 and not [p for p in scored.path if _sha(p) in seen]
    near_of = {str(b): str(a) for a, b in planted["near"]} | \
        {str(a): str(b) for a, b in planted["near"]}
    trained = {str(p) for frame in (s1, s2) for p, s in zip(frame.path, frame.split)
               if s in ("train", "val")}
    for p in scored.path:   # no scored image is a near-copy of one either model saw
        twin = near_of.get(str(Path(p)).replace(str(grown), str(old)))
        assert twin is None or twin.replace(str(old), str(grown)) not in trained
        assert twin is None or twin not in trained

    # the challenger's own training images are no evidence: one line, neither 0 nor 3
    own = tmp_path / "own"
    for p, s, label in zip(s2.path, s2.split, s2.label):
        if s == "train":
            (own / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, own / label / Path(p).name)
    refused = cli(world, "promote", "--model", "grown", "--data", str(own))
    assert refused.returncode not in (0, 3), refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "seen by neither" in line and "nothing moved" in line and "Traceback" not in line
    assert alias(world, "grown", "champion") == "1"

    # a split manifest given as --data: only its test rows are scored
    csv = tmp_path / "manifest.csv"
    s2.to_csv(csv, index=False)
    by_csv = cli(world, "promote", "--model", "grown", "--data", str(csv), "--dry-run")
    assert by_csv.returncode == 0, by_csv.stdout + by_csv.stderr
    last = promotion_runs(world, "grown")[-1]
    tests = int((s2.split == "test").sum())
    assert int(last.data.metrics["images"]) + int(last.data.metrics["images_dropped"]) == tests


def _run_of(world, name: str, version: str) -> str:
    return world["client"].get_model_version(name, version).run_id
