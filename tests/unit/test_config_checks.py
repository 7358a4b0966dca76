"""Configs that can never work are refused before Ray starts: F1 averaging against the number
of classes, backbones against the image size, every combination a search can launch."""

import dataclasses

import pytest

from components.config import CnnConfig, Config, ConfigError, ModelConfig
from components.models import check_model_input
from components.training.metrics import check_average
from components.tuning.space import check_space, parse_space

CFG = Config()
SECTIONS = {s: getattr(CFG, s) for s in ("data", "augment", "model", "train")}


def _sections(**changes):
    out = dict(SECTIONS)
    for key, value in changes.items():
        section, name = key.split("__")
        out[section] = dataclasses.replace(out[section], **{name: value})
    return out


# ----------------------------------------------------------------------------- F1 averaging

def test_binary_average_on_ten_classes_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        check_average("binary", 10)
    msg = str(e.value)
    assert msg == ("evaluation.average=binary needs exactly 2 classes; the data has 10 "
                   "(use macro or weighted, or auto)")


@pytest.mark.parametrize("average,classes,resolved", [
    ("auto", 2, "binary"), ("auto", 10, "macro"), ("macro", 10, "macro"),
    ("weighted", 3, "weighted"), ("binary", 2, "binary"), ("macro", 2, "macro")])
def test_averages_that_fit(average, classes, resolved):
    assert check_average(average, classes) == resolved


def test_unknown_average_is_a_config_error():
    with pytest.raises(ConfigError, match="evaluation.average=micro is not valid"):
        check_average("micro", 10)


# ----------------------------------------------------------------------------- model input

@pytest.mark.parametrize("name,size,works", [("vgg11", 16, 32), ("alexnet", 32, 63)])
def test_backbone_too_deep_for_small_images_is_refused(name, size, works):
    with pytest.raises(ConfigError) as e:
        check_model_input(ModelConfig(name=name), size, 3)
    msg = str(e.value)
    assert msg.startswith(f"model.name={name} cannot take data.image_size={size} images")
    assert msg.endswith("use a larger data.image_size or another model")
    assert "\n" not in msg
    check_model_input(ModelConfig(name=name), works, 3)


def test_fixed_size_backbone_is_refused_at_another_size():
    with pytest.raises(ConfigError, match=r"model.name=vit_b_16 cannot take "
                                          r"data.image_size=32 .*Expected 224"):
        check_model_input(ModelConfig(name="vit_b_16"), 32, 3)


def test_resnet18_at_32_px_grey_is_fine_and_never_loads_weights(monkeypatch):
    import components.models.transfer as transfer

    def no_loading(*args, **kwargs):
        raise AssertionError("the input check must not load weights")

    monkeypatch.setattr(transfer, "load_pretrained_state", no_loading)
    # pretrained=true with no weights file: the check still builds from scratch.
    check_model_input(ModelConfig(name="resnet18", pretrained=True, weights_path="/nope.pth"),
                      32, 1)
    check_model_input(ModelConfig(name="resnet18"), 32, 3)


def test_backbone_without_a_linear_head_is_refused():
    with pytest.raises(ConfigError, match=r"^model.name=squeezenet1_0 has no replaceable "
                                          r"classification head \(no final nn.Linear\)$"):
        check_model_input(ModelConfig(name="squeezenet1_0"), 224, 3)


def test_aux_classifier_backbones_train_on_plain_logits():
    # GoogLeNet/Inception return namedtuples in training mode unless their aux heads go.
    check_model_input(ModelConfig(name="googlenet"), 64, 3)
    check_model_input(ModelConfig(name="inception_v3"), 75, 3)
    with pytest.raises(ConfigError, match="model.name=inception_v3 cannot take "
                                          "data.image_size=64"):
        check_model_input(ModelConfig(name="inception_v3"), 64, 3)


def test_deep_small_cnn_on_a_tiny_image_still_works():
    # ceil_mode pooling stops at 1x1 and the adaptive pool restores 4x4: no size is too small.
    deep = ModelConfig(name="cnn", cnn=CnnConfig(channels=[8, 16, 32, 64, 128, 256]))
    check_model_input(deep, 16, 1)
    check_model_input(deep, 2, 3)


def test_missing_freeze_stage_is_refused():
    with pytest.raises(ConfigError, match="model.freeze_stage=layer9 is not a module of "
                                          "model.name=resnet18; its top-level stages: conv1"):
        check_model_input(ModelConfig(name="resnet18", freeze="stage", freeze_stage="layer9"),
                          32, 3)
    check_model_input(ModelConfig(name="resnet18", freeze="stage", freeze_stage="layer2"), 32, 3)


# ----------------------------------------------------------------------------- search space

TWO_CHOICES = {"model.name": {"choice": ["cnn", "resnet18"]},
               "model.freeze": {"choice": ["none", "backbone"]}}


