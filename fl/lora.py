"""LoRA adapters for convs and linears, and FLoCoRA's placement modes.

A conv adapter is a low-rank conv pair: ``A`` is a kxk conv in->r with the
base conv's stride/padding/dilation (so its output has the base's spatial
shape), ``B`` a 1x1 conv r->out. ``B`` starts at zero, so a fresh adapter is
an exact no-op: ``out = base(x) + alpha/r * B(A(x))``.

Placement modes follow FLoCoRA's code (``gen_rank_pattern``):

====  ======================  ============  ===================
mode  LoRA on                 norms         trained in full
====  ======================  ============  ===================
0     every conv and ``fc``   frozen        nothing
1     every conv and ``fc``   trained       norms
2     every conv              trained       norms, ``fc``
3     every conv but stem     trained       norms, ``fc``, stem
====  ======================  ============  ===================
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODES = (0, 1, 2, 3)


class LoRAConv2d(nn.Module):
    def __init__(self, base: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if base.groups != 1:
            raise ValueError("LoRAConv2d supports groups=1 convs only")
        self.base = base
        self.lora_A = nn.Conv2d(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
        )
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def apply_flocora(model: nn.Module, rank: int, alpha: float, mode: int = 2, seed: int | None = None) -> nn.Module:
    """Insert adapters in place per FLoCoRA ``mode`` and set ``requires_grad``.

    Afterwards exactly the tensors that FLoCoRA trains (and sends) require
    grad; everything else is the frozen base. ``seed`` fixes the adapters'
    initial ``A`` so every party starts from the same adapter.
    """
    if mode not in MODES:
        raise ValueError(f"FLoCoRA mode must be one of {MODES}, got {mode}")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    full = set()
    if mode == 3:
        full.add(convs.pop(0))  # the stem conv is trained in full
    targets = convs + (linears if mode in (0, 1) else [])
    if mode in (2, 3):
        full.update(linears)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for name in targets:
            base = model.get_submodule(name)
            cls = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear
            _replace(model, name, cls(base, rank, alpha))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, (LoRAConv2d, LoRALinear)):
            m.lora_A.weight.requires_grad_(True)
            m.lora_B.weight.requires_grad_(True)
        elif isinstance(m, nn.GroupNorm) and mode != 0:
            for p in m.parameters():
                p.requires_grad_(True)
        elif name in full:
            for p in m.parameters():
                p.requires_grad_(True)
    return model


def add_linear_adapter(model: nn.Module, name: str, rank: int, alpha: float, seed: int | None = None) -> nn.Module:
    """Wrap the linear ``name`` in a LoRALinear (FedLoRA's shared adapter)."""
    base = model.get_submodule(name)
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{name} is a {type(base).__name__}, expected nn.Linear")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        _replace(model, name, LoRALinear(base, rank, alpha))
    return model


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def frozen_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def adapter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if is_lora_name(n)]


def get_tensors(model: nn.Module, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def set_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = set(tensors) - set(params)
    if unknown:
        raise KeyError(f"tensors not in the model: {sorted(unknown)[:5]}")
    for n, t in tensors.items():
        if params[n].shape != t.shape:
            raise ValueError(f"{n}: shape {tuple(t.shape)} does not match the model's {tuple(params[n].shape)}")
        params[n].copy_(t)


def set_trainable(model: nn.Module, names) -> None:
    names = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
