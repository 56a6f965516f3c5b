"""VGG networks with batch norm as used in the CRD benchmark: vgg8, vgg11, vgg13, vgg16, vgg19.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015,
Table 1 (configurations A, B, D, E = VGG11, 13, 16, 19), with BN after every conv, the three fully connected
layers replaced by global average pooling and one linear layer, as in the CIFAR variant of the CRD code
(HobbitLong/RepDistiller ``models/vgg.py``, ``vgg*_bn``; "vgg8" is its configuration "S", one conv per
stage). Five conv stages of 64, 128, 256, 512, 512 channels; 2x2 max-pools after stages 0, 1 and 2, after
stage 3 only for inputs of 64 pixels and more (the public code pools there for 64x64 Tiny-ImageNet only).
The registered names drop CRD's ``_bn`` suffix. Parameter counts for 100 classes: vgg8 3.96M, vgg13 9.46M.

Works at 32x32 and 64x64, and at 8x8 (three max-pools bring 8x8 down to 1x1). Parameter names are those
of the public code (``block0..block4``, ``classifier``), so its checkpoints load.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.common import KDModel, Stages, check_in_channels, global_pool, init_normal_fan_out
from kdtune.models.registry import register_model

CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}

POOL3_MIN_SIZE = 64


def vgg_stage(widths: list[int], in_ch: int) -> nn.Sequential:
    """conv3x3(bias)-BN-ReLU repeated, without the last ReLU (applied in ``forward``), as in the CRD code."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_ch = w
    return nn.Sequential(*layers[:-1])


class VGG(KDModel):
    """Stages (RepDistiller ``vgg.py``): stem = ``relu(block0(x))`` before pool0 (it has no pre); post_l =
    ``relu(block_l(.))`` for l = 1..4, before the max-pool that follows it; pre_l = ``block_l(.)``, the output
    of its last BN; pooled = global_pool(post_4)."""

    head_name = "classifier"
    has_stages = True

    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.block0 = vgg_stage(cfg[0], in_channels)
        self.block1 = vgg_stage(cfg[1], cfg[0][-1])
        self.block2 = vgg_stage(cfg[2], cfg[1][-1])
        self.block3 = vgg_stage(cfg[3], cfg[2][-1])
        self.block4 = vgg_stage(cfg[4], cfg[3][-1])
        self.feat_dim = cfg[4][-1]
        self.classifier = nn.Linear(self.feat_dim, num_classes)
        init_normal_fan_out(self, linear_std=0.01)

    def _forward_impl(self, x: Tensor, collect: bool) -> tuple[Tensor, Stages | None]:
        h = x.shape[-2]
        stem = F.relu(self.block0(x))
        x = F.max_pool2d(stem, 2)
        pre: list[Tensor] = []
        post: list[Tensor] = []
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4), start=1):
            p = block(x)
            x = F.relu(p)
            if collect:
                pre.append(p)
                post.append(x)
            if i < 3 or (i == 3 and h >= POOL3_MIN_SIZE):
                x = F.max_pool2d(x, 2)
        pooled = global_pool(x)
        return pooled, (Stages(stem=stem, post=post, pre=pre, pooled=pooled) if collect else None)


def _make_factory(name: str):
    def factory(num_classes: int, in_channels: int = 3) -> VGG:
        return VGG(CFG[name], num_classes, check_in_channels(in_channels, name))

    factory.__name__ = name
    factory.__doc__ = f"{name} with batch norm, CIFAR variant of the CRD benchmark ({name}_bn there)."
    return factory


for _name in CFG:
    register_model(_name)(_make_factory(_name))
