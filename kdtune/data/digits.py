"""scikit-learn's handwritten digits (UCI optdigits test part): the embedded, offline default data set.

1,797 grey 8x8 images with values 0..16, stored here as uint8 ``(N, 1, 8, 8)`` via ``round(v * 255 / 16)``.
The data set has no official test split, so one is fixed once and for all: a stratified 20 % holdout
(``train_test_split(..., test_size=0.2, random_state=0, stratify=y)``), the same whatever ``seed`` says,
since it plays the part of an official test set. ``val`` is carved from the remaining 80 % with
:func:`~kdtune.data.base.carve_val`; mean and std are those of that 80 % (fixed, like CIFAR's constants).
Augmentation: random crop with padding 1, no flip (a mirrored digit is another symbol or none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdtune.data import register_dataset
from kdtune.data.base import DataBundle, Split, carve_val

TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0


def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return x[:, None, :, :], d.target.astype(np.int64)


@register_dataset("digits")
def digits(
    root: Path | None = None, download: bool = False, val_fraction: float = 0.1, seed: int = 0
) -> DataBundle:
    """scikit-learn ``load_digits``: 10 classes; ``root`` and ``download`` are ignored (it ships offline)."""
    from sklearn.model_selection import train_test_split

    x, y = _digits_uint8()
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, random_state=TEST_SPLIT_SEED, stratify=y
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    x_all, y_all = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])
    xf = x_all.double() / 255.0
    mean = tuple(round(float(v), 4) for v in xf.mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in xf.std(dim=(0, 2, 3)))
    train, val = carve_val(x_all, y_all, val_fraction, seed)
    return DataBundle(
        name="digits",
        num_classes=10,
        in_channels=1,
        image_size=8,
        train=train,
        val=val,
        test=Split(torch.from_numpy(x[test_idx]), torch.from_numpy(y[test_idx])),
        mean=mean,
        std=std,
        crop_padding=1,
        flip=False,
        class_names=[str(i) for i in range(10)],
        info={"source": "sklearn.datasets.load_digits", "val_fraction": val_fraction, "val_seed": seed},
    )