def test_two_values_fine_alone_but_not_together_are_refused():
    # With the config's model.name=resnet18 each value is valid on its own; cnn + backbone
    # is what a random draw can hit.
    sections = _sections(model__name="resnet18")
    with pytest.raises(ConfigError) as e:
        check_space(parse_space(TWO_CHOICES), sections, "random")
    msg = str(e.value)
    assert msg.startswith("search.space: the combination model.name=cnn, model.freeze=backbone "
                          "is invalid: ")
    assert "transfer models" in msg


def test_a_when_condition_makes_the_same_choices_valid():
    space = {**TWO_CHOICES, "model.freeze": {"choice": ["none", "backbone"],
                                             "when": {"model.name": ["resnet18"]}}}
    check_space(parse_space(space), _sections(model__name="resnet18"), "random")
    check_space(parse_space(space), SECTIONS, "random")


def test_grid_refuses_only_the_backbone_and_size_that_clash():
    space = {"model.name": {"grid": ["cnn", "vgg11"]}, "data.image_size": {"grid": [16, 64]}}
    with pytest.raises(ConfigError) as e:
        check_space(parse_space(space), SECTIONS, "grid")
    msg = str(e.value)
    assert msg.startswith("search.space: the combination model.name=vgg11, data.image_size=16 "
                          "is invalid: model.name=vgg11 cannot take data.image_size=16 images")
    # The three other points are fine: without size 16 the grid passes.
    space["data.image_size"] = {"grid": [64]}
    check_space(parse_space(space), SECTIONS, "grid")
    space["data.image_size"] = {"grid": [16, 64]}
    space["model.name"] = {"grid": ["cnn"]}
    check_space(parse_space(space), SECTIONS, "grid")


def test_random_range_ends_are_crossed_with_the_grid():
    # The image size drawn at random meets the grid's vgg11 at its low end only.
    space = {"model.name": {"grid": ["cnn", "vgg11"]}, "data.image_size": {"randint": [16, 64]}}
    with pytest.raises(ConfigError, match="model.name=vgg11, data.image_size=16 is invalid"):
        check_space(parse_space(space), SECTIONS, "grid+random")
    # In grid mode the random axis keeps the config's value (32), which vgg11 takes.
    check_space(parse_space(space), SECTIONS, "grid")


def test_base_config_alone_is_checked_and_one_searched_key_is_named_alone():
    with pytest.raises(ConfigError, match="^model.name=vgg11 cannot take data.image_size=16"):
        check_space([], _sections(model__name="vgg11", data__image_size=16), "grid")
    with pytest.raises(ConfigError, match=r"^search.space.model.name=squeezenet1_0: model.name="
                                          r"squeezenet1_0 has no replaceable"):
        check_space(parse_space({"model.name": {"choice": ["cnn", "squeezenet1_0"]}}),
                    SECTIONS, "random")


def test_data_rules_across_keys_hold_in_every_combination():
    space = {"data.channels": {"grid": [1, 3]}}
    sections = _sections(data__mean=[0.5, 0.5, 0.5], data__std=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match=r"^search.space.data.channels=1: data.mean needs 1 or "
                                          r"data.channels=1 values, got 3"):
        check_space(parse_space(space), sections, "grid")


def test_values_never_launched_are_still_type_checked():
    space = {"train.optimizer": {"grid": ["adam"]},
             "train.momentum": {"grid": [1.5], "when": {"train.optimizer": ["sgd_momentum"]}}}
    with pytest.raises(ConfigError, match="train.momentum=1.5 must be in"):
        check_space(parse_space(space), SECTIONS, "grid")


def test_a_huge_space_falls_back_to_pairs_and_still_finds_a_clash(monkeypatch):
    import components.tuning.space as space_module

    monkeypatch.setattr(space_module, "MAX_COMBINATIONS", 10)
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]},
             "model.dropout": {"uniform": [0.0, 0.5]},
             "model.name": {"choice": ["cnn", "resnet18"]},
             "model.freeze": {"choice": ["none", "backbone"]}}
    with pytest.raises(ConfigError, match="model.name=cnn, model.freeze=backbone"):
        check_space(parse_space(space), _sections(model__name="resnet18"), "random")


@pytest.mark.timed
def test_default_search_is_valid_and_fast():
    import time

    from pipelines.compose import load_config

    cfg = load_config([], resolve=False)
    sections = {s: getattr(cfg, s) for s in ("data", "augment", "model", "train")}
    axes = parse_space(cfg.search.space)
    check_space(axes, sections, cfg.search.mode)  # warm: model checks cached, imports done
    started = time.perf_counter()
    check_space(axes, sections, cfg.search.mode)
    assert time.perf_counter() - started < 5

