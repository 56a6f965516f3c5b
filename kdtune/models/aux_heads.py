"""HSAKD's auxiliary classifiers: the self-supervised augmented branches of Yang et al., "Hierarchical
Self-supervised Augmented Knowledge Distillation", IJCAI 2021, as their official code builds them
(winycg/HSAKD @ 28c8dc2, ``models/*.py::Auxiliary_Classifier``; the fact sheet ``FEATURE_METHODS.md`` §11).

Branch ``l`` reads one stage feature of the backbone (post-activation, the list below) and runs a **fresh copy of
the rest of the backbone** on it: every later stage with the backbone's block counts, widths and strides, new
weights; the deepest branch runs one more copy of the last stage at stride 1. Then the family's tail (WRN: a
BN-ReLU per branch; ShuffleNetV2: 1x1 conv-BN-ReLU to 1024; MobileNetV2: 1x1 conv-BN-ReLU to 1280), global
average pooling and ``fc_l: Linear(-> 4 C)``, the logits of the joint label ``4 y + k`` (class ``y``, rotation
``k`` quarter turns: class-major, as the official ``target * 4 + i``).

More: docs/models.md §HSAKD auxiliary branches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.errors import CheckpointError, ConfigError
from kdtune.models.common import Stages, global_pool, init_normal_fan_out

ROTATIONS = 4  # quarter turns: k = 0, 1, 2, 3

#: The families that have branches, as the one-line refusal names them.
FAMILIES = ("resnet8..resnet110, resnet8x4, resnet32x4 (CIFAR ResNet)", "wrn_*", "shufflev1", "shufflev2",
            "vgg*", "mobilenetv2", "resnet18/34/50, resnet10* (CIFAR-stem ResNet)")  # fmt: skip


def no_heads_error(model: nn.Module) -> ConfigError:
    arch = getattr(model, "kdtune_arch", None) or type(model).__name__
    return ConfigError(
        f"model {arch} has no HSAKD auxiliary branches; models with them: {'; '.join(FAMILIES)}"
    )


class AuxHeads(nn.Module):
    """The auxiliary branches of one backbone. ``forward(stages) -> [logits_1, ..., logits_L]``, each
    ``(B, 4 C)``, from the :class:`~kdtune.models.common.Stages` of that backbone's ``forward_stages``.

    ``taps[l]`` names the feature branch ``l`` reads: ``("stem", 0)`` or ``("post", i)``. ``tail`` is what runs
    between the branch's blocks and the pooling: ``"none"``, ``"bn_relu"`` (``relu(bn<l>(.))``, WRN) or
    ``"conv"`` (``conv2_<l>``, MobileNetV2). Nothing is modified in place: the stage maps stay usable.
    """

    def __init__(self, family: str, taps: list[tuple[str, int]], extractors: list[nn.Module], width: int,
                 num_classes: int, tail: str = "none", tails: list[nn.Module] | None = None):  # fmt: skip
        super().__init__()
        self.family = family
        self.taps = tuple(taps)
        self.tail = tail
        self.num_classes = int(num_classes)
        for i, ext in enumerate(extractors, start=1):
            setattr(self, f"block_extractor{i}", ext)
        if tail == "bn_relu":
            for i in range(1, len(extractors) + 1):
                setattr(self, f"bn{i}", nn.BatchNorm2d(width))
        elif tail == "conv":
            assert tails is not None and len(tails) == len(extractors)
            for i, t in enumerate(tails, start=1):
                setattr(self, f"conv2_{i}", t)
        for i in range(1, len(extractors) + 1):
            setattr(self, f"fc{i}", nn.Linear(width, ROTATIONS * self.num_classes))

    def __len__(self) -> int:
        return len(self.taps)

    def keep(self, count: int) -> AuxHeads:
        """Drop the branches after the first ``count`` (a pair whose networks have different branch counts
        pairs them by position, as the official loop over the student's branches does)."""
        for i in range(count + 1, len(self) + 1):
            for name in (f"block_extractor{i}", f"bn{i}", f"conv2_{i}", f"fc{i}"):
                if hasattr(self, name):
                    delattr(self, name)
        self.taps = self.taps[:count]
        return self

    def inputs(self, stages: Stages) -> list[Tensor]:
        return [stages.stem if kind == "stem" else stages.post[i] for kind, i in self.taps]

    def branch(self, i: int, x: Tensor) -> Tensor:
        """The logits of branch ``i`` (1-based) on its input feature ``x``."""
        out = getattr(self, f"block_extractor{i}")(x)
        if self.tail == "bn_relu":
            out = torch.relu(getattr(self, f"bn{i}")(out))
        elif self.tail == "conv":
            out = getattr(self, f"conv2_{i}")(out)
        return getattr(self, f"fc{i}")(global_pool(out))

    def forward(self, stages: Stages) -> list[Tensor]:
        """The logits of every branch, in order."""
        return [self.branch(i, x) for i, x in enumerate(self.inputs(stages), start=1)]


# ---------------------------------------------------------------------------------------------- inits


# ---------------------------------------------------------------------------------------------- families


def _cifar_resnet(model, num_classes: int) -> AuxHeads:
    from kdtune.models.cifar_resnet import BasicBlock

    layers = (model.layer1, model.layer2, model.layer3)
    n = len(model.layer1)
    w = [layer[-1].conv2.out_channels for layer in layers]

    def stage(inplanes: int, planes: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or inplanes != planes:
            down = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes))  # fmt: skip
        return nn.Sequential(
            BasicBlock(inplanes, planes, stride, down), *[BasicBlock(planes, planes) for _ in range(1, n)]
        )

    ext = [nn.Sequential(stage(w[0], w[1], 2), stage(w[1], w[2], 2)), nn.Sequential(stage(w[1], w[2], 2)),
           nn.Sequential(stage(w[2], w[2], 1))]  # fmt: skip
    heads = AuxHeads("cifar_resnet", [("post", 0), ("post", 1), ("post", 2)], ext, w[2], num_classes)
    init_normal_fan_out(heads, None)
    return heads


