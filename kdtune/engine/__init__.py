"""The training engine: free of Ray and MLflow, usable alone from ``kdtune train`` and Python."""

from kdtune.engine.bundle import Bundle, check_bundle
from kdtune.engine.run import epoch_line, iter_train, iter_train_bundle, train, train_bundle
from kdtune.engine.trainer import DivergedError, Trainer

__all__ = [
    "Bundle",
    "DivergedError",
    "Trainer",
    "check_bundle",
    "epoch_line",
    "iter_train",
    "iter_train_bundle",
    "train",
    "train_bundle",
]
