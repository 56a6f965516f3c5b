"""DiSK's ResNet10 family: "resnet10", "resnet10_l", "resnet10_m", "resnet10_s", "resnet10_xs",
"resnet10_xxs".

DiSK, "distilling selective knowledge" with a scaffolding teacher (anonymous ICLR 2023 submission,
``/work/shared/papers/disk_scaffolding-student_iclr2023.txt``), appendix A.4 and Tables 2 and 5: one
basic block per stage ([1, 1, 1, 1]) of the CIFAR-stem ResNet (:mod:`kdtune.models.resnet_cifar_stem`:
3x3 stride-1 stem, four stages at strides 1, 2, 2, 2, adaptive average pooling, linear classifier), with
the filters per stage

=============  ======================  ==========================
name           filters                 params CIFAR-100 / Tiny-IN
=============  ======================  ==========================
resnet10       [64, 128, 256, 512]     4.95M / 5.00M  (paper: 4.92M / -)
resnet10_l     [32, 64, 128, 256]      1.252M / 1.278M (1.25M / 1.28M)
resnet10_m     [16, 32, 64, 128]       320.4K / 333.3K (320K / 333K)
resnet10_s     [8, 16, 32, 64]         83.9K / 90.4K   (84K / 90K)
resnet10_xs    [8, 16, 16, 32]         27.9K / 31.2K   (28K / 31K)
resnet10_xxs   [8, 8, 16, 16]          13.0K / 14.7K   (13K / 15K)
=============  ======================  ==========================

How the paper's Tables 2 and 5 were read: their two "Params" columns are CIFAR-100 (100 classes) and
Tiny-ImageNet (200 classes, 64x64 inputs, the same network: the MACs grow 4x, the parameters only by the
classifier's extra 100 * (feat_dim + 1)); the difference between the two columns fixes the feature width,
e.g. 13K -> 15K is 100 * (16 + 1) for resnet10_xxs. The stem's width is not stated; a stem as wide as the
first stage (``filters[0]``, as in ResNet18's 64) reproduces every published count to the rounding shown
(with 10 classes none would match: resnet10_xxs would have 11.5K). The "Resnet10-l" row is printed as
"Resnet10-£"/"-¢" in the text extraction; "l" is the size between the teacher resnet10 and "m". The paper's
4.92M for resnet10 is 0.6% below this architecture's 4.95M, the only count not matched to its rounding.
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
