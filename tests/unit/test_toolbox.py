"""Every option of the deep-learning toolbox: it builds, trains a step, and does its job."""

import numpy as np
import pytest
import torch
from torch import nn

from components.augment import (
    AUGMENTATIONS,
    build_augmentation,
    build_eval_transform,
    build_train_transform,
    plot_augmented_samples,
)
from components.config import CnnConfig, ModelConfig
from components.models import build_model
from components.models.freezing import FROZEN_GROUP, build_param_groups, unfreeze
from components.training.loop import train_one_epoch
from components.training.optim import build_optimizer, build_scheduler

X = torch.randn(4, 3, 32, 32)
Y = torch.tensor([0, 1, 0, 1])
LOADER = [(X, Y, torch.arange(4))]
CPU = torch.device("cpu")


def _step(model, optimizer, **kw):
    return train_one_epoch(model, LOADER, optimizer, nn.CrossEntropyLoss(), CPU, **kw)


@pytest.mark.parametrize("shape", [
    dict(channels=[8]), dict(channels=[8, 16, 32]), dict(kernel_size=5),
    dict(batch_norm=False), dict(pooling="avg"), dict(block_dropout=0.3)])
def test_cnn_shapes_build_and_train(shape):
    model = build_model(ModelConfig(cnn=CnnConfig(**shape), dropout=0.5), 2, 3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(shape.get("channels", CnnConfig().channels))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == \
        shape.get("batch_norm", True)
    assert convs[0].kernel_size == (shape.get("kernel_size", 3),) * 2
    pool = nn.AvgPool2d if shape.get("pooling") == "avg" else nn.MaxPool2d
    assert any(isinstance(m, pool) for m in model.modules())
    assert any(isinstance(m, nn.Dropout2d) for m in model.modules()) == ("block_dropout" in shape)
    before = [p.clone() for p in model.parameters()]
    _step(model, build_optimizer("sgd", model.parameters(), 0.1))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_optimizer_hyperparameters_reach_torch():
    p = [nn.Parameter(torch.zeros(1))]
    adam = build_optimizer("adam", p, 0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01)
    assert adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["eps"] == 1e-6
    assert adam.defaults["weight_decay"] == 0.01
    assert isinstance(build_optimizer("adamw", p, 0.1), torch.optim.AdamW)
    assert isinstance(build_optimizer("nadam", p, 0.1), torch.optim.NAdam)
    assert build_optimizer("rmsprop", p, 0.1, eps=1e-5).defaults["eps"] == 1e-5
    assert build_optimizer("nesterov", p, 0.1, momentum=0.7).defaults["momentum"] == 0.7


def test_weight_decay_shrinks_weights_without_a_gradient():
    w = nn.Parameter(torch.ones(3))
    opt = build_optimizer("sgd", [w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros(3)
    opt.step()
    assert torch.allclose(w, torch.full((3,), 0.95))


def test_l1_penalty_adds_to_the_loss_and_pulls_weights_to_zero():
    torch.manual_seed(0)
    model = nn.Linear(3 * 32 * 32, 2)
    flat = [(X.flatten(1), Y, torch.arange(4))]
    l1_norm = model.weight.abs().sum().item()
    base, _ = train_one_epoch(model, flat, build_optimizer("sgd", model.parameters(), 0.0),
                              nn.CrossEntropyLoss(), CPU)
    with_l1, _ = train_one_epoch(model, flat, build_optimizer("sgd", model.parameters(), 0.0),
                                 nn.CrossEntropyLoss(), CPU, l1=0.01)
    assert with_l1 / 4 == pytest.approx(base / 4 + 0.01 * (l1_norm + model.bias.abs().sum().item()),
                                        rel=1e-4)


def test_gradient_clipping_caps_the_norm():
    model = nn.Linear(3 * 32 * 32, 2)
    # Zero weights: the loss's gradient is large whatever the global RNG drew before (a
    # random start could already be confidently right on these 4 images: a gradient of
    # 1e-11 that no clipping touches, seen in a full suite run).
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    flat = [(X.flatten(1) * 100, Y, torch.arange(4))]
    train_one_epoch(model, flat, build_optimizer("sgd", model.parameters(), 0.0),
                    nn.CrossEntropyLoss(), CPU, grad_clip=0.5)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert norm.item() == pytest.approx(0.5, rel=1e-3)


def test_label_smoothing_changes_the_loss():
    logits = torch.tensor([[10.0, -10.0]])
    target = torch.tensor([0])
    plain = nn.CrossEntropyLoss()(logits, target)
    smooth = nn.CrossEntropyLoss(label_smoothing=0.2)(logits, target)
    assert smooth > plain + 1.0


@pytest.mark.parametrize("name,check", [  # lrs[i] = the lr used in epoch i
    ("step", lambda lrs: lrs[:4] == pytest.approx([0.1, 0.1, 0.01, 0.01])),
    ("cosine", lambda lrs: lrs[0] == 0.1 and lrs[0] > lrs[1] > lrs[2] > lrs[3] >= 0),
    ("onecycle", lambda lrs: lrs[0] < 0.01 and max(lrs) == pytest.approx(0.1, rel=0.25)),
])
def test_schedulers_move_the_learning_rate(name, check):
    opt = build_optimizer("sgd", [nn.Parameter(torch.zeros(1))], 0.1)
    sched, when = build_scheduler(name, opt, epochs=4, steps_per_epoch=1, step_size=2,
                                  gamma=0.1)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert check(lrs)


def test_plateau_scheduler_lowers_lr_when_f1_stalls():
    opt = build_optimizer("sgd", [nn.Parameter(torch.zeros(1))], 0.1)
    sched, when = build_scheduler("plateau", opt, 5, 1, gamma=0.5)
    assert when == "plateau"
    for f1 in (0.5, 0.5, 0.5, 0.5):
        sched.step(f1)
    assert opt.param_groups[0]["lr"] < 0.1


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg16", "mobilenet_v3_small",
                                  "efficientnet_b0"])
def test_backbones_by_name_build_and_train_a_step(arch):
    model = build_model(ModelConfig(name=arch, initializer="default"), 2, 3)
    groups = build_param_groups(model, 0.01, freeze="backbone")
    head_before = [p.clone() for p in model.head_parameters()]
    frozen_before = [p.clone() for p in model.backbone_parameters()]
    _step(model, build_optimizer("sgd", groups, 0.01), )
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head_parameters()))
    # frozen layers keep their weights
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, model.backbone_parameters()))


