"""A PEFT LoRA adapter through the codec and back into the model (skipped without peft).

The documented example (README, "LoRA adapters from PEFT"): the adapter's
state dict from ``get_peft_model_state_dict`` is encoded, decoded, written
as ``adapter_model.safetensors`` and loaded into a fresh PEFT model with
``set_peft_model_state_dict``.
"""

import pytest
import torch

import flocora_codec as fc
from flocora_codec.files import read_tensors, write_tensors

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")


def _model(seed):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"], lora_dropout=0.0)
    return peft.get_peft_model(base, cfg)


def test_peft_lora_adapter_round_trip(tmp_path):
    model = _model(0)
    with torch.no_grad():  # a "trained" adapter: lora_B starts at zero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    model = model.to(torch.bfloat16)  # adapters are often trained and shipped in bf16
    sd = peft.get_peft_model_state_dict(model)
    assert sd and all("lora_" in k for k in sd) and {t.dtype for t in sd.values()} == {torch.bfloat16}

    # per tensor: lora_B has rows of r = 8 values, too short to carry a scale each
    msg = fc.encode(sd, fc.CodecSpec(bits=8, granularity="tensor"))
    raw = sum(t.numel() * t.element_size() for t in sd.values())
    assert len(msg) < 0.6 * raw
    decoded = fc.decode(msg)
    path = tmp_path / "adapter_model.safetensors"
    write_tensors(decoded, path)
    loaded = read_tensors(path)
    assert {k: (v.dtype, v.shape) for k, v in loaded.items()} == {k: (v.dtype, v.shape) for k, v in sd.items()}

    other = _model(1).to(torch.bfloat16)  # same architecture, different base init irrelevant here
    result = peft.set_peft_model_state_dict(other, loaded)
    assert not result.unexpected_keys
    got = peft.get_peft_model_state_dict(other)
    for k, v in decoded.items():
        assert torch.equal(got[k], v), k
        # 8-bit per tensor: within half a step of the original, plus bf16 rounding of the result
        x = sd[k].float()
        step = (x.max() - x.min()).item() / 255
        assert ((got[k].float() - x).abs() <= 0.5 * step + x.abs() * 2**-8 + 1e-6).all(), k
