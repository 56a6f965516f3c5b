"""Model zoo: CIFAR-style networks of the CRD benchmark, DiSK's ResNet10 family and toy nets, torchvision
ImageNet models by name. Every module in this package registers its factories on import (``tv``, torchvision's
models, when a ``tv_`` name is first looked up or listed)."""

from __future__ import annotations

import importlib
import pkgutil

from kdtune.models.registry import MODELS, create_model, list_models, register_model

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("registry", "checkpoint", "tv") and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
# torchvision's models (tv_*) register when first asked for: importing torchvision costs about a second, which
# every trial's process and CLI command would otherwise pay without using it.
MODELS.register_lazy("tv_", lambda: importlib.import_module(f"{__name__}.tv"))

__all__ = ["MODELS", "create_model", "list_models", "register_model"]
