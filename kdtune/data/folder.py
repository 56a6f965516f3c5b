"""Image-folder data sets (Tiny-ImageNet, ImageNet) and the DataLoader-based loader for data not in memory.

* ``tiny-imagenet`` (CS231n, 200 classes, 64x64): decoded once into uint8 tensors held in memory, with the
  decoded arrays cached next to the data (``kdtune_cache_<split>.pt``, rebuilt when the file list changes).
* ``imagenet`` (ILSVRC-2012, Russakovsky et al., 2015): kept on disk; the bundle's splits are
  :class:`ImageFiles` datasets yielding ``(PIL image, label)``, read by :class:`FolderLoader`.

Both accept the official layouts and plain ``ImageFolder`` layouts (``train/<class>/*``, ``val/<class>/*``).
Classes are numbered in sorted directory order, as ``torchvision.datasets.ImageFolder`` numbers them, so
checkpoints trained with ImageFolder keep their label meaning. ``val`` is carved from the official training
set with :func:`~kdtune.data.base.carve_val`; ``test`` is the official validation split.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdtune.data import register_dataset
from kdtune.data.base import DataBundle, Split, carve_val
from kdtune.errors import ConfigError, DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_FOLDER = "tiny-imagenet-200"
TINY_SIZE = 64
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------- file lists
class ImageFiles(torch.utils.data.Dataset):
    """A list of ``(path, label)`` read lazily: ``ds[i]`` is ``(PIL RGB image, int label)``."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], root: str | Path = ""):
        self.samples = list(samples)
        self.classes = list(classes)
        self.root = str(root)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB"), label
        except OSError as e:
            raise DataError(f"cannot read image {path} ({e}); delete or replace the file") from None

    def subset(self, indices: Sequence[int] | Tensor) -> ImageFiles:
        idx = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        return ImageFiles([self.samples[i] for i in idx], self.classes, self.root)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _images_under(d: Path) -> list[str]:
    """Every image file below ``d`` (recursively, following links), sorted for a stable order."""
    out = []
    for dirpath, _, files in os.walk(d, followlinks=True):
        out.extend(os.path.join(dirpath, f) for f in files if _is_image(f))
    return sorted(out)


