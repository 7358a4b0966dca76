import pytest
import torch
import torchvision
from torch import nn

from components.config import CnnConfig, ModelConfig
from components.models import (
    ACTIVATIONS,
    INITIALIZER_NAMES,
    SmallCNN,
    WeightsNotFoundError,
    apply_initializer,
    build_model,
)


@pytest.mark.parametrize("size", [8, 32, 57])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_cnn_any_input_size(size, in_channels):
    model = SmallCNN(num_classes=5, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 5)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_cnn_activations(activation):
    cfg = ModelConfig(activation=activation, cnn=CnnConfig(channels=[4, 8]))
    model = build_model(cfg, 3, 1)
    assert any(isinstance(m, ACTIVATIONS[activation]) for m in model.modules())


def _weights(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_zero_init_really_is_zero():
    model = apply_initializer(SmallCNN(3, 1, batch_norm=False), "zeros")
    for layer in _weights(model):
        assert torch.count_nonzero(layer.weight) == 0
        assert layer.bias is None or torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("name", [n for n in INITIALIZER_NAMES if n not in ("default", "zeros")])
def test_initializers_set_weights_and_zero_biases(name):
    torch.manual_seed(0)
    model = SmallCNN(3, 1, channels=(16, 32), batch_norm=False)
    before = [layer.weight.clone() for layer in _weights(model)]
    apply_initializer(model, name)
    for layer, old in zip(_weights(model), before):
        assert not torch.equal(layer.weight, old)
        assert torch.count_nonzero(layer.bias) == 0


def test_kaiming_normal_has_the_expected_spread():
    layer = nn.Linear(1000, 1000)
    apply_initializer(layer, "kaiming_normal")
    # std = sqrt(2 / fan_in)
    assert layer.weight.std().item() == pytest.approx((2 / 1000) ** 0.5, rel=0.05)


def test_unknown_initializer_lists_valid_names():
    with pytest.raises(ValueError, match="xavier_uniform"):
        apply_initializer(nn.Linear(2, 2), "glorot")


@pytest.mark.parametrize("in_channels", [1, 3])
def test_resnet18_new_head_and_channels(in_channels):
    model = build_model(ModelConfig(name="resnet18", dropout=0.3), 7, in_channels)
    assert model(torch.randn(2, in_channels, 32, 32)).shape == (2, 7)
    head = model.net.get_submodule(model.head_name)
    assert isinstance(head[0], nn.Dropout) and head[0].p == 0.3
    assert head[1].out_features == 7


def test_pretrained_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="never downloads"):
        build_model(ModelConfig(name="resnet18", pretrained=True), 2, 3)


def test_pretrained_from_local_file(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(name="resnet18", pretrained=True, weights_path=str(path)),
                        2, 3)
    assert torch.equal(model.net.conv1.weight, source.conv1.weight)
    # the new head is not the pretrained 1000-class layer
    assert model.net.fc[1].out_features == 2


def test_pretrained_from_hub_cache(tmp_path, monkeypatch):
    from components.models.transfer import hub_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = hub_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(name="resnet18", pretrained=True), 2, 3)
    assert torch.equal(model.net.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
