"""CIFAR-style ResNets (He et al., 2016, section 4.2) for the long-tailed classification study.

depth = 6n + 2: a 3x3 stem, three stages of n basic blocks with `width`, 2*width, 4*width
channels (strides 1, 2, 2), global average pooling and a linear classifier. depth=32, width=16
is ResNet-32 (0.46 M parameters), the backbone of the CIFAR-LT literature; the shortcut of a
down-sampling block is the parameter-free "option A" (stride-2 subsampling + zero channel
padding). Small depth/width (e.g. depth 8, width 4) keep it CPU-runnable for smoke tests.

`features(x)` returns the pooled (B, 4*width) embedding; `classifier` is the nn.Linear head
that decoupled re-training (cRT) re-initialises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "resnet_cifar"]


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; see the module docstring."""

    def __init__(self, depth: int = 32, width: int = 16, num_classes: int = 100):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), "
                             f"got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        blocks = (depth - 2) // 6
        self.depth, self.width = depth, width
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, channels = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out_channels = width * 2 ** stage
            for b in range(blocks):
                layers.append(_BasicBlock(channels, out_channels, stride if b == 0 else 1))
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.feature_dim = channels
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def backbone_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("classifier.")]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet_cifar(depth: int = 32, width: int = 16, num_classes: int = 100) -> CifarResNet:
    """ResNet-`depth` with base `width` (ResNet-32: depth=32, width=16)."""
    return CifarResNet(depth, width, num_classes)