def _wrn(model, num_classes: int) -> AuxHeads:
    from kdtune.models.wrn import NetworkBlock

    n = len(model.block1.layer)
    c = [b.layer[-1].conv2.out_channels for b in (model.block1, model.block2, model.block3)]
    ext = [nn.Sequential(NetworkBlock(n, c[0], c[1], 2), NetworkBlock(n, c[1], c[2], 2)),
           nn.Sequential(NetworkBlock(n, c[1], c[2], 2)), nn.Sequential(NetworkBlock(n, c[2], c[2], 1))]  # fmt: skip
    heads = AuxHeads("wrn", [("post", 0), ("post", 1), ("post", 2)], ext, c[2], num_classes, tail="bn_relu")
    init_normal_fan_out(heads, None)
    return heads


def _shufflev1(model, num_classes: int) -> AuxHeads:
    from kdtune.models.shufflenet import ShuffleV1Unit

    layers = (model.layer1, model.layer2, model.layer3)
    out = [layer[-1].bn3.num_features for layer in layers]
    nb = [len(layer) for layer in layers]
    groups = model.layer1[0].conv3.groups

    def stage(in_planes: int, out_planes: int, blocks: int, downsample: bool = True) -> nn.Sequential:
        units = []
        for i in range(blocks):
            first = i == 0 and downsample
            units.append(
                ShuffleV1Unit(in_planes, out_planes - (in_planes if first else 0), 2 if first else 1, groups)
            )
            in_planes = out_planes
        return nn.Sequential(*units)

    ext = [nn.Sequential(stage(out[0], out[1], nb[1]), stage(out[1], out[2], nb[2])),
           nn.Sequential(stage(out[1], out[2], nb[2])), nn.Sequential(stage(out[2], out[2], nb[2], downsample=False))]  # fmt: skip
    heads = AuxHeads("shufflev1", [("post", 0), ("post", 1), ("post", 2)], ext, out[2], num_classes)
    init_normal_fan_out(heads, None)
    return heads


