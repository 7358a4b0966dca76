import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.training.loop import predict, train_one_epoch
from components.training.optim import (
    OPTIMIZER_NAMES,
    SCHEDULER_NAMES,
    build_optimizer,
    build_scheduler,
)
from components.training.ranks import evaluate_split


class Blobs(Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 4, generator=g) + self.y[:, None] * 3.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def test_train_one_epoch_lowers_the_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = build_optimizer("adam", model.parameters(), 0.05)
    loader = DataLoader(Blobs(), batch_size=16, shuffle=True)
    first, n = train_one_epoch(model, loader, opt, nn.CrossEntropyLoss(), torch.device("cpu"))
    for _ in range(5):
        last, _ = train_one_epoch(model, loader, opt, nn.CrossEntropyLoss(), torch.device("cpu"))
    assert n == 64 and last < first


def test_predict_returns_every_row_once_and_evaluate_split_scores_the_whole_split():
    model = nn.Linear(4, 2)
    loader = DataLoader(Blobs(10), batch_size=3)
    idx, y, probs, losses = predict(model, loader, torch.device("cpu"))
    assert sorted(idx.tolist()) == list(range(10)) and probs.shape == (10, 2)
    assert torch.allclose(probs.sum(1), torch.ones(10))
    metrics = evaluate_split(model, loader, torch.device("cpu"), 2, "macro")
    assert set(metrics) == {"accuracy", "precision", "recall", "f1", "loss"}
    assert metrics["loss"] == pytest.approx(losses.mean().item())


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_takes_a_step(name):
    model = nn.Linear(4, 2)
    before = model.weight.clone()
    opt = build_optimizer(name, model.parameters(), 0.1)
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_optimizer_variants():
    params = [nn.Parameter(torch.zeros(1))]
    assert build_optimizer("sgd", params, 0.1).defaults["momentum"] == 0
    assert build_optimizer("sgd_momentum", params, 0.1, momentum=0.8).defaults["momentum"] == 0.8
    assert build_optimizer("nesterov", params, 0.1).defaults["nesterov"] is True
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer("adamx", params, 0.1)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_schedulers_build(name):
    opt = build_optimizer("sgd", [nn.Parameter(torch.zeros(1))], 0.1)
    sched, when = build_scheduler(name, opt, epochs=3, steps_per_epoch=4)
    assert (sched is None) == (name == "none")
    assert when in (None, "batch", "epoch", "plateau")


def test_sharded_evaluation_reassembles_the_whole_split(monkeypatch, tmp_path):
    """Two ranks' shards, gathered, give the same metrics as the whole split on one rank."""
    from PIL import Image

    from components.augment import build_eval_transform
    from components.data.dataset import ImageDataset
    from components.training import ranks

    paths, labels = [], []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.new("L", (4, 4), 30 * i).save(p)
        paths.append(str(p))
        labels.append(i % 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    t = build_eval_transform(1, [0.5], [0.5])

    def shard(rank):
        ids = list(range(rank, 7, 2))
        ds = ImageDataset([paths[i] for i in ids], [labels[i] for i in ids], 1, 4, t, ids=ids)
        idx, y, probs, losses = predict(model, DataLoader(ds, batch_size=2),
                                        torch.device("cpu"))
        return (idx.tolist(), y.tolist(), probs.argmax(1).tolist(), losses.tolist())

    monkeypatch.setattr(ranks, "_gather", lambda local: [shard(0), shard(1)])
    whole = ImageDataset(paths, labels, 1, 4, t)
    gathered = ranks.evaluate_split(model, DataLoader(whole), torch.device("cpu"), 2, "macro")
    monkeypatch.setattr(ranks, "_gather", lambda local: [local])
    single = ranks.evaluate_split(model, DataLoader(whole), torch.device("cpu"), 2, "macro")
    assert gathered == pytest.approx(single)


@pytest.mark.parametrize("patience,f1s,stop_at,best", [
    (2, [0.5, 0.6, 0.6, 0.55, 0.9], 4, (0.6, 2)),   # equal is not a gain
    (0, [0.5, 0.4, 0.3, 0.2], None, (0.5, 1)),      # 0 = never stop
    (1, [0.5, 0.7, 0.6], 3, (0.7, 2)),
])
def test_early_stopping_with_patience(patience, f1s, stop_at, best):
    from components.training.loop import track_best

    state = {"epoch": 0, "best_val_f1": -1.0, "best_val_loss": float("inf"), "best_epoch": 0,
             "epochs_without_gain": 0}
    stopped = None
    for epoch, f1 in enumerate(f1s, start=1):
        improved, stop = track_best(state, epoch, f1, 1.0 - f1, patience)
        assert improved == (f1 == state["best_val_f1"] and state["best_epoch"] == epoch)
        if stop:
            stopped = epoch
            break
    assert stopped == stop_at
    assert (state["best_val_f1"], state["best_epoch"]) == best


def test_optuna_searcher_suggests_from_the_space():
    from components.config import Config, SearchConfig
    from components.tuning.driver import build_search_alg
    from components.tuning.plan import ResourcePlan
    from components.tuning.space import parse_space, to_tune_space

    cfg = Config()
    sections = {s: getattr(cfg, s) for s in ("data", "augment", "model", "train")}
    axes = parse_space({"train.optimizer": {"choice": ["adam", "sgd_momentum"]},
                        "train.lr": {"loguniform": [1e-4, 1e-2]}})
    space, n = to_tune_space(axes, "random", sections, 5)
    search = SearchConfig(algorithm="optuna", mode="random")
    alg = build_search_alg(search, axes, ResourcePlan(5, 1, {"CPU": 1.0}, 2, {"CPU": 2}), 0)
    assert alg.set_search_properties("best_val_f1", "max", space)
    suggested = [alg.suggest(f"t{i}") for i in range(2)]
    assert alg.suggest("t2") is None  # ConcurrencyLimiter: 2 trials at once
    for s in suggested:
        assert s["train.optimizer"] in ("adam", "sgd_momentum") and 1e-4 <= s["train.lr"] <= 1e-2


def test_loader_workers_draw_their_own_augmentations(tmp_path):
    """data.loader_workers > 0: every loader process starts with a copy of the transform and
    its RNG; seeded per worker (torch's recipe) they must not apply identical augmentations,
    and the same generator seed gives the same draws again."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    from components.augment import build_train_transform
    from components.data.dataset import ImageDataset, seed_loader_worker

    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(path)
    transform = build_train_transform([{"name": "Affine", "rotate": 30, "translate_percent": 0.1}],
                                      32, 3, [0.5] * 3, [0.5] * 3, seed=0)
    ds = ImageDataset([str(path)] * 8, [0] * 8, 3, 32, transform)

    def draws(seed: int, init):
        loader = DataLoader(ds, batch_size=4, num_workers=2, worker_init_fn=init,
                            generator=torch.Generator().manual_seed(seed))
        return [batch[0] for batch in loader]   # batch 0 from worker 0, batch 1 from worker 1

    unseeded = draws(0, None)
    assert torch.equal(unseeded[0], unseeded[1])   # the defect: both workers drew alike
    seeded = draws(0, seed_loader_worker)
    assert not torch.equal(seeded[0], seeded[1])
    again = draws(0, seed_loader_worker)
    assert all(torch.equal(a, b) for a, b in zip(seeded, again))
