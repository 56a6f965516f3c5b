"""The names the registries hold, known without importing torch, so that a bad name is refused at once.

The registries (``kdtune.models.MODELS``, ``kdtune.losses.METHODS``, ``kdtune.data.DATASETS``) are where
things are registered; importing them imports torch (seconds). These tuples repeat their names, and
``tests/test_names.py`` fails as soon as they differ from the registries. torchvision's models
(``tv_<name>``) depend on the installed torchvision, so a ``tv_`` name is checked against the real registry.

:func:`check_name` is the one validator of a registered name: it raises :class:`ConfigError` with a
suggestion, a short list and the command that lists them all.
"""

from __future__ import annotations

from kdtune.errors import ConfigError, did_you_mean

TV_PREFIX = "tv_"

MODEL_NAMES = (
    "mobilenetv2", "resnet10", "resnet10_l", "resnet10_m", "resnet10_s", "resnet10_xs", "resnet10_xxs",
    "resnet110", "resnet14", "resnet18", "resnet20", "resnet32", "resnet32x4", "resnet34", "resnet44",
    "resnet50", "resnet56", "resnet8", "resnet8x4", "shufflev1", "shufflev2", "toy_interval_student",
    "toy_interval_teacher", "toy_mlp128", "toy_mlp_student", "toy_mlp_teacher", "vgg11", "vgg13", "vgg16",
    "vgg19", "vgg8", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
)  # fmt: skip
METHOD_NAMES = ("at", "cc", "ce", "crd", "disk", "dist", "dkd", "fitnet", "hsakd", "hsakd_heads", "ipwd", "kd", "ls",
                "mse", "pkt", "reviewkd", "rkd", "sp", "ttm", "vid", "wttm")
# data set -> (number of classes, input channels): what a checkpoint must fit before any data is read.
DATASET_SHAPES = {
    "cifar10": (10, 3),
    "cifar100": (100, 3),
    "digits": (10, 1),
    "disk-gaussians": (3, 2),
    "disk-intervals": (2, 1),
    "imagenet": (1000, 3),
    "mse-gauss": (3, 30),
    "tiny-imagenet": (200, 3),
}
DATASET_NAMES = tuple(sorted(DATASET_SHAPES))
# Image side of the image data sets (the toys are vectors): what a stage method's shapes are probed at.
DATASET_IMAGE_SIZES = {"cifar10": 32, "cifar100": 32, "digits": 8, "imagenet": 224, "tiny-imagenet": 64}

_KINDS = {
    # kind: (names, command listing them all)
    "model": (MODEL_NAMES, "kdtune models"),
    "method": (METHOD_NAMES, "kdtune methods"),
    "data set": (DATASET_NAMES, "kdtune data"),
}
SHOWN = 12  # names listed in an error before it points to the command


def name_list(names, command: str, shown: int = SHOWN) -> str:
    """``a, b, c`` or, for a long list, its first ``shown`` names and the command that lists them all."""
    names = list(names)
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, ... ({len(names)} in all; `{command}` lists them)"


def check_name(kind: str, name, where: str | None = None) -> str:
    """Return ``name`` if it is a registered ``kind`` ("model", "method", "data set"); else raise ConfigError
    ``<where>: unknown <kind> 'x' (did you mean 'y'?); valid <kind>s: ...``."""
    names, command = _KINDS[kind]
    if isinstance(name, str) and name in names:
        return name
    if kind == "model" and isinstance(name, str) and name.startswith(TV_PREFIX):
        from kdtune.models import MODELS  # torchvision's own list; imports torch

        if name in MODELS:
            return name
        names = MODELS.names(TV_PREFIX + "*")
        hint = did_you_mean(name, names)
        valid = name_list(names, "kdtune models 'tv_*'")
        raise ConfigError(f"{where + ': ' if where else ''}unknown model {name!r}{hint}; valid tv_ models: {valid}")
    listed = list(names) + ([f"{TV_PREFIX}* (torchvision)"] if kind == "model" else [])
    raise ConfigError(
        f"{where + ': ' if where else ''}unknown {kind} {name!r}{did_you_mean(str(name), names)}; "
        f"valid {kind}s: {name_list(listed, command)}"
    )
