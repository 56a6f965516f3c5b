"""The teacher store: a teacher's outputs for every training view, computed once, read by every run that
shows that teacher the same views.

Runs that share the teacher's weights, data, data seed, augmentation, batch size and arithmetic compute the
same teacher outputs batch for batch; the store keeps them (one file per epoch, the loader's batch order, the
teacher's output dtype), so a run that reads it computes bit for bit what the online teacher gives.

- **Key.** :func:`store_key` lists all of it (on the CPU with the thread count); the folder is
  ``<root>/<name>-<sha of the key>/`` with ``key.json``. Anything that changes one output bit changes it.
- **Written once, whole.** Only a run that trained the whole epoch publishes ``epoch-<e>.kdts``, fsynced
  and linked into place with an exclusive ``link``; a killed writer leaves a temporary file, never read.
- **Verified on every read.** Size and sha256 are checked before use; a damaged file is moved aside in one
  log line and that epoch is computed online and published anew.

Free of Ray and MLflow. More: docs/teacher_store.md; measurements: README, "Teacher store".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.errors import ConfigError

FORMAT = 1
MAGIC = b"KDTSTORE"
HEADER_BYTES = 4096  # the payload starts here: aligned for any dtype's view
SUFFIX = ".kdts"
TMP_PREFIX = ".tmp-"
CORRUPT_INFIX = ".corrupt-"
STALE_TMP_S = 3600.0  # a temporary file this old was left by a killed writer
RESERVE_BYTES = 1 << 30  # the store leaves this much of the disk free


def default_root() -> Path:
    """Where ``kdtune train`` keeps stores when no ``teacher_store_dir`` is given."""
    base = os.environ.get("KDTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kdtune"
    )
    return Path(base) / "teacher-store"


def tensors_sha(named: dict[str, Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(named.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def weights_sha(model: nn.Module) -> str:
    """A model's parameters and buffers (:func:`tensors_sha`), whatever file it came from."""
    return tensors_sha(model.state_dict())


def data_sha(split) -> str:
    """The training split's images and labels (:func:`tensors_sha`): a store never serves another data set
    that happens to share a name."""
    return tensors_sha({"x": split.x, "y": split.y})


def store_key(*, teacher: nn.Module, teacher_arch: str, data: str, data_sha: str, val_fraction: float,
              data_seed: int, augment: str, batch_size: int, rows: int, features: bool, device: torch.device,
              amp: str, channels_last: bool) -> dict[str, Any]:  # fmt: skip
    """Everything the teacher's outputs for one epoch's batches depend on."""
    # a CPU kernel may split its sums by thread: the thread count is part of the arithmetic
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return {
        "format": FORMAT,
        "teacher_arch": teacher_arch,
        "teacher_sha256": weights_sha(teacher),
        "data": data,
        "data_sha": data_sha,
        "val_fraction": float(val_fraction),
        "data_seed": int(data_seed),
        "augment": augment,
        "batch_size": int(batch_size),
        "rows": int(rows),
        "features": bool(features),
        "device": kind,
        "amp": amp,
        "channels_last": bool(channels_last),
        "torch": torch.__version__,
    }


def _sha(payload: Tensor) -> str:
    return hashlib.sha256(memoryview(payload.numpy())).hexdigest()


class StoredEpoch:
    """One published epoch: ``batch(i, n)`` gives batch ``i``'s ``n`` rows as the online teacher's
    ``(logits.float(), features.float() or None)``."""

    def __init__(self, logits: Tensor, feats: Tensor | None, batch_size: int):
        self.logits, self.feats, self.batch_size = logits, feats, batch_size

    def batch(self, i: int, n: int) -> tuple[Tensor, Tensor | None]:
        lo = i * self.batch_size
        logits = self.logits[lo : lo + n].to(torch.float32, copy=True)
        feats = self.feats[lo : lo + n].to(torch.float32, copy=True) if self.feats is not None else None
        return logits, feats


