"""The training engine: free of Ray and MLflow, usable alone from ``kdtune train`` and Python."""

from kdtune.engine.run import epoch_line, iter_train, train
from kdtune.engine.trainer import DivergedError, Trainer

__all__ = ["DivergedError", "Trainer", "epoch_line", "iter_train", "train"]
