"""What every data set loader returns: a :class:`DataBundle` of three splits.

In-memory data sets (CIFAR, digits, Tiny-ImageNet, the DiSK toys) hold their splits as tensors:
images ``uint8`` ``(N, C, H, W)`` (toys: ``float32`` ``(N, D)``), labels ``int64`` ``(N,)``. Folder data sets
too large for memory (ImageNet) hold an ``ImageFolder``-style dataset object instead and are read by a
DataLoader.

Splits: ``train`` is what the model trains on; ``val`` is carved from the official training set with a fixed
seed (the metric a sweep optimises); ``test`` is the official test/validation split, for final reporting only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Split:
    """One split held in memory: ``x`` uint8 NCHW images (or float features), ``y`` int64 labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataBundle:
    name: str
    num_classes: int
    in_channels: int
    image_size: int | None  # None for vector (toy) data
    train: Any  # Split, or a torch Dataset yielding (PIL image, label) for folder data
    val: Any
    test: Any
    mean: tuple[float, ...] = ()  # per channel, in [0, 1] units; empty for vector data
    std: tuple[float, ...] = ()
    crop_padding: int = 0  # random crop with this padding during training (0: no crop)
    flip: bool = False  # random horizontal flip during training
    class_names: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, Split)


def carve_val(x: Tensor, y: Tensor, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Split (x, y) into train and validation with a fixed seed, stratified by class.

    The same ``seed`` always carves the same examples, whatever the trial: the validation set is what a
    sweep optimises, and must never be the test split.
    """
    if not 0.0 <= val_fraction < 1.0:
        from kdtune.errors import ConfigError

        raise ConfigError(f"val_fraction={val_fraction} is out of range; valid range [0, 1)")
    g = torch.Generator().manual_seed(int(seed))
    val_idx = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
    val_idx = torch.cat(val_idx).sort().values if val_idx else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[val_idx] = False
    return Split(x[mask], y[mask]), Split(x[val_idx], y[val_idx])