class EpochWriter:
    """Records the online teacher's outputs of one epoch, batch by batch, and publishes them if the epoch was
    trained whole."""

    def __init__(self, store: TeacherStore, epoch: int):
        self.store, self.epoch = store, epoch
        self.logits: Tensor | None = None
        self.feats: Tensor | None = None
        self.filled = 0

    def add(self, i: int, logits: Tensor, feats: Tensor | None) -> None:
        rows, bs = self.store.key["rows"], self.store.key["batch_size"]
        if self.logits is None:
            self.logits = torch.empty((rows, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
            if feats is not None:
                self.feats = torch.empty((rows, *feats.shape[1:]), dtype=feats.dtype, device=feats.device)
        lo = i * bs
        self.logits[lo : lo + logits.shape[0]].copy_(logits)
        if self.feats is not None and feats is not None:
            self.feats[lo : lo + feats.shape[0]].copy_(feats)
        self.filled += logits.shape[0]

    def publish(self) -> bool:
        """Publish the epoch if every row was recorded; True if this call published it."""
        if self.logits is None or self.filled != self.store.key["rows"]:
            return False
        return self.store.publish(self.epoch, self.logits, self.feats)


class TeacherStore:
    """The store of one key under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, key: dict[str, Any], *, log: Callable[[str], None] | None = None):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root)
        self.dir = self.root / f"{key['teacher_arch']}-{key['data']}-{digest}"
        self.log = log or (lambda s: None)
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.is_file():
            tmp = self.dir / f"{TMP_PREFIX}key-{uuid.uuid4().hex[:8]}.json"
            tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
            os.replace(tmp, key_file)
        self._clean_stale_tmp()

    # ------------------------------------------------------------------ files
    def path(self, epoch: int) -> Path:
        return self.dir / f"epoch-{epoch:04d}{SUFFIX}"

    def epochs(self) -> list[int]:
        """The published epochs (not verified)."""
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob(f"epoch-*{SUFFIX}"))

    def _clean_stale_tmp(self) -> None:
        now = time.time()
        for p in self.dir.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_TMP_S:
                    p.unlink()

    @staticmethod
    def epoch_bytes(rows: int, classes: int, feat_dim: int | None, itemsize: int) -> int:
        """The size of one epoch's file."""
        return HEADER_BYTES + rows * (classes + (feat_dim or 0)) * itemsize

    # ------------------------------------------------------------------ read
    def read(self, epoch: int, device: torch.device) -> StoredEpoch | None:
        """Epoch ``epoch``'s outputs, verified; None when it is not published or was damaged (moved aside)."""
        path = self.path(epoch)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        try:
            raw, head = _verified(path, size, self.key["rows"])
        except (ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
            self._set_aside(path, str(e))
            return None
        payload = raw[HEADER_BYTES:]
        dtype = getattr(torch, head["dtype"])
        n_logits = _numel(head["logits"])
        values = payload.view(dtype)
        logits = values[:n_logits].view(head["logits"])
        feats = values[n_logits:].view(head["feats"]) if head["feats"] is not None else None
        if device.type != "cpu":
            logits = logits.to(device)
            feats = feats.to(device) if feats is not None else None
        return StoredEpoch(logits, feats, self.key["batch_size"])

    def _set_aside(self, path: Path, why: str) -> None:
        aside = path.with_name(f"{path.name}{CORRUPT_INFIX}{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
            self.log(f"teacher store: {path} is damaged ({why}); moved it to {aside.name}, computing the epoch again")

    # ------------------------------------------------------------------ write
    def writer(self, epoch: int) -> EpochWriter:
        return EpochWriter(self, epoch)

    def publish(self, epoch: int, logits: Tensor, feats: Tensor | None) -> bool:
        """Write epoch ``epoch`` whole (temporary file, fsync, exclusive link); False if it exists already."""
        final = self.path(epoch)
        if final.exists():
            return False
        logits = logits.detach().to("cpu").contiguous()
        parts = [logits.reshape(-1)]
        if feats is not None:
            parts.append(feats.detach().to("cpu", dtype=logits.dtype).contiguous().reshape(-1))
        payload = torch.cat(parts).view(torch.uint8)
        head = {"format": FORMAT, "epoch": epoch, "rows": self.key["rows"], "dtype": str(logits.dtype).split(".")[1],
                "logits": list(logits.shape), "feats": list(feats.shape) if feats is not None else None,
                "sha256": _sha(payload)}  # fmt: skip
        blob = json.dumps(head).encode()
        header = MAGIC + len(blob).to_bytes(4, "little") + blob
        if len(header) > HEADER_BYTES:
            raise ConfigError(f"teacher store header of {len(header)} bytes exceeds {HEADER_BYTES}")
        tmp = self.dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(header.ljust(HEADER_BYTES, b"\0"))
                f.write(memoryview(payload.numpy()))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)  # exclusive: fails if another run published first
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links
                if final.exists():
                    return False
                os.replace(tmp, final)
            with contextlib.suppress(OSError):
                fd = os.open(self.dir, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            return True
        except OSError as e:
            self.log(f"teacher store: could not write {final.name} ({e.strerror}); the run goes on with the online teacher")
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _verified(path: Path, size: int, rows: int | None) -> tuple[Tensor, dict[str, Any]]:
    """The file's bytes and header once its size and sha256 check out; ValueError (the reason) otherwise."""
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    if size < HEADER_BYTES or bytes(raw[: len(MAGIC)].tolist()) != MAGIC:
        raise ValueError("it is not a teacher store file (or is truncated)")
    n = int.from_bytes(bytes(raw[len(MAGIC) : len(MAGIC) + 4].tolist()), "little")
    head = json.loads(bytes(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + n].tolist()).decode())
    itemsize = torch.empty((), dtype=getattr(torch, head["dtype"])).element_size()
    want = HEADER_BYTES + (_numel(head["logits"]) + _numel(head["feats"])) * itemsize
    if size != want:
        raise ValueError(f"it holds {size} bytes, not {want} (truncated)")
    if rows is not None and head.get("rows") != rows:
        raise ValueError(f"it holds {head.get('rows')} rows, not {rows}")
    if _sha(raw[HEADER_BYTES:]) != head["sha256"]:
        raise ValueError("its checksum does not match its contents")
    return raw, head


def check_file(path: str | os.PathLike) -> str | None:
    """Why a published epoch file may not be read (None: it is whole)."""
    try:
        _verified(Path(path), Path(path).stat().st_size, None)
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        return str(e)
    return None


def _numel(shape: list[int] | None) -> int:
    if shape is None:
        return 0
    n = 1
    for s in shape:
        n *= int(s)
    return n


def list_stores(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every store under ``root``: its folder, key, published epochs and bytes on disk."""
    out = []
    for d in sorted(Path(root).glob("*/key.json")):
        folder = d.parent
        try:
            key = json.loads(d.read_text())
        except (OSError, json.JSONDecodeError):
            key = {}
        files = list(folder.iterdir())
        out.append({"path": str(folder), "key": key,
                    "epochs": sorted(int(p.stem.split("-")[1]) for p in files if p.name.endswith(SUFFIX)),
                    "bytes": sum(p.stat().st_size for p in files if p.is_file())})  # fmt: skip
    return out


def free_bytes(root: str | os.PathLike) -> int:
    p = Path(root)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
