"""MobileNetV2 at width 0.5, the CRD benchmark's student ("mobilenetv2"; ``mobile_half`` in the CRD code).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, Table 2 (the stages
``t, c, n, s``: expansion, channels, repeats, stride), in the CIFAR form of HobbitLong/RepDistiller
``models/mobilenetv2.py`` (from "Knowledge Distillation via Route Constrained Optimization"):

- width multiplier 0.5 on the stem (32 -> 16) and on every stage's channels ``int(c * 0.5)``; the final 1x1
  conv keeps 1280 channels (it is widened only for multipliers above 1);
- stem: 3x3 conv stride 2; every inverted residual, the first too (t = 1), has the expanding 1x1 conv;
- a residual connection when stride is 1 and the widths match; a linear classifier on 1280 features.

Parameter count for 100 classes: 0.81M. Difference from the public code: global average pooling instead of
``AvgPool2d(input_size // 16, ceil_mode=True)`` (identical at 32x32; runs at 8x8 and 64x64 too).
Parameter names are those of the public code (``conv1``, ``blocks``, ``conv2``, ``classifier.0``).
"""

from __future__ import annotations

from torch import Tensor, nn

from kdtune.models.common import KDModel, Stages, check_in_channels, global_pool, init_normal_fan_out
from kdtune.models.registry import register_model

# t (expansion), c (channels), n (repeats), s (stride of the first repeat); Sandler et al. 2018, Table 2,
# with CIFAR strides (the CRD code keeps the second stage at stride 1).
SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]

# The stage outputs f1..f4 of the CRD code: the outputs of these entries of ``blocks`` (12@16, 16@8, 48@4,
# 160@2 at 32x32).
STAGE_BLOCKS = (1, 2, 4, 6)


def conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection (Sandler et al. 2018, Table 1)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(KDModel):
    """Stages (RepDistiller ``mobilenetv2.py``): stem = ``conv1(x)`` (conv-BN-ReLU); post = the outputs of
    ``blocks[1]``, ``blocks[2]``, ``blocks[4]``, ``blocks[6]``; pre = post (the same tensors: the block
    outputs are linear bottlenecks, without ReLU; the CRD code ignores ``preact`` here); pooled =
    ``global_pool(conv2(blocks[6] output))`` (1280)."""

    head_name = "classifier"
    has_stages = True

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5, expansion: int = 6):
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_channels, input_channel, 3, 2)
        blocks = []
        for t, c, n, s in SETTING:
            t = expansion if t != 1 else 1
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.feat_dim = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(input_channel, self.feat_dim, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.feat_dim, num_classes))
        init_normal_fan_out(self, linear_std=0.01)

    def _forward_impl(self, x: Tensor, collect: bool) -> tuple[Tensor, Stages | None]:
        out = stem = self.conv1(x)
        post: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            out = block(out)
            if collect and i in STAGE_BLOCKS:
                post.append(out)
        pooled = global_pool(self.conv2(out))
        return pooled, (Stages(stem=stem, post=post, pre=list(post), pooled=pooled) if collect else None)


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2, width 0.5, expansion 6 (CRD's ``mobile_half``)."""
    return MobileNetV2(num_classes, check_in_channels(in_channels, "mobilenetv2"))
