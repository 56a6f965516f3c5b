"""Objectives and distillation methods, one file each; every module here registers itself on import.

The logit losses are also plain functions returning the batch-mean distillation term only (no CE, no
outer weight), in the papers' conventions: ``kd``, ``dkd``, ``dist``, ``ttm``, ``wttm``.

Logit standardisation (Sun et al., CVPR 2024) is the boolean ``logit_std`` of ``kd`` and ``dkd`` (function
argument and method hyperparameter): the methods its paper and official code apply it to (with MLKD and CTKD,
which kdtune does not have). DIST, TTM and WTTM do not take it: neither their papers nor the
standardisation paper define them on standardised logits.
"""

from __future__ import annotations

import importlib
import pkgutil

from kdtune.losses.base import METHODS, HParam, Method, MethodContext, StepOutputs, register_method

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

from kdtune.losses.dist import dist  # noqa: E402
from kdtune.losses.dkd import dkd  # noqa: E402
from kdtune.losses.kd import kd  # noqa: E402
from kdtune.losses.ttm import ttm, wttm  # noqa: E402

__all__ = [
    "METHODS",
    "HParam",
    "Method",
    "MethodContext",
    "StepOutputs",
    "register_method",
    "kd",
    "dkd",
    "dist",
    "ttm",
    "wttm",
]

