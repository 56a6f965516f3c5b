"""ImageNet-shaped ResNets with a CIFAR stem: "resnet18", "resnet34", "resnet50".

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1: four stages of basic blocks
(ResNet-18/34: [2, 2, 2, 2] / [3, 4, 6, 3]) or bottleneck blocks (ResNet-50: [3, 4, 6, 3], expansion 4)
with 64, 128, 256, 512 base channels, strides 1, 2, 2, 2, global average pooling, a linear classifier.
The CIFAR stem replaces the 7x7 stride-2 conv and the max-pool by one 3x3 stride-1 conv, as in the CRD
benchmark's ResNet50 (HobbitLong/RepDistiller ``models/resnetv2.py``, from kuangliu's pytorch-cifar) and
in DiSK's ResNet18/34 (ICLR 2023 submission, appendix A.4). Shortcuts are a 1x1 conv + BN where the shape
changes. Parameter counts: resnet50 23.71M (CIFAR-100, CRD); resnet18 11.22M / 11.27M and resnet34
21.32M / 21.38M for CIFAR-100 / Tiny-ImageNet (DiSK, Table 5).

:class:`CifarStemResNet` is also the base of DiSK's ResNet10 family (:mod:`kdtune.models.resnet10`).
Parameter names are those of the public code (``conv1``, ``bn1``, ``layer1..4``, ``shortcut``, ``linear``).
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


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU (He et al. 2016, Fig. 2 left)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor, return_pre: bool = False):
        """``relu(out + shortcut(x))``; with ``return_pre``, ``(out + shortcut(x), that output)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        pre = out + self.shortcut(x)
        post = F.relu(pre)
        return (pre, post) if return_pre else post


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 (stride) - 1x1 expand x4, BN after each, shortcut, ReLU (He et al. 2016, Fig. 5)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(in_planes, planes * 4, stride)

    def forward(self, x: Tensor, return_pre: bool = False):
        """``relu(out + shortcut(x))``; with ``return_pre``, ``(out + shortcut(x), that output)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        pre = out + self.shortcut(x)
        post = F.relu(pre)
        return (pre, post) if return_pre else post


class CifarStemResNet(KDModel):
    """Four-stage ResNet with a 3x3 stride-1 stem of ``widths[0]`` channels and no max-pool.

    Stages (RepDistiller ``resnetv2.py``): stem = ``relu(bn1(conv1(x)))``; post = the outputs of layer1..4;
    pre = ``out + shortcut(x)`` of the last block of each stage, before its ReLU; pooled =
    ``global_pool(layer4)``.
    """

    head_name = "linear"
    has_stages = True

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: list[int],
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
    ):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(block, widths[0], num_blocks[0], 1)
        self.layer2 = self._make_layer(block, widths[1], num_blocks[1], 2)
        self.layer3 = self._make_layer(block, widths[2], num_blocks[2], 2)
        self.layer4 = self._make_layer(block, widths[3], num_blocks[3], 2)
        self.feat_dim = widths[3] * block.expansion
        self.linear = nn.Linear(self.feat_dim, num_classes)
        init_kaiming_fan_out(self)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(n):
            layers.append(block(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor, collect: bool) -> tuple[Tensor, Stages | None]:
        out = F.relu(self.bn1(self.conv1(x)))
        if not collect:
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            return global_pool(out), None
        stem, pre, post = out, [], []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            p, out = run_stage(layer, out)
            pre.append(p)
            post.append(out)
        pooled = global_pool(out)
        return pooled, Stages(stem=stem, post=post, pre=pre, pooled=pooled)


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int = 3) -> CifarStemResNet:
    """ResNet-18, CIFAR stem."""
    return CifarStemResNet(BasicBlock, [2, 2, 2, 2], num_classes, check_in_channels(in_channels, "resnet18"))


@register_model("resnet34")
def resnet34(num_classes: int, in_channels: int = 3) -> CifarStemResNet:
    """ResNet-34, CIFAR stem."""
    return CifarStemResNet(BasicBlock, [3, 4, 6, 3], num_classes, check_in_channels(in_channels, "resnet34"))


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int = 3) -> CifarStemResNet:
    """ResNet-50 (bottleneck), CIFAR stem: CRD's ResNet50 teacher."""
    return CifarStemResNet(Bottleneck, [3, 4, 6, 3], num_classes, check_in_channels(in_channels, "resnet50"))
