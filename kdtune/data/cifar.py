"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009), read straight from the official python pickles.

The pickles are decoded into uint8 tensors ``(N, 3, 32, 32)`` with int64 labels, ready for the
device-resident loader. Layout expected under ``data_root``::

    <root>/cifar-100-python/{train,test,meta}
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}

(``data_root`` may also point at the ``cifar-*`` directory itself.) With ``download=True`` the archive is
fetched and md5-checked by ``torchvision.datasets.CIFAR100/CIFAR10`` first. Splits: ``train``/``val``
carved from the official 50,000 training images with :func:`~kdtune.data.base.carve_val`; ``test`` is the
official 10,000-image test set. Normalisation constants are the ones of the CRD code (Tian et al., 2020).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from kdtune.data import register_dataset
from kdtune.data.base import DataBundle, Split, carve_val
from kdtune.errors import DataError

_SPECS = {
    "cifar100": dict(
        title="CIFAR-100",
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
    ),
    "cifar10": dict(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
}


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _unpickle(path: Path) -> dict:
    """Load one CIFAR pickle; keys come back as ``str`` whether the file was written by Python 2 or 3."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read CIFAR file {path} ({e}); delete it and pass download=true") from None
    if not isinstance(d, dict):
        raise DataError(f"CIFAR file {path} is not a CIFAR pickle; delete it and pass download=true")
    return {_text(k): v for k, v in d.items()}


def _read_batches(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in files:
        path = folder / name
        d = _unpickle(path)
        if "data" not in d or label_key not in d:
            raise DataError(
                f"CIFAR file {path} lacks the 'data' or {label_key!r} entry; delete it and pass download=true"
            )
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR file {path} holds data of shape {data.shape}, expected (N, 3072)")
        # each row: 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.as_tensor(np.asarray(d[label_key], dtype=np.int64)))
        if len(ys[-1]) != len(xs[-1]):
            raise DataError(f"CIFAR file {path} has {len(xs[-1])} images but {len(ys[-1])} labels")
    return torch.cat(xs), torch.cat(ys)


def _find_folder(root: Path, spec: dict) -> Path | None:
    needed = spec["train"] + spec["test"] + [spec["meta"]]
    for cand in (root / spec["folder"], root):
        if all((cand / f).is_file() for f in needed):
            return cand
    return None


def _download(root: Path, name: str) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR100 if name == "cifar100" else torchvision.datasets.CIFAR10
    root.mkdir(parents=True, exist_ok=True)
    try:
        # downloads the archive, checks its md5 and every extracted file's md5, then loads the test set
        cls(root=str(root), train=False, download=True)
    except (OSError, RuntimeError) as e:
        raise DataError(
            f"downloading {_SPECS[name]['title']} into {root} failed ({e}); "
            f"check the network or pass data_root=<dir containing {_SPECS[name]['folder']}>"
        ) from None


def load_cifar(name: str, root: Path, download: bool, val_fraction: float, seed: int) -> DataBundle:
    spec = _SPECS[name]
    root = Path(root).expanduser()
    folder = _find_folder(root, spec)
    if folder is None and download:
        _download(root, name)
        folder = _find_folder(root, spec)
    if folder is None:
        raise DataError(
            f"{spec['title']} not found in {root / spec['folder']}; "
            f"pass download=true or data_root=<dir containing {spec['folder']}>"
        )
    x_train, y_train = _read_batches(folder, spec["train"], spec["label_key"])
    x_test, y_test = _read_batches(folder, spec["test"], spec["label_key"])
    meta = _unpickle(folder / spec["meta"])
    class_names = [_text(n) for n in meta.get(spec["names_key"], [])]
    n = spec["num_classes"]
    if len(class_names) != n:
        raise DataError(
            f"{folder / spec['meta']} lists {len(class_names)} class names, expected {n}; "
            "delete the folder and pass download=true"
        )
    for y, split in ((y_train, "train"), (y_test, "test")):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
            raise DataError(
                f"{spec['title']} {split} labels in {folder} fall outside [0, {n}); the files are corrupt"
            )
    train, val = carve_val(x_train, y_train, val_fraction, seed)
    return DataBundle(
        name=name,
        num_classes=n,
        in_channels=3,
        image_size=32,
        train=train,
        val=val,
        test=Split(x_test, y_test),
        mean=spec["mean"],
        std=spec["std"],
        crop_padding=4,
        flip=True,
        class_names=class_names,
        info={"path": str(folder), "val_fraction": val_fraction, "val_seed": seed},
    )


@register_dataset("cifar100")
def cifar100(root: Path, download: bool = False, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """CIFAR-100: 100 classes ("fine" labels), 50,000 train / 10,000 test 32x32 RGB images."""
    return load_cifar("cifar100", root, download, val_fraction, seed)


@register_dataset("cifar10")
def cifar10(root: Path, download: bool = False, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """CIFAR-10: 10 classes, 50,000 train / 10,000 test 32x32 RGB images."""
    return load_cifar("cifar10", root, download, val_fraction, seed)