def _shufflev2(model, num_classes: int) -> AuxHeads:
    from kdtune.models.shufflenet import ShuffleV2Basic, ShuffleV2Down

    layers = (model.layer1, model.layer2, model.layer3)
    out = [layer[0].bn2.num_features * 2 for layer in layers]  # the down unit's two halves
    nb = [len(layer) - 1 for layer in layers]
    last = model.conv2.out_channels

    def stage(in_ch: int, out_ch: int, blocks: int, stride: int = 2) -> nn.Sequential:
        down = ShuffleV2Down(in_ch, out_ch)
        if (
            stride == 1
        ):  # the official DownBlock(stride=1) of the deepest branch: both depthwise convs at stride 1
            down.conv1.stride = (1, 1)
            down.conv4.stride = (1, 1)
        return nn.Sequential(down, *[ShuffleV2Basic(out_ch) for _ in range(blocks)])

    def tail() -> list[nn.Module]:
        return [nn.Conv2d(out[2], last, kernel_size=1, stride=1, padding=0, bias=False), nn.BatchNorm2d(last),
                nn.ReLU(inplace=True)]  # fmt: skip

    ext = [nn.Sequential(stage(out[0], out[1], nb[1]), stage(out[1], out[2], nb[2]), *tail()),
           nn.Sequential(stage(out[1], out[2], nb[2]), *tail()),
           nn.Sequential(stage(out[2], out[2], nb[2], stride=1), *tail())]  # fmt: skip
    return AuxHeads("shufflev2", [("post", 0), ("post", 1), ("post", 2)], ext, last, num_classes)


def _vgg(model, num_classes: int) -> AuxHeads:
    from kdtune.models.vgg import vgg_stage

    blocks = (model.block0, model.block1, model.block2, model.block3, model.block4)
    cfg = [[m.out_channels for m in b if isinstance(m, nn.Conv2d)] for b in blocks]

    def pool() -> nn.Module:
        return nn.MaxPool2d(kernel_size=2, stride=2)

    def relu() -> nn.Module:
        return nn.ReLU(inplace=True)

    def gap() -> nn.Module:
        return nn.AdaptiveAvgPool2d((1, 1))

    def stage(i: int, in_ch: int | None = None) -> nn.Sequential:
        """A fresh copy of VGG stage ``i`` (conv-BN-ReLU ..., without the last ReLU), reading ``in_ch`` channels."""
        return vgg_stage(cfg[i], cfg[i - 1][-1] if in_ch is None else in_ch)

    ext = [
        nn.Sequential(pool(), stage(1), relu(), pool(), stage(2), relu(), pool(), stage(3), relu(), stage(4), relu(),
                      gap()),
        nn.Sequential(pool(), stage(2), relu(), pool(), stage(3), relu(), stage(4), relu(), gap()),
        nn.Sequential(pool(), stage(3), relu(), stage(4), relu(), gap()),
        nn.Sequential(stage(3, cfg[4][-1]), relu(), stage(4), relu(), gap()),
    ]  # fmt: skip
    return AuxHeads("vgg", [("stem", 0), ("post", 0), ("post", 1), ("post", 3)], ext, cfg[4][-1], num_classes)


def _mobilenetv2(model, num_classes: int) -> AuxHeads:
    from kdtune.models.mobilenetv2 import STAGE_BLOCKS, InvertedResidual, conv_bn_relu

    def group(j: int, in_ch: int, stride: int | None = None) -> tuple[nn.Sequential, int]:
        """A fresh copy of ``model.blocks[j]``: its repeats, width, expansion and stride (or ``stride``)."""
        src = model.blocks[j]
        out_ch = src[-1].conv[6].out_channels
        t = src[0].conv[0].out_channels // src[0].conv[0].in_channels
        s = src[0].conv[3].stride[0] if stride is None else stride
        units = []
        for i in range(len(src)):
            units.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
            in_ch = out_ch
        return nn.Sequential(*units), out_ch

    def rest(first: int, in_ch: int, stride: int | None = None) -> nn.Sequential:
        groups = []
        for j in range(first, len(model.blocks)):
            g, in_ch = group(j, in_ch, stride if j == first else None)
            groups.append(g)
        return nn.Sequential(*groups)

    ins = [model.blocks[j][-1].conv[6].out_channels for j in STAGE_BLOCKS]
    deepest = STAGE_BLOCKS[-2] + 1  # the last stage: the groups after the third tap (160 and 320 x 0.5)
    ext = [rest(j + 1, c) for j, c in zip(STAGE_BLOCKS[:-1], ins[:-1])] + [rest(deepest, ins[-1], stride=1)]
    last = model.conv2[0].out_channels
    tails = [conv_bn_relu(ins[-1], last, 1, 1) for _ in ext]
    heads = AuxHeads("mobilenetv2", [("post", i) for i in range(4)], ext, last, num_classes, tail="conv",
                     tails=tails)  # fmt: skip
    init_normal_fan_out(heads, 0.01)
    return heads


