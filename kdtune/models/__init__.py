"""Model zoo: CIFAR-style networks of the CRD benchmark, DiSK's ResNet10 family and toy nets, torchvision
ImageNet models by name. Every module in this package registers its factories on import."""

from __future__ import annotations

import importlib
import pkgutil

from kdtune.models.registry import MODELS, create_model, list_models, register_model

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("registry", "checkpoint") and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["MODELS", "create_model", "list_models", "register_model"]
