"""The model registry: ``@register_model`` factories, ``create_model`` and ``list_models``.

Contract of every registered model (checked over the whole registry by ``tests/test_models.py``):

- the factory is called as ``factory(num_classes=..., in_channels=...)`` and returns an ``nn.Module``;
- ``model(x)`` returns logits ``(B, num_classes)``; ``model(x, return_features=True)`` returns
  ``(logits, features)`` with ``features`` the penultimate representation ``(B, model.feat_dim)``, the
  input of the final linear classifier (DiSK and IPWD use it);
- ``model.feat_dim`` is an ``int``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdtune.errors import ConfigError
from kdtune.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str | None = None):
    """Decorator for a factory ``f(num_classes, in_channels) -> nn.Module``."""
    return MODELS.register(name)


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    model = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.kdtune_arch = name  # type: ignore[attr-defined]
    return model


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)
