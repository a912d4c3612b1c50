"""Models of the three papers.

* CIFAR-style ResNet-8 / ResNet-18 as in FLoCoRA's code: 3x3 stem, no
  max-pool, GroupNorm(2, C) instead of BatchNorm (no running statistics, so
  nothing but weights has to be averaged), global average pool, ``fc``.
  Kaiming-normal convs. Width 64 gives 1,227,594 / 11,173,962 parameters.
* FedLoRA's family of five small heterogeneous CNNs (conv5x5, max-pool,
  conv5x5, max-pool, fc1 -> fc2 -> fc3). Every member ends in
  ``fc3: 500 -> classes``: that common layer carries the shared adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(2, channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.norm1 = _norm(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stage = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            layers.append(nn.Sequential(*stage))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet8(num_classes=10, width=64, in_channels=3) -> ResNet:
    return ResNet([1, 1, 1], num_classes, width, in_channels)


def resnet18(num_classes=10, width=64, in_channels=3) -> ResNet:
    return ResNet([2, 2, 2, 2], num_classes, width, in_channels)


# (conv2 output channels, fc1 width) of the five heterogeneous members.
CNN_FAMILY = [(32, 2000), (32, 1000), (32, 800), (32, 500), (16, 500)]


class SmallCNN(nn.Module):
    """One member of FedLoRA's heterogeneous family; ``fc3`` is common to all."""

    def __init__(self, member: int, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        c2, hidden = CNN_FAMILY[member]
        self.conv1 = nn.Conv2d(in_channels, 16, 5)
        self.conv2 = nn.Conv2d(16, c2, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"SmallCNN needs image_size >= 16, got {image_size}")
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, 500)
        self.fc3 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build_model(
    arch: str,
    *,
    num_classes: int,
    width: int = 64,
    in_channels: int = 3,
    image_size: int = 32,
    member: int = 0,
    seed: int | None = None,
) -> nn.Module:
    """Build a model; with ``seed`` its initial weights depend on nothing else.

    FLoCoRA's frozen base is rebuilt from this seed on every party, so it
    never has to travel.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if arch == "resnet8":
            return resnet8(num_classes, width, in_channels)
        if arch == "resnet18":
            return resnet18(num_classes, width, in_channels)
        if arch == "cnn":
            return SmallCNN(member % len(CNN_FAMILY), num_classes, in_channels, image_size)
    raise ValueError(f"unknown model arch {arch!r}: expected 'resnet8', 'resnet18' or 'cnn'")


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
