"""The device-resident loader for in-memory data sets (after airbench).

The whole split lives on the device as ``uint8`` (CIFAR-100: 150 MB train + 30 MB test); each batch is
gathered by index, cropped and flipped on the device, then normalised to float. There is no per-image
Python work and no DataLoader.

Determinism: the order of epoch ``e`` is ``randperm`` from a generator seeded by ``(data_seed, e)``; each
sample's crop offsets and flip are a hash of ``(data_seed, e, index)``. A view therefore depends only on the
data seed, the epoch and the example - not on batch size, device, trial or RNG state - so every trial that
shares a teacher and a data seed shows the teacher the very same views.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kdtune.data.base import Split

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32-style) on int64 tensors; products stay below 2**63."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def _mix32_int(x: int) -> int:
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def view_hash(data_seed: int, epoch: int, index: Tensor, salt: int) -> Tensor:
    """Deterministic 32-bit value per example from (data_seed, epoch, index, salt), same on CPU and GPU."""
    key = _mix32_int((_mix32_int((data_seed * 0x9E3779B1 + salt) & _MASK32) + epoch * 0x85EBCA6B) & _MASK32)
    return _mix32((index.to(torch.int64) * 0x27D4EB2F + key) & _MASK32)


def epoch_permutation(n: int, data_seed: int, epoch: int) -> Tensor:
    """The order of epoch ``epoch``: a CPU ``randperm`` seeded by (data_seed, epoch), identical everywhere."""
    g = torch.Generator().manual_seed((data_seed * 1_000_003 + epoch * 7919 + 17) & 0x7FFFFFFFFFFFFFFF)
    return torch.randperm(n, generator=g)


def augment_uint8(
    x: Tensor, index: Tensor, *, data_seed: int, epoch: int, padding: int, flip: bool
) -> Tensor:
    """Random crop with zero padding and horizontal flip of a uint8 NCHW batch, drawn per (seed, epoch, index).

    Zero padding of the uint8 image is what torchvision's ``RandomCrop(32, padding=4)`` does on the PIL image.
    """
    b, c, h, w = x.shape
    if padding > 0:
        span = 2 * padding + 1
        oy = view_hash(data_seed, epoch, index, 1) % span
        ox = view_hash(data_seed, epoch, index, 2) % span
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if flip:
        do_flip = (view_hash(data_seed, epoch, index, 3) & 1).bool()
        x = torch.where(do_flip[:, None, None, None], x.flip(3), x)
    return x


class DeviceLoader:
    """Batches of an in-memory :class:`Split`, held on ``device``.

    ``epoch(e)`` yields ``(x, y)``: ``x`` float32 normalised NCHW (or the float vectors of toy data),
    ``y`` int64, both on ``device``. Training loaders shuffle and augment; evaluation loaders do neither.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        mean: tuple[float, ...] = (),
        std: tuple[float, ...] = (),
        crop_padding: int = 0,
        flip: bool = False,
        augment: bool = True,
        data_seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = False,
    ):
        self.device = torch.device(device)
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.n = len(split)
        self.batch_size = int(batch_size)
        self.train = train
        self.images = self.x.dtype == torch.uint8 and self.x.dim() == 4
        self.crop_padding = crop_padding if (train and augment and self.images) else 0
        self.flip = flip and train and augment and self.images
        self.data_seed = int(data_seed)
        # Training drops the last partial batch (as the reference loops do) unless that would leave none.
        self.drop_last = (train and self.n >= self.batch_size) if drop_last is None else drop_last
        self.channels_last = channels_last and self.images
        if self.images:
            c = self.x.shape[1]
            m = torch.tensor(mean or (0.5,) * c, dtype=torch.float32, device=self.device)
            s = torch.tensor(std or (0.5,) * c, dtype=torch.float32, device=self.device)
            # x/255 - mean) / std  ==  x * scale + shift
            self._scale = (1.0 / (255.0 * s)).view(1, c, 1, 1)
            self._shift = (-m / s).view(1, c, 1, 1)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    @property
    def resident_bytes(self) -> int:
        """Bytes this loader keeps on its device: the uint8 images and the labels."""
        return self.x.nbytes + self.y.nbytes

    def epoch(self, e: int = 0, with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """Epoch ``e``'s batches ``(x, y)``, or ``(x, y, index)`` with each sample's index into the split."""
        if self.train:
            order = epoch_permutation(self.n, self.data_seed, e).to(self.device)
        else:
            order = None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.n)
            idx = order[lo:hi] if order is not None else torch.arange(lo, hi, device=self.device)
            yield (*self._batch(idx, e), idx) if with_index else self._batch(idx, e)

    def _batch(self, idx: Tensor, e: int) -> tuple[Tensor, Tensor]:
        x = self.x[idx]
        if self.images:
            if self.crop_padding or self.flip:
                x = augment_uint8(
                    x, idx, data_seed=self.data_seed, epoch=e, padding=self.crop_padding, flip=self.flip
                )
            x = x.float().mul_(self._scale).add_(self._shift)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, self.y[idx]
