"""Every torchvision classification model, registered as ``tv_<name>`` (``tv_resnet18``, ``tv_vit_b_16``).

Built with ``torchvision.models.get_model(name, weights=None, num_classes=...)`` (random init; kdtune trains
or loads its own teachers, see :mod:`kdtune.models.checkpoint`); extra keyword arguments of ``create_model``
go to the torchvision builder (e.g. ``image_size`` for ViTs). GoogLeNet and Inception-v3 are built without
their auxiliary classifiers, so every model returns one logits tensor in training mode too.

Features: the model keeps its torchvision class (as a thin subclass), so its ``state_dict`` keys are
torchvision's; ``model(x, return_features=True)`` returns ``(logits, features)`` with features the input of
the last ``nn.Linear`` (a forward hook), ``feat_dim`` its ``in_features`` (SqueezeNet: the globally averaged
input of its final conv). Only 3-channel inputs are supported (``in_channels`` other than 3 raises
ConfigError); input sizes follow torchvision. More: docs/models.md §torchvision models.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.models.common import NoStages, global_pool
from kdtune.models.registry import register_model

PREFIX = "tv_"
_AUX_MODELS = ("googlenet", "inception_v3")
_FEATURE_ATTR = "_kdtune_head_input"


def _stash_input(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook on the classifier: keep its input on the module itself (deepcopy-safe, no closure)."""
    module.__dict__[_FEATURE_ATTR] = args[0]


class TorchvisionFeatures(NoStages, nn.Module):
    """Mixin put in front of a torchvision model class: adds ``return_features`` and ``feat_dim``; no stage
    features (``has_stages`` False, ``forward_stages`` raises ConfigError)."""

    feat_dim: int
    _kdtune_head: str
    _kdtune_pool_features: bool

    def forward(self, x: Tensor, return_features: bool = False):
        head = self.get_submodule(self._kdtune_head)
        try:
            logits = super().forward(x)
        finally:
            feats = head.__dict__.pop(_FEATURE_ATTR, None)
        if not return_features:
            return logits
        if feats is None:  # pragma: no cover - the hook always runs when the classifier does
            raise RuntimeError(f"{type(self).__name__}: the classifier {self._kdtune_head} did not run")
        if self._kdtune_pool_features:
            feats = global_pool(feats)
        return logits, torch.flatten(feats, 1)


_SUBCLASSES: dict[type, type] = {}


def _feature_class(cls: type) -> type:
    """``KD<TorchvisionClass>``, defined once per class and made importable from this module (picklable)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        name = f"KD{cls.__name__}"
        sub = type(name, (TorchvisionFeatures, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = sub
        _SUBCLASSES[cls] = sub
    return sub


def __getattr__(attr: str):
    """Recreate ``KD<Class>`` on first access, so a pickled model unpickles in a fresh process."""
    base = getattr(torchvision.models, attr[2:], None) if attr.startswith("KD") else None
    if isinstance(base, type) and issubclass(base, nn.Module):
        return _feature_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _find_head(model: nn.Module) -> tuple[str, int, bool]:
    """(module name, feature width, pool?) of the final classifier: the last ``nn.Linear`` registered, or,
    for SqueezeNet (no linear layer), its final 1x1 conv."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        name, lin = linears[-1]
        return name, lin.in_features, False
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    name, conv = convs[-1]
    return name, conv.in_channels, True


def build_torchvision(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """The torchvision model ``name`` with ``weights=None``, ``num_classes`` outputs and kdtune's contract."""
    if in_channels != 3:
        raise ConfigError(
            f"{PREFIX}{name} takes 3-channel images, got in_channels={in_channels}; use a CIFAR-zoo model "
            "(e.g. resnet8x4) or a data set with RGB images"
        )
    if name in _AUX_MODELS:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    head_name, feat_dim, pool = _find_head(model)
    model.__class__ = _feature_class(type(model))
    model.feat_dim = feat_dim
    model._kdtune_head = head_name
    model._kdtune_pool_features = pool
    model.get_submodule(head_name).register_forward_pre_hook(_stash_input)
    return model


def _make_factory(name: str):
    def factory(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
        return build_torchvision(name, num_classes, in_channels, **kwargs)

    factory.__name__ = PREFIX + name
    factory.__doc__ = f"torchvision.models.{name}(weights=None, num_classes=num_classes)."
    return factory


for _name in torchvision.models.list_models(module=torchvision.models):
    register_model(PREFIX + _name)(_make_factory(_name))
