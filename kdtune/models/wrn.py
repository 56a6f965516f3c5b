"""Wide residual networks of the CRD benchmark: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, Table 1: WRN-d-k has a 3x3 stem with 16
channels, three groups of n = (d - 4) / 6 pre-activation basic blocks (BN-ReLU-conv3x3 twice) with
``16k, 32k, 64k`` channels, a final BN-ReLU, global average pooling and a linear classifier. A 1x1 conv
shortcut is used where the width or resolution changes; no dropout (as in the CRD benchmark,
HobbitLong/RepDistiller ``models/wrn.py``). Parameter counts for 100 classes: wrn_40_2 2.26M, wrn_40_1
0.57M, wrn_16_2 0.70M.

Differences from the public code: global average pooling instead of ``avg_pool2d(8)`` (identical at 32x32)
and ``in_channels`` for the stem. Parameter names are those of the public code, so its checkpoints load.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.common import KDModel, Stages, check_in_channels, global_pool, init_normal_fan_out
from kdtune.models.registry import register_model


class BasicBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv3x3-BN-ReLU-conv3x3). When the shape changes, the pre-activated
    input feeds both the residual branch and the 1x1 shortcut conv, as in the reference WRN code."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor, return_bn: bool = False):
        """The residual sum; with ``return_bn``, ``(that sum, bn1(x))``: the input's BN output, kept by a
        ReLU that is not in place (the plain path keeps the in-place ``relu1``; the values are the same)."""
        bn = self.bn1(x)
        pre = F.relu(bn) if return_bn else self.relu1(bn)
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return (shortcut + out, bn) if return_bn else shortcut + out


class NetworkBlock(nn.Module):
    """A group of ``nb_layers`` blocks; the first changes width and stride."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor, return_bn: bool = False):
        """The group's output; with ``return_bn``, ``(output, bn1 of the first unit applied to x)``: the
        pre-activation of the previous group's output, from the BN call the forward makes anyway."""
        if not return_bn:
            return self.layer(x)
        first, *rest = self.layer
        x, bn = first(x, return_bn=True)
        for unit in rest:
            x = unit(x)
        return x, bn


class WideResNet(KDModel):
    """WRN-depth-widen_factor (Zagoruyko & Komodakis 2016, Table 1).

    Stages (RepDistiller ``wrn.py``): stem = the raw ``conv1(x)`` (no BN/ReLU); post = the raw residual sums
    that block1..3 output (pre-activation blocks: no ReLU at a block's output); pre = the BN that reads each
    of them next, before its ReLU: ``block2.layer[0].bn1(f1)``, ``block3.layer[0].bn1(f2)``, the final
    ``bn1(f3)``. Those BNs run once per forward, as in the plain forward (unlike mdistiller, which calls them
    a second time); pooled = ``global_pool(relu(bn1(f3)))``.
    """

    head_name = "fc"
    has_stages = True

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.feat_dim = ch[3]
        self.fc = nn.Linear(ch[3], num_classes)
        init_normal_fan_out(self, linear_std=None)

    def _forward_impl(self, x: Tensor, collect: bool) -> tuple[Tensor, Stages | None]:
        if not collect:
            out = self.block3(self.block2(self.block1(self.conv1(x))))
            return global_pool(self.relu(self.bn1(out))), None
        stem = self.conv1(x)
        f1 = self.block1(stem)
        f2, pre1 = self.block2(f1, return_bn=True)
        f3, pre2 = self.block3(f2, return_bn=True)
        pre3 = self.bn1(f3)
        pooled = global_pool(F.relu(pre3))
        return pooled, Stages(stem=stem, post=[f1, f2, f3], pre=[pre1, pre2, pre3], pooled=pooled)


def _make_factory(name: str, depth: int, widen: int):
    def factory(num_classes: int, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, check_in_channels(in_channels, name))

    factory.__name__ = name
    factory.__doc__ = f"WRN-{depth}-{widen} (CRD benchmark)."
    return factory


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _name = f"wrn_{_depth}_{_widen}"
    register_model(_name)(_make_factory(_name, _depth, _widen))
