"""CIFAR ResNets of the CRD benchmark: resnet8 ... resnet110, resnet8x4, resnet32x4.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2 (the 6n+2-layer CIFAR
networks: a 3x3 stem, three stages of n basic blocks at 32x32, 16x16, 8x8, global average pooling and a
linear classifier). Channel widths as in Tian et al., "Contrastive Representation Distillation" (CRD),
ICLR 2020, and its code (HobbitLong/RepDistiller ``models/resnet.py``): ``[16, 16, 32, 64]`` for
resnet8..resnet110, ``[32, 64, 128, 256]`` for resnet8x4 / resnet32x4; shortcuts are a 1x1 conv + BN
whenever the shape changes. Parameter counts for 100 classes: resnet20 0.28M, resnet32 0.47M, resnet56
0.86M, resnet110 1.74M, resnet8x4 1.23M, resnet32x4 7.43M.

Differences from the public code: the fixed ``AvgPool2d(8)`` is global average pooling (identical at 32x32,
and the networks also run on 8x8 digits and 64x64 Tiny-ImageNet); the stem takes ``in_channels``.
Parameter names are those of the public code, so its checkpoints load.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.common import (
    KDModel,
    Stages,
    check_in_channels,
    conv3x3,
    global_pool,
    init_kaiming_fan_out,
    run_stage,
)
from kdtune.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ReLU after the residual sum (He et al. 2016, Fig. 2 left)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor, return_pre: bool = False):
        """The block output ``relu(out + residual)``; with ``return_pre``, ``(out + residual, output)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        pre = out + residual
        post = F.relu(pre)
        return (pre, post) if return_pre else post


class CifarResNet(KDModel):
    """6n+2-layer CIFAR ResNet with ``num_filters = [stem, stage1, stage2, stage3]``.

    Stages (RepDistiller ``resnet.py``): stem = ``relu(bn1(conv1(x)))``; post = the outputs of layer1..3;
    pre = ``out + residual`` of the last block of each stage, before its ReLU; pooled = global_pool(layer3).
    """

    head_name = "fc"
    has_stages = True

    def __init__(self, depth: int, num_filters: list[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.feat_dim = num_filters[3] * BasicBlock.expansion
        self.fc = nn.Linear(self.feat_dim, num_classes)
        init_kaiming_fan_out(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor, collect: bool) -> tuple[Tensor, Stages | None]:
        x = self.relu(self.bn1(self.conv1(x)))
        if not collect:
            x = self.layer3(self.layer2(self.layer1(x)))
            return global_pool(x), None
        stem, pre, post = x, [], []
        for layer in (self.layer1, self.layer2, self.layer3):
            p, x = run_stage(layer, x)
            pre.append(p)
            post.append(x)
        pooled = global_pool(x)
        return pooled, Stages(stem=stem, post=post, pre=pre, pooled=pooled)


_SPECS = {
    "resnet8": (8, [16, 16, 32, 64]),
    "resnet14": (14, [16, 16, 32, 64]),
    "resnet20": (20, [16, 16, 32, 64]),
    "resnet32": (32, [16, 16, 32, 64]),
    "resnet44": (44, [16, 16, 32, 64]),
    "resnet56": (56, [16, 16, 32, 64]),
    "resnet110": (110, [16, 16, 32, 64]),
    "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}


def _make_factory(name: str, depth: int, filters: list[int]):
    def factory(num_classes: int, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, list(filters), num_classes, check_in_channels(in_channels, name))

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}, filters {filters} (CRD benchmark)."
    return factory


for _name, (_depth, _filters) in _SPECS.items():
    register_model(_name)(_make_factory(_name, _depth, _filters))
