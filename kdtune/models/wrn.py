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

from torch import Tensor, nn

from kdtune.models.common import KDModel, check_in_channels, global_pool, init_normal_fan_out
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

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


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

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(KDModel):
    """WRN-depth-widen_factor (Zagoruyko & Komodakis 2016, Table 1)."""

    head_name = "fc"

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

    def forward_features(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return global_pool(self.relu(self.bn1(out)))


def _make_factory(name: str, depth: int, widen: int):
    def factory(num_classes: int, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, check_in_channels(in_channels, name))

    factory.__name__ = name
    factory.__doc__ = f"WRN-{depth}-{widen} (CRD benchmark)."
    return factory


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _name = f"wrn_{_depth}_{_widen}"
    register_model(_name)(_make_factory(_name, _depth, _widen))
