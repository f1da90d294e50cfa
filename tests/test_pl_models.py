"""The pruning zoo: output shapes, closed-form parameter counts, the prunable set, user models."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from prunelimit import create_model, list_models, prunable_parameters
from prunelimit.errors import PruneLimitError
from prunelimit.models.mlp import FC5_HIDDEN, FC12_HIDDEN, LENET300_HIDDEN, mlp_num_parameters



ZOO = ["alexnet", "fc12", "fc5", "lenet300", "resnet18", "resnet50", "vgg16", "vgg_small"]


def test_zoo_lists_every_family():
    assert list_models() == ZOO
    assert list_models("resnet*") == ["resnet18", "resnet50"]


@pytest.mark.parametrize("name", ZOO)
def test_output_shape_on_tiny_input(name):
    torch.manual_seed(0)
    model = create_model(name, (3, 8, 8), 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_alexnet_upsamples_to_224():
    model = create_model("alexnet", (3, 8, 8), 10).eval()
    seen = {}

    def record_input(module, inputs, output):
        seen["in"] = inputs[0].shape

    model.features[0].register_forward_hook(record_input)
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    assert seen["in"][-2:] == (224, 224)


@pytest.mark.parametrize("name,hidden", [("fc5", FC5_HIDDEN), ("fc12", FC12_HIDDEN), ("lenet300", LENET300_HIDDEN)])
def test_mlp_parameter_counts_match_closed_form_on_cifar(name, hidden):
    model = create_model(name, (3, 32, 32), 10)
    weights, biases = mlp_num_parameters(3072, hidden, 10)
    assert sum(p.numel() for p in model.parameters()) == weights + biases
    assert sum(p.numel() for p in prunable_parameters(model)) == weights


def test_fc5_layer_widths_are_the_papers():
    model = create_model("fc5", (3, 32, 32), 10)
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(1000, 3072), (600, 1000), (300, 600), (100, 300), (10, 100)]
    # 3072*1000 + 1000*600 + 600*300 + 300*100 + 100*10 weights, written out
    assert sum(a * b for a, b in shapes) == 3_072_000 + 600_000 + 180_000 + 30_000 + 1_000
    assert len([m for m in create_model("fc12", (3, 32, 32), 10).modules() if isinstance(m, nn.Linear)]) == 12


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_prunable_set_is_linear_and_conv_weights(name):
    model = create_model(name, (3, 32, 32), 100)
    expected = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    got = prunable_parameters(model)
    assert {id(p) for p in got} == {id(p) for p in expected}
    assert not any(p.ndim == 1 for p in got)  # no biases, no BN scales


def test_cifar_stems():
    r18 = create_model("resnet18", (3, 32, 32), 100)
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18.modules())
    r50 = create_model("resnet50", (3, 32, 32), 100)
    # ResNet50 with a 100-class head: the usual 23.5M backbone parameters + 2048*100 + 100
    assert sum(p.numel() for p in r50.parameters()) == 23_705_252
    vgg = create_model("vgg16", (3, 32, 32), 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 13


def test_conv_net_on_flat_input_is_a_clear_error():
    with pytest.raises(PruneLimitError, match="image inputs"):
        create_model("resnet18", (64,), 10)


def test_unknown_model_lists_the_zoo():
    with pytest.raises(PruneLimitError, match="unknown model 'fc6'.*lenet300"):
        create_model("fc6", (1, 8, 8), 10)


def test_user_model_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_user_models.py").write_text(textwrap.dedent("""
        from torch import nn
        def shaped(in_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes))
        def fixed():
            return nn.Linear(4, 3)
        def not_a_model(in_shape, num_classes):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = create_model("my_user_models:shaped", (1, 8, 8), 5)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
        assert isinstance(create_model("my_user_models:fixed", (4,), 3), nn.Linear)
        with pytest.raises(PruneLimitError, match="not a torch.nn.Module"):
            create_model("my_user_models:not_a_model", (4,), 3)
        with pytest.raises(PruneLimitError, match="has no attribute 'missing'"):
            create_model("my_user_models:missing", (4,), 3)
        with pytest.raises(PruneLimitError, match="cannot import module"):
            create_model("no_such_pkg_xyz:f", (4,), 3)
    finally:
        sys.modules.pop("my_user_models", None)
