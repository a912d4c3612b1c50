"""Models and LoRA: parameter counts of docs/papers.md, no-op adapters, modes."""

import pytest
import torch
from torch import nn

from fl.comm import flocora_analytic_bits
from fl.lora import (
    LoRAConv2d,
    LoRALinear,
    add_linear_adapter,
    apply_flocora,
    frozen_names,
    get_tensors,
    is_lora_name,
    trainable_names,
)
from fl.models import CNN_FAMILY, build_model, num_params


def _non_lora_trainable(model):
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not is_lora_name(n))


@pytest.mark.parametrize("arch,total,non_lora", [("resnet8", 1_227_594, 5_258), ("resnet18", 11_173_962, 14_730)])
def test_param_counts_match_papers(arch, total, non_lora):
    model = build_model(arch, num_classes=10, seed=0)
    assert num_params(model) == total
    apply_flocora(model, rank=8, alpha=16, mode=2)
    assert _non_lora_trainable(model) == non_lora


@pytest.mark.parametrize("rank,ratio", [(8, 17.93), (16, 9.33), (32, 4.76), (64, 2.40), (128, 1.21)])
def test_resnet8_fp32_ratio_formula(rank, ratio):
    base = build_model("resnet8", num_classes=10, seed=0)
    total_bits = num_params(base) * 32
    model = apply_flocora(build_model("resnet8", num_classes=10, seed=0), rank, 2 * rank, mode=2)
    msg = get_tensors(model, trainable_names(model))
    assert round(total_bits / flocora_analytic_bits(msg, None), 2) == pytest.approx(ratio, abs=0.01)


def test_resnet8_quantized_ratio_formula():
    base_bits = 1_227_594 * 32
    model = apply_flocora(build_model("resnet8", num_classes=10, seed=0), 16, 32, mode=2)
    msg = get_tensors(model, trainable_names(model))
    got = [round(base_bits / flocora_analytic_bits(msg, b), 1) for b in (8, 4, 2)]
    assert got == [32.4, 56.3, 89.3]


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_adapter_starts_as_exact_noop(mode):
    x = torch.randn(3, 3, 16, 16)
    base = build_model("resnet8", num_classes=10, width=8, seed=5)
    ref = base(x)
    lora = apply_flocora(build_model("resnet8", num_classes=10, width=8, seed=5), 4, 8, mode)
    assert torch.equal(lora(x), ref)


def test_lora_conv_geometry_and_update():
    base = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False)
    layer = LoRAConv2d(base, rank=3, alpha=6)
    assert layer.lora_A.weight.shape == (3, 6, 3, 3) and layer.lora_B.weight.shape == (10, 3, 1, 1)
    assert layer.lora_A.stride == (2, 2) and layer.lora_A.padding == (1, 1)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 6, 9, 9)
    expect = base(x) + 2.0 * layer.lora_B(layer.lora_A(x))
    torch.testing.assert_close(layer(x), expect)


def test_lora_linear_update():
    layer = LoRALinear(nn.Linear(5, 4), rank=2, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5)
    expect = layer.base(x) + 4.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expect)


def test_modes_select_what_trains():
    def names(mode):
        m = apply_flocora(build_model("resnet8", num_classes=10, width=8, seed=0), 2, 4, mode)
        return {n for n in trainable_names(m) if not is_lora_name(n)}, m

    n0, m0 = names(0)
    assert n0 == set() and isinstance(m0.fc, LoRALinear)
    n1, _ = names(1)
    assert n1 and all("norm" in n or "downsample.1" in n for n in n1)
    n2, m2 = names(2)
    assert n2 == n1 | {"fc.weight", "fc.bias"} and isinstance(m2.conv1, LoRAConv2d)
    n3, m3 = names(3)
    assert n3 == n2 | {"conv1.weight"} and isinstance(m3.conv1, nn.Conv2d)
    with pytest.raises(ValueError, match="mode"):
        apply_flocora(build_model("resnet8", num_classes=10, width=8), 2, 4, mode=4)


def test_frozen_base_is_rebuilt_from_seed():
    a = apply_flocora(build_model("resnet8", num_classes=10, width=8, seed=42), 4, 8, 2, seed=43)
    b = apply_flocora(build_model("resnet8", num_classes=10, width=8, seed=42), 4, 8, 2, seed=43)
    c = build_model("resnet8", num_classes=10, width=8, seed=41)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert frozen_names(a) and all(torch.equal(pa[n], pb[n]) for n in frozen_names(a))
    assert not torch.equal(pa["layers.0.0.conv1.base.weight"], dict(c.named_parameters())["layers.0.0.conv1.weight"])


@pytest.mark.parametrize("member", range(len(CNN_FAMILY)))
def test_cnn_family_shares_fc3(member):
    model = build_model("cnn", num_classes=7, in_channels=1, image_size=16, member=member, seed=0)
    add_linear_adapter(model, "fc3", rank=4, alpha=8, seed=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    assert model.fc3.lora_A.weight.shape == (4, 500) and model.fc3.lora_B.weight.shape == (7, 4)


def test_bad_arch_and_rank():
    with pytest.raises(ValueError, match="unknown model arch"):
        build_model("vgg", num_classes=10)
    with pytest.raises(ValueError, match="rank"):
        LoRAConv2d(nn.Conv2d(2, 2, 3), 0, 1.0)