def _class_dirs(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _scan_classes(split_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    samples = []
    for cls in _class_dirs(split_dir):
        if cls not in class_to_idx:
            raise DataError(
                f"{split_dir / cls} is a class the training split lacks; "
                f"remove it or add {cls}/ under the train directory"
            )
        samples.extend((p, class_to_idx[cls]) for p in _images_under(split_dir / cls))
    return samples


def _train_classes(train_dir: Path) -> list[str]:
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<images>")
    return classes


# --------------------------------------------------------------------------------------------- tiny-imagenet
def _tiny_dir(root: Path) -> Path | None:
    for cand in (root / TINY_FOLDER, root):
        if (cand / "train").is_dir():
            return cand
    return None


def _tiny_test_samples(base: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    val = base / "val"
    ann = val / "val_annotations.txt"
    if ann.is_file():  # official layout: val/images/<file> + "file<TAB>wnid<TAB>box..." lines
        samples = []
        for ln, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or parts[1] not in class_to_idx:
                raise DataError(f"{ann}:{ln} names no known class ({line.strip()!r}); the file is corrupt")
            path = val / "images" / parts[0]
            if not path.is_file():
                raise DataError(f"{ann}:{ln} lists {path}, which does not exist; re-extract the archive")
            samples.append((str(path), class_to_idx[parts[1]]))
        return sorted(samples)
    if val.is_dir() and _class_dirs(val):
        return _scan_classes(val, class_to_idx)
    raise DataError(
        f"no labelled validation split in {val}; expected val/val_annotations.txt (official layout) "
        "or val/<class>/<images>"
    )


def _file_list_key(samples: Sequence[tuple[str, int]], base: Path, size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} size={size}\n".encode())
    for path, label in samples:
        h.update(f"{os.path.relpath(path, base)}\t{label}\t{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def _decode_one(path: str, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot decode image {path} ({e}); delete or replace the file") from None


def _decode_images(paths: Sequence[str], size: int) -> Tensor:
    """Decode images into a uint8 ``(N, 3, size, size)`` tensor (threads: PIL releases the GIL to decode)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = _decode_one(paths[i], size)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(len(paths))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_split_cached(
    base: Path, split: str, samples: Sequence[tuple[str, int]], size: int
) -> tuple[Tensor, Tensor]:
    """Decoded ``(x, y)`` of one split, from ``base/kdtune_cache_<split>.pt`` while its file list matches."""
    cache = base / f"kdtune_cache_{split}.pt"
    key = _file_list_key(samples, base, size)
    if cache.is_file():
        try:
            d = torch.load(cache, map_location="cpu", weights_only=True)
            if d.get("key") == key:
                return d["x"], d["y"]
        except Exception:  # unreadable or truncated cache: rebuild it
            pass
    x = _decode_images([p for p, _ in samples], size)
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        torch.save({"key": key, "x": x, "y": y}, tmp)
        os.replace(tmp, cache)  # atomic: concurrent trials never read a half-written cache
    except OSError as e:
        warnings.warn(
            f"could not write the decoded-image cache {cache} ({e}); the next load decodes again",
            stacklevel=2,
        )
        tmp.unlink(missing_ok=True)
    return x, y


def _download_tiny(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    root.mkdir(parents=True, exist_ok=True)
    try:
        download_and_extract_archive(
            TINY_URL,
            download_root=str(root),
            filename="tiny-imagenet-200.zip",
            md5=TINY_MD5,
            remove_finished=True,
        )
    except (OSError, RuntimeError) as e:
        raise DataError(
            f"downloading Tiny-ImageNet into {root} failed ({e}); "
            f"check the network or pass data_root=<dir containing {TINY_FOLDER}>"
        ) from None


@register_dataset("tiny-imagenet")
def tiny_imagenet(root: Path, download: bool = False, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """Tiny-ImageNet-200: 100,000 train / 10,000 val 64x64 RGB images in 200 classes, held in memory.

    Images not 64x64 (possible in a hand-made ImageFolder layout) are resized to 64x64 bilinearly.
    """
    root = Path(root).expanduser()
    base = _tiny_dir(root)
    if base is None and download:
        _download_tiny(root)
        base = _tiny_dir(root)
    if base is None:
        raise DataError(
            f"Tiny-ImageNet not found in {root / TINY_FOLDER}; "
            f"pass download=true or data_root=<dir containing {TINY_FOLDER}>"
        )
    classes = _train_classes(base / "train")
    wnids = base / "wnids.txt"
    if wnids.is_file():
        listed = sorted(w for w in wnids.read_text().split() if w)
        if listed != classes:
            raise DataError(
                f"{wnids} lists {len(listed)} classes but {base / 'train'} holds {len(classes)} "
                "different ones; re-extract the archive"
            )
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train_samples = _scan_classes(base / "train", class_to_idx)
    if not train_samples:
        raise DataError(f"no images under {base / 'train'}; expected train/<class>/[images/]*.JPEG")
    test_samples = _tiny_test_samples(base, class_to_idx)
    x_train, y_train = _load_split_cached(base, "train", train_samples, TINY_SIZE)
    x_test, y_test = _load_split_cached(base, "test", test_samples, TINY_SIZE)
    train, val = carve_val(x_train, y_train, val_fraction, seed)
    return DataBundle(
        name="tiny-imagenet",
        num_classes=len(classes),
        in_channels=3,
        image_size=TINY_SIZE,
        train=train,
        val=val,
        test=Split(x_test, y_test),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_padding=8,
        flip=True,
        class_names=classes,
        info={"path": str(base), "val_fraction": val_fraction, "val_seed": seed},
    )


# --------------------------------------------------------------------------------------------- imagenet
def _imagenet_dir(root: Path) -> Path | None:
    for cand in (root / "imagenet", root):
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    return None


@register_dataset("imagenet")
def imagenet(root: Path, download: bool = False, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """ImageNet-1k from ``<root>/imagenet/{train,val}/<wnid>/*.JPEG`` (or ``root`` holding train/ and val/).

    Too large for memory: splits are :class:`ImageFiles` read by :class:`FolderLoader`. ``val`` is carved
    from train by index with the same seeded, stratified procedure as the in-memory data sets.
    """
    root = Path(root).expanduser()
    base = _imagenet_dir(root)
    if base is None:
        raise DataError(
            f"ImageNet not found in {root / 'imagenet'} (it cannot be downloaded automatically); "
            "put train/<wnid>/ and val/<wnid>/ there or pass data_root=<dir containing imagenet>"
        )
    classes = _train_classes(base / "train")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    if not _class_dirs(base / "val"):
        raise DataError(
            f"{base / 'val'} holds no class folders; sort the validation images into val/<wnid>/ "
            "(e.g. with the widely used valprep.sh script)"
        )
    train_all = ImageFiles(_scan_classes(base / "train", class_to_idx), classes, base / "train")
    test = ImageFiles(_scan_classes(base / "val", class_to_idx), classes, base / "val")
    if len(train_all) == 0 or len(test) == 0:
        raise DataError(f"no images found under {base}/train or {base}/val; expected <split>/<wnid>/*.JPEG")
    targets = torch.tensor(train_all.targets, dtype=torch.int64)
    tr, va = carve_val(torch.arange(len(targets)), targets, val_fraction, seed)
    return DataBundle(
        name="imagenet",
        num_classes=len(classes),
        in_channels=3,
        image_size=224,
        train=train_all.subset(tr.x),
        val=train_all.subset(va.x),
        test=test,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_padding=0,
        flip=True,
        class_names=classes,
        info={"path": str(base), "val_fraction": val_fraction, "val_seed": seed},
    )


# --------------------------------------------------------------------------------------------- loader
def _seed(tag: str, *values: int) -> int:
    """A 63-bit seed from a tag and integers, identical in every process (unlike Python's salted ``hash``)."""
    digest = hashlib.blake2b(":".join([tag, *map(str, values)]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _image_hw(img) -> tuple[int, int]:
    if isinstance(img, Tensor):
        return int(img.shape[-2]), int(img.shape[-1])
    w, h = img.size
    return h, w


def random_resized_crop_params(
    h: int, w: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of an Inception-style random crop (Szegedy et al., 2015, sec. 6), drawn
    from ``g``: area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``, 10 tries, then
    the central crop of the largest allowed aspect ratio (torchvision ``RandomResizedCrop``'s procedure)."""
    area = h * w
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(lo + (hi - lo) * u[1])
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class _Views(torch.utils.data.Dataset):
    """``views[(epoch, index)]``: the uint8 CHW view of sample ``index`` in ``epoch`` and its label.

    Training views (random resized crop + horizontal flip) are drawn from a generator seeded by
    ``(data_seed, epoch, index)``, never from worker RNG state, so a view is the same whatever worker
    decodes it. Evaluation views: resize the short side to ``round(size * 256 / 224)``, centre crop.
    """

    def __init__(self, dataset, train: bool, image_size: int, data_seed: int):
        self.dataset = dataset
        self.train = train
        self.size = int(image_size)
        self.resize = int(round(self.size * 256 / 224))
        self.data_seed = int(data_seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        import torchvision.transforms.functional as F

        epoch, index = key
        img, label = self.dataset[index]
        if self.train:
            g = torch.Generator().manual_seed(_seed("view", self.data_seed, epoch, index))
            top, left, h, w = random_resized_crop_params(*_image_hw(img), g)
            img = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if torch.rand((), generator=g) < 0.5:
                img = F.hflip(img)
        else:
            img = F.center_crop(F.resize(img, [self.resize], antialias=True), [self.size, self.size])
        x = img if isinstance(img, Tensor) else F.pil_to_tensor(img)
        if x.dtype != torch.uint8:
            raise DataError(
                f"folder data set yields {x.dtype} images; it must yield PIL images or uint8 tensors"
            )
        return x, int(label)


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` keys; training order is a randperm seeded by ``(data_seed, epoch)``."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, data_seed: int):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.data_seed = int(data_seed)
        self.epoch = 0

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(
            self.n, generator=torch.Generator().manual_seed(_seed("order", self.data_seed, epoch))
        )

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        e = self.epoch
        idx = self.order(e).tolist()
        for b in range(len(self)):
            yield [(e, i) for i in idx[b * self.batch_size : (b + 1) * self.batch_size]]


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


class FolderLoader:
    """Batches from a dataset of ``(PIL image, label)`` through a torch DataLoader, for data not in memory.

    Same interface as the device-resident loader: ``len(loader)`` batches per epoch and ``loader.epoch(e)``
    yielding ``(x, y)`` with ``x`` float32 NCHW normalised by ``(x / 255 - mean) / std`` on ``device`` and
    ``y`` int64 on ``device``. Training: random resized crop to ``image_size`` and horizontal flip, epoch
    order a randperm seeded by ``(data_seed, e)``, each view seeded by ``(data_seed, e, index)``; so the same
    configuration always sees the same views. Evaluation: resize + centre crop, in dataset order. uint8 is
    what crosses to the device (pinned when the device is CUDA); normalisation happens there.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        train: bool,
        device,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        data_seed: int,
        num_workers: int | None = None,
        drop_last: bool | None = None,
    ):
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size} is out of range; it must be at least 1")
        if len(mean) != len(std) or not mean:
            raise ConfigError(f"mean {tuple(mean)} and std {tuple(std)} must list one value per channel")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.device = torch.device(device)
        self.image_size = int(image_size)
        self.data_seed = int(data_seed)
        self.num_workers = _default_workers() if num_workers is None else int(num_workers)
        c = len(mean)
        self._mean255 = (torch.tensor(mean, dtype=torch.float32) * 255).view(1, c, 1, 1).to(self.device)
        self._std255 = (torch.tensor(std, dtype=torch.float32) * 255).view(1, c, 1, 1).to(self.device)
        self._batches = _EpochBatches(
            len(dataset), self.batch_size, self.train, self.drop_last, self.data_seed
        )
        workers = self.num_workers > 0
        self._loader = torch.utils.data.DataLoader(
            _Views(dataset, self.train, self.image_size, self.data_seed),
            batch_sampler=self._batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers,
            prefetch_factor=4 if workers else None,
        )

    def __len__(self) -> int:
        return len(self._batches)

    def order(self, e: int) -> Tensor:
        """The dataset indices of epoch ``e`` in the order they are served."""
        return self._batches.order(e)

    def epoch(self, e: int) -> Iterator[tuple[Tensor, Tensor]]:
        # the sampler runs in this process, so setting the epoch before iterating reaches persistent workers
        self._batches.epoch = int(e)
        for x, y in self._loader:
            x = x.to(self.device, non_blocking=True).float().sub_(self._mean255).div_(self._std255)
            yield x, y.to(self.device, non_blocking=True)
