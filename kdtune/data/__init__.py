"""Data sets behind one registry, and the loaders that feed the engine.

``load_data(name, root=..., download=False, val_fraction=0.1, seed=0)`` returns a :class:`DataBundle`.
Every module in this package registers its data sets on import with ``@register_dataset("name")``; a
factory is called as ``factory(root=..., download=..., val_fraction=..., seed=...)``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

from kdtune.data.base import DataBundle, Split, carve_val
from kdtune.registry import Registry

DATASETS: Registry = Registry("data set")


def register_dataset(name: str):
    return DATASETS.register(name)


def default_root() -> Path:
    """Where data sets live unless ``data_root=`` says otherwise: ``$KDTUNE_DATA`` or ``~/.cache/kdtune/data``."""
    return Path(os.environ.get("KDTUNE_DATA", Path.home() / ".cache" / "kdtune" / "data"))


def load_data(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataBundle:
    factory = DATASETS.get(name)
    return factory(
        root=Path(root) if root else default_root(), download=download, val_fraction=val_fraction, seed=seed
    )


def list_datasets() -> list[str]:
    return DATASETS.names()


for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "loader") and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["DATASETS", "DataBundle", "Split", "carve_val", "load_data", "list_datasets", "register_dataset"]