def test_freeze_up_to_a_named_stage():
    model = build_model(ModelConfig(name="resnet18"), 2, 3)
    build_param_groups(model, 0.01, freeze="stage", stage="layer2")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "net.conv1.weight" in frozen and "net.layer2.1.bn2.bias" in frozen
    assert not any(n.startswith(("net.layer3", "net.layer4", "net.fc")) for n in frozen)
    with pytest.raises(ValueError, match="top-level stages: conv1"):
        build_param_groups(build_model(ModelConfig(name="resnet18"), 2, 3), 0.01,
                           freeze="stage", stage="layer9")


def test_backbone_param_group_has_the_smaller_lr():
    model = build_model(ModelConfig(name="resnet18"), 2, 3)
    opt = build_optimizer("adam", build_param_groups(model, 0.01, backbone_lr_mult=0.1), 0.01)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"head": 0.01, "backbone": pytest.approx(0.001)}


def test_gradual_unfreezing_by_epoch():
    model = build_model(ModelConfig(name="resnet18"), 2, 3)
    groups = build_param_groups(model, 0.01, freeze="backbone", unfreeze_epoch=2,
                                backbone_lr_mult=0.5)
    opt = build_optimizer("sgd_momentum", groups, 0.01)
    sched, _ = build_scheduler("cosine", opt, 4, 1)
    waiting = next(g for g in opt.param_groups if g["name"] == FROZEN_GROUP)
    before = [p.clone() for p in waiting["params"]]
    _step(model, opt)  # epoch 1: the backbone is still frozen
    assert all(torch.equal(a, b) for a, b in zip(before, waiting["params"]))
    sched.step()
    assert waiting["lr"] == 0 and unfreeze(opt, sched)
    assert waiting["lr"] == pytest.approx(0.005)
    _step(model, opt)  # epoch 2: it trains
    assert any(not torch.equal(a, b) for a, b in zip(before, waiting["params"]))
    sched.step()
    assert 0 < waiting["lr"] < 0.005  # the scheduler now decays it instead of resetting to 0


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_augmentation_runs(name):
    params = {"CoarseDropout": {"p": 1.0}, "RandomResizedCrop": {"scale": [0.5, 1.0]}}
    spec = {"name": name, **params.get(name, {"p": 1.0})}
    transform = build_train_transform([spec], 24, 3, [0.5], [0.5])
    image = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    out = transform(image=image)["image"]
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="bad parameters"):
        build_augmentation({"name": name, "not_a_param": 1}, 24)


def test_eval_transform_is_deterministic_normalisation():
    image = np.full((4, 4, 1), 255, dtype=np.uint8)
    out = build_eval_transform(1, [0.5], [0.25])(image=image)["image"]
    assert torch.allclose(out, torch.full((1, 4, 4), 2.0))


def test_augmented_samples_grid_is_a_figure():
    images = [np.full((8, 8, 1), i * 10, dtype=np.uint8) for i in range(20)]
    t = build_train_transform([{"name": "HorizontalFlip", "p": 1.0}], 8, 1, [0.5], [0.5])
    fig = plot_augmented_samples(images, t, [0.5], [0.5], n=16)
    assert len([ax for ax in fig.axes if ax.images]) == 16


def test_seeded_train_transform_is_reproducible():
    spec = [{"name": "Affine", "rotate": [-30, 30], "translate_percent": [-0.2, 0.2], "p": 1.0}]
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 1), dtype=np.uint8)
    a = build_train_transform(spec, 16, 1, [0.5], [0.5], seed=3)(image=image)["image"]
    b = build_train_transform(spec, 16, 1, [0.5], [0.5], seed=3)(image=image)["image"]
    c = build_train_transform(spec, 16, 1, [0.5], [0.5], seed=4)(image=image)["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)
