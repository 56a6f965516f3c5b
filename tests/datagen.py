"""Tiny data sets written in the official on-disk formats, for tests (``from tests.datagen import ...``).

CIFAR images carry a known pixel pattern so a reader can be checked pixel for pixel without the writer:
image ``i`` of a file has red ``(8*h + i) % 256`` (varies down the rows), green ``(8*w + i) % 256``
(varies across the columns) and blue ``(37*i + 100) % 256`` (constant); see :func:`cifar_pattern`.
Image-folder images are flat colours per class (:func:`class_colour`) so labels can be checked after JPEG.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def cifar_pattern(n: int, offset: int = 0) -> np.ndarray:
    """``(n, 3, 32, 32)`` uint8 images; image ``i`` uses index ``i + offset`` in the formulas above."""
    i = (np.arange(n) + offset)[:, None, None]
    h = np.arange(32)[None, :, None]
    w = np.arange(32)[None, None, :]
    red = np.broadcast_to((8 * h + i) % 256, (n, 32, 32))
    green = np.broadcast_to((8 * w + i) % 256, (n, 32, 32))
    blue = np.broadcast_to((37 * i + 100) % 256, (n, 32, 32))
    return np.stack([red, green, blue], axis=1).astype(np.uint8)


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(x: np.ndarray, labels: np.ndarray, label_key: bytes, extra: dict | None = None) -> dict:
    d = {
        b"data": x.reshape(len(x), 3 * 32 * 32),  # row-major: R plane, G plane, B plane
        label_key: labels.tolist(),
        b"filenames": [f"img_{k:05d}.png".encode() for k in range(len(x))],
    }
    d.update(extra or {})
    return d


def write_tiny_cifar100(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict:
    """Write ``<root>/cifar-100-python/{train,test,meta}``; returns the arrays (x uint8 NCHW, y int64)."""
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    x_train, x_test = cifar_pattern(n_train), cifar_pattern(n_test)
    y_train, y_test = _balanced_labels(n_train, 100, rng), _balanced_labels(n_test, 100, rng)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        extra = {b"coarse_labels": (y // 5).tolist(), b"batch_label": f"{name}ing batch 1 of 1".encode()}
        _dump(d / name, _batch(x, y, b"fine_labels", extra))
    names = [f"fine_{k:03d}".encode() for k in range(100)]
    _dump(
        d / "meta", {b"fine_label_names": names, b"coarse_label_names": [f"c{k}".encode() for k in range(20)]}
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "dir": d}


def write_tiny_cifar10(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict:
    """Write ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; returns the arrays.

    The training images are split over the five batches in order, so image ``i`` of ``data_batch_k`` carries
    the pattern of overall index ``i + offset_k``.
    """
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    x_train, x_test = cifar_pattern(n_train), cifar_pattern(n_test)
    y_train, y_test = _balanced_labels(n_train, 10, rng), _balanced_labels(n_test, 10, rng)
    bounds = np.linspace(0, n_train, 6).astype(int)
    for k in range(5):
        a, b = bounds[k], bounds[k + 1]
        extra = {b"batch_label": f"training batch {k + 1} of 5".encode()}
        _dump(d / f"data_batch_{k + 1}", _batch(x_train[a:b], y_train[a:b], b"labels", extra))
    _dump(d / "test_batch", _batch(x_test, y_test, b"labels", {b"batch_label": b"testing batch 1 of 1"}))
    names = [f"class_{k}".encode() for k in range(10)]
    _dump(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": n_train // 5, b"num_vis": 3072})
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "dir": d}


def class_colour(k: int) -> tuple[int, int, int]:
    """A flat RGB colour for class ``k``, far from the others for small ``k`` (checkable after JPEG)."""
    return ((k * 97 + 40) % 256, (k * 151 + 200) % 256, (k * 61 + 120) % 256)


def _write_jpeg(path: Path, k: int, size, j: int) -> None:
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    colour = tuple(min(255, c + (j % 3)) for c in class_colour(k))
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = colour
    img[: h // 4, : w // 4] = 255 - np.array(colour, dtype=np.uint8)  # a corner patch: flips are visible
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=95)


def write_image_folder(
    root,
    classes: int = 3,
    per_class: int = 4,
    size=64,
    layout: str = "tiny-imagenet",
    val_per_class: int = 2,
) -> dict:
    """Write real JPEGs under ``root`` (the data set's own directory: it gets ``train/`` and ``val/``).

    ``layout="tiny-imagenet"``: the official archive's layout (``wnids.txt``, ``words.txt``,
    ``train/<wnid>/images/<wnid>_<i>.JPEG`` + ``<wnid>_boxes.txt``, ``val/images/val_<j>.JPEG`` +
    ``val/val_annotations.txt``, unlabelled ``test/images``). ``layout="imagefolder"``:
    ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``. ``size`` is an int or ``(width, height)``.
    Returns ``{"classes": [...], "n_train": ..., "n_val": ...}``; class ``k`` is ``classes[k]`` (sorted).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"n{1443537 + 1000 * k:08d}" for k in range(classes)]
    if layout == "tiny-imagenet":
        (root / "wnids.txt").write_text(
            "".join(f"{n}\n" for n in reversed(names))
        )  # not sorted, like the real one
        (root / "words.txt").write_text("".join(f"{n}\tthing {k}\n" for k, n in enumerate(names)))
        for k, n in enumerate(names):
            boxes = []
            for i in range(per_class):
                _write_jpeg(root / "train" / n / "images" / f"{n}_{i}.JPEG", k, size, i)
                boxes.append(f"{n}_{i}.JPEG\t0\t0\t10\t10\n")
            (root / "train" / n / f"{n}_boxes.txt").write_text("".join(boxes))
        ann, j = [], 0
        for i in range(val_per_class):  # interleave classes, as the official val set does
            for k, n in enumerate(names):
                _write_jpeg(root / "val" / "images" / f"val_{j}.JPEG", k, size, i)
                ann.append(f"val_{j}.JPEG\t{n}\t0\t0\t10\t10\n")
                j += 1
        (root / "val" / "val_annotations.txt").write_text("".join(ann))
        for j in range(2):
            _write_jpeg(root / "test" / "images" / f"test_{j}.JPEG", 0, size, j)
    elif layout == "imagefolder":
        for k, n in enumerate(names):
            for i in range(per_class):
                _write_jpeg(root / "train" / n / f"{n}_{i}.JPEG", k, size, i)
            for i in range(val_per_class):
                _write_jpeg(root / "val" / n / f"ILSVRC2012_val_{k * val_per_class + i:08d}.JPEG", k, size, i)
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'tiny-imagenet' or 'imagefolder'")
    return {"classes": names, "n_train": classes * per_class, "n_val": classes * val_per_class}
