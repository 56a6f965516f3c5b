"""ShuffleNet V1 (groups 3) and V2 (1x) in the CIFAR form of the CRD benchmark: "shufflev1", "shufflev2".

- V1: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices",
  CVPR 2018, Fig. 2 (c)/(b) and Table 1 (g = 3: stage widths 240, 480, 960 with 4, 8, 4 units; bottleneck
  width a quarter of the output; no group conv on the first 1x1 of stage 2, whose input has 24 channels).
- V2: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018,
  Fig. 3 (c)/(d) and Table 5 (1x: 116, 232, 464 channels, a final 1x1 conv to 1024).

As in HobbitLong/RepDistiller ``models/ShuffleNetv1.py`` / ``ShuffleNetv2.py`` (from kuangliu's
pytorch-cifar): the stem is a 1x1 conv to 24 channels at full resolution without max-pool (the papers use
a stride-2 3x3 conv and a max-pool for 224x224 inputs); V2's stages are a down-sampling unit followed by
3, 7, 3 basic units (the paper's 4, 8, 4 repeats). Parameter counts for 100 classes: shufflev1 0.95M,
shufflev2 1.36M.
Difference from the public code: global average pooling instead of ``avg_pool2d(4)`` (identical at 32x32).
Parameter names are those of the public code, so its checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.common import KDModel, Stages, check_in_channels, global_pool, run_stage
from kdtune.models.registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[N, g*c, H, W] -> [N, c*g, H, W] (Zhang et al. 2018, section 3.1)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------- V1


class ShuffleV1Unit(nn.Module):
    """ShuffleNet unit: gconv1x1-BN-ReLU, shuffle, dwconv3x3-BN, gconv1x1-BN; stride 2 concatenates an
    avg-pooled shortcut, stride 1 adds the identity; ReLU at the end (Zhang et al. 2018, Fig. 2 b/c)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        self.g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor, return_pre: bool = False):
        """The unit's output; with ``return_pre``, ``(pre, output)``, ``pre`` the concatenation (stride 2) or
        sum (stride 1) before the final ReLU."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.g)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            pre = out + x
        post = F.relu(pre)
        return (pre, post) if return_pre else post


class ShuffleNetV1(KDModel):
    """Stages (RepDistiller ``ShuffleNetv1.py``): stem = ``relu(bn1(conv1(x)))``; post = the outputs of
    layer1..3; pre = the sum (stride 1) or concatenation (stride 2) of each stage's last unit before its final
    ReLU; pooled = global_pool(layer3)."""

    head_name = "linear"
    has_stages = True

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        out_planes=(240, 480, 960),
        num_blocks=(4, 8, 4),
        groups=3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.feat_dim = out_planes[2]
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # the first unit concatenates its input, so its branch makes out_planes - in_planes channels
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Unit(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor, collect: bool) -> tuple[Tensor, Stages | None]:
        out = F.relu(self.bn1(self.conv1(x)))
        if not collect:
            out = self.layer3(self.layer2(self.layer1(out)))
            return global_pool(out), None
        stem, pre, post = out, [], []
        for layer in (self.layer1, self.layer2, self.layer3):
            p, out = run_stage(layer, out)
            pre.append(p)
            post.append(out)
        pooled = global_pool(out)
        return pooled, Stages(stem=stem, post=post, pre=pre, pooled=pooled)


# ---------------------------------------------------------------------------------------------- V2


class ShuffleV2Basic(nn.Module):
    """Basic unit: channel split in halves, 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU on one half, concat,
    shuffle (Ma et al. 2018, Fig. 3 c)."""

    def __init__(self, in_channels: int):
        super().__init__()
        c = in_channels // 2
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor, return_pre: bool = False):
        """The unit's output; with ``return_pre``, ``(pre, output)`` where ``pre`` is
        ``channel_shuffle(cat([x1, bn3(conv3(...))]))``: the concatenation before the branch's last ReLU, in
        the output's (shuffled) channel order, so that ``output == relu(pre)`` channel by channel (``x1`` is
        already non-negative). The CRD code returns it unshuffled: ``channel_shuffle(pre, C // 2)`` undoes the
        shuffle (see :class:`ShuffleNetV2`)."""
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        if not return_pre:
            out = F.relu(self.bn3(self.conv3(out)))
            return channel_shuffle(torch.cat([x1, out], 1), 2)
        branch = self.bn3(self.conv3(out))
        pre = channel_shuffle(torch.cat([x1, branch], 1), 2)
        post = channel_shuffle(torch.cat([x1, F.relu(branch)], 1), 2)
        return pre, post


class ShuffleV2Down(nn.Module):
    """Down-sampling unit: both branches stride 2, concat, shuffle (Ma et al. 2018, Fig. 3 d)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(out2)))))
        return channel_shuffle(torch.cat([out1, out2], 1), 2)


class ShuffleNetV2(KDModel):
    """Stages (RepDistiller ``ShuffleNetv2.py``): stem = ``relu(bn1(conv1(x)))``; post = the outputs of
    layer1..3 (after the last unit's channel shuffle); pre = ``cat([x1, bn3(conv3(...))])`` of each stage's
    last unit, before the branch's final ReLU; pooled = ``global_pool(relu(bn2(conv2(f3))))`` (1024: the
    pooled vector is not f3's).

    Decision on ``pre``: kdtune shuffles it like ``post`` (the CRD code returns it before the shuffle), so
    that ``pre`` and ``post`` share one channel order and ``post == relu(pre)`` elementwise, as in the other
    families. The values are the CRD code's up to that fixed channel permutation, which AT and SP (channel
    statistics) do not see and learned connectors (FitNet, VID, ReviewKD) absorb; the CRD order is
    ``channel_shuffle(pre, C // 2)``.
    """

    head_name = "linear"
    has_stages = True

    def __init__(
        self, num_classes: int, in_channels: int = 3, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.feat_dim = out_channels[3]
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2Down(self.in_channels, out_channels)]
        layers += [ShuffleV2Basic(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor, collect: bool) -> tuple[Tensor, Stages | None]:
        out = F.relu(self.bn1(self.conv1(x)))
        if not collect:
            out = self.layer3(self.layer2(self.layer1(out)))
            return global_pool(F.relu(self.bn2(self.conv2(out)))), None
        stem, pre, post = out, [], []
        for layer in (self.layer1, self.layer2, self.layer3):
            p, out = run_stage(layer, out)
            pre.append(p)
            post.append(out)
        pooled = global_pool(F.relu(self.bn2(self.conv2(out))))
        return pooled, Stages(stem=stem, post=post, pre=pre, pooled=pooled)


@register_model("shufflev1")
def shufflev1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNet V1, groups 3 (CRD's ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes, check_in_channels(in_channels, "shufflev1"))


@register_model("shufflev2")
def shufflev2(num_classes: int, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNet V2 1x (CRD's ``ShuffleV2``)."""
    return ShuffleNetV2(num_classes, check_in_channels(in_channels, "shufflev2"))
