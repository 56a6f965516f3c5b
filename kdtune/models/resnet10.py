"""DiSK's ResNet10 family: "resnet10", "resnet10_l", "resnet10_m", "resnet10_s", "resnet10_xs",
"resnet10_xxs".

DiSK, "distilling selective knowledge" with a scaffolding teacher (anonymous ICLR 2023 submission,
``/work/shared/papers/disk_scaffolding-student_iclr2023.txt``), appendix A.4 and Tables 2 and 5: one
basic block per stage ([1, 1, 1, 1]) of the CIFAR-stem ResNet (:mod:`kdtune.models.resnet_cifar_stem`:
3x3 stride-1 stem, four stages at strides 1, 2, 2, 2, adaptive average pooling, linear classifier), with
the filters per stage [64, 128, 256, 512] (resnet10), [32, 64, 128, 256] (_l), [16, 32, 64, 128] (_m),
[8, 16, 32, 64] (_s), [8, 16, 16, 32] (_xs) and [8, 8, 16, 16] (_xxs), the stem as wide as the first stage.

More: docs/models.md §ResNet10 (the parameter counts against the paper's, how its tables were read).
"""

from __future__ import annotations

from kdtune.models.common import check_in_channels
from kdtune.models.registry import register_model
from kdtune.models.resnet_cifar_stem import BasicBlock, CifarStemResNet

FILTERS = {
    "resnet10": (64, 128, 256, 512),
    "resnet10_l": (32, 64, 128, 256),
    "resnet10_m": (16, 32, 64, 128),
    "resnet10_s": (8, 16, 32, 64),
    "resnet10_xs": (8, 16, 16, 32),
    "resnet10_xxs": (8, 8, 16, 16),
}


def _make_factory(name: str, widths: tuple[int, int, int, int]):
    def factory(num_classes: int, in_channels: int = 3) -> CifarStemResNet:
        return CifarStemResNet(
            BasicBlock, [1, 1, 1, 1], num_classes, check_in_channels(in_channels, name), widths
        )

    factory.__name__ = name
    factory.__doc__ = f"DiSK {name}: BasicBlock x [1, 1, 1, 1], filters {list(widths)} (appendix A.4)."
    return factory


for _name, _widths in FILTERS.items():
    register_model(_name)(_make_factory(_name, _widths))