def _cifar_stem_resnet(model, num_classes: int) -> AuxHeads:
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    block = type(model.layer1[0])
    planes = [layer[0].conv1.out_channels for layer in layers]
    nb = [len(layer) for layer in layers]
    exp = block.expansion

    def stage(in_planes: int, p: int, blocks: int, stride: int) -> nn.Sequential:
        units = []
        for i in range(blocks):
            units.append(block(in_planes, p, stride if i == 0 else 1))
            in_planes = p * exp
        return nn.Sequential(*units)

    ext = []
    for first in range(1, 4):
        ext.append(nn.Sequential(*[stage(planes[j - 1] * exp, planes[j], nb[j], 2) for j in range(first, 4)]))
    ext.append(nn.Sequential(stage(planes[3] * exp, planes[3], nb[3], 1)))
    heads = AuxHeads("cifar_stem_resnet", [("post", i) for i in range(4)], ext, planes[3] * exp, num_classes)
    for m in heads.modules():  # official resnetv2 Auxiliary_Classifier: He fan_out, BN 1/0, linear untouched
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return heads


def _builder(model: nn.Module):
    from kdtune.models.cifar_resnet import CifarResNet
    from kdtune.models.mobilenetv2 import MobileNetV2
    from kdtune.models.resnet_cifar_stem import CifarStemResNet
    from kdtune.models.shufflenet import ShuffleNetV1, ShuffleNetV2
    from kdtune.models.vgg import VGG
    from kdtune.models.wrn import WideResNet

    table = ((CifarResNet, _cifar_resnet), (WideResNet, _wrn), (ShuffleNetV1, _shufflev1),
             (ShuffleNetV2, _shufflev2), (VGG, _vgg), (MobileNetV2, _mobilenetv2),
             (CifarStemResNet, _cifar_stem_resnet))  # fmt: skip
    for cls, fn in table:
        if isinstance(model, cls):
            return fn
    return None


def has_aux_heads(model: nn.Module) -> bool:
    """Whether HSAKD branches can be built for ``model`` (without building them)."""
    return _builder(model) is not None


def build_aux_heads(model: nn.Module, num_classes: int, branches: int | None = None) -> AuxHeads:
    """Fresh auxiliary branches for ``model`` (a zoo backbone), initialised as the official code does, from the
    global RNG (the first ``branches`` only, when given); a model of another family raises ConfigError in one
    line naming the families that have them."""
    fn = _builder(model)
    if fn is None:
        raise no_heads_error(model)
    heads = fn(model, int(num_classes))
    return heads if branches is None or branches >= len(heads) else heads.keep(branches)


def load_aux_heads(model: nn.Module, state: Mapping[str, Tensor], num_classes: int, source: str) -> AuxHeads:
    """The branches of ``model`` with the weights ``state`` (a checkpoint's ``aux_heads``); a state that does not
    fit (other architecture or class count) raises CheckpointError in one line naming the first bad key."""
    from kdtune.models.checkpoint import check_fit, clean_state_dict

    heads = build_aux_heads(model, num_classes)
    sd = clean_state_dict(state)
    arch = getattr(model, "kdtune_arch", None) or type(model).__name__
    check_fit(heads, sd, "teacher checkpoint", source,
              f"the HSAKD branches of a {arch} with {num_classes} classes (auxiliary heads)")  # fmt: skip
    own = heads.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    heads.load_state_dict(sd, strict=True)
    return heads


def heads_meta(heads: AuxHeads) -> dict[str, Any]:
    """What a checkpoint records about its heads (in ``meta["hsakd_heads"]``)."""
    return {"family": heads.family, "branches": len(heads), "taps": [list(t) for t in heads.taps],
            "classes": ROTATIONS * heads.num_classes}  # fmt: skip


def missing_heads_error(source: str, arch: str, data: str) -> CheckpointError:
    """The one-line refusal of a plain teacher checkpoint by a method that needs the teacher's HSAKD heads."""
    return CheckpointError(
        f"teacher {source} is a plain {arch} checkpoint without HSAKD auxiliary heads; train them on the frozen "
        f"teacher first: `kdtune train method=hsakd_heads preset=hsakd_heads model={arch} teacher={source} "
        f"data={data} out=runs/{arch}-heads`, then pass teacher=runs/{arch}-heads"
    )
