"""Saving final models and loading (teacher) checkpoints, kdtune's own and those of the public KD code.

``save_model`` writes, atomically (a temporary file in the same directory, then ``os.replace``)::

    {"kdtune_format": 1, "arch": str, "num_classes": int, "in_channels": int,
     "state_dict": {name: tensor}, "meta": {JSON-able: test accuracy, data set, ...}}

``load_model`` reads a local path or an http(s) URL, always with ``weights_only=True`` (``torch.load`` /
``torch.hub.load_state_dict_from_url``): tensors and plain containers only, never arbitrary pickled
objects. It accepts

More: docs/models.md §Checkpoints.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.errors import CheckpointError
from kdtune.models.registry import MODELS, create_model

FORMAT_VERSION = 1
WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")
_MAX_ERR = 300
ZIP_MAGIC = b"PK\x03\x04"
AUX_KEY = "aux_heads"  # the HSAKD auxiliary heads' state_dict in a kdtune checkpoint
HSAKD_PARTS = ("backbone.", "auxiliary_classifier.")  # an official HSAKD *_aux network's two modules


# ------------------------------------------------------------------------------------------------ saving


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"meta value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def clean_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict:
    """Strip the ``module.`` / ``_orig_mod.`` prefixes that wrap *every* key (DataParallel, DDP,
    ``torch.compile``), keeping the ``_metadata`` (module versions) that ``load_state_dict`` consults."""
    sd = OrderedDict(state_dict)
    meta = getattr(state_dict, "_metadata", None)
    changed = True
    while changed and sd:
        changed = False
        for p in STRIP_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = OrderedDict((k[len(p) :], v) for k, v in sd.items())
                if meta is not None:
                    root = p[:-1]
                    meta = OrderedDict(
                        ("" if k == root else k[len(p) :], v)
                        for k, v in meta.items()
                        if k == root or k.startswith(p)
                    )
                changed = True
    if meta is not None:
        sd._metadata = meta  # type: ignore[attr-defined]
    return sd


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    arch: str,
    num_classes: int,
    in_channels: int,
    meta: dict | None = None,
    durable: bool = True,
    aux_heads: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` in the kdtune format to ``path`` atomically; return the path (``durable=False``: no
    fsync, for a file rewritten every epoch; see :func:`kdtune.storage.atomic_write`).

    Tensors are saved on the CPU, without DataParallel/compile prefixes. ``meta`` must be JSON-able
    (numpy/torch scalars and paths are converted); it comes back as ``info["meta"]`` from :func:`load_model`.
    ``aux_heads``, the state_dict of the model's HSAKD auxiliary heads, is saved beside it (``info["aux_heads"]``).
    """
    if arch not in MODELS:
        raise CheckpointError(
            f"cannot save a model of unknown architecture {arch!r}; use a registered model name"
        )
    meta = json.loads(json.dumps(meta or {}, default=_json_default))
    raw = model.state_dict()
    cpu = OrderedDict((k, v.detach().cpu()) for k, v in raw.items())
    if getattr(raw, "_metadata", None) is not None:
        cpu._metadata = raw._metadata  # type: ignore[attr-defined]
    sd = clean_state_dict(cpu)
    payload = {
        "kdtune_format": FORMAT_VERSION,
        "arch": str(arch),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "state_dict": sd,
        "meta": meta,
    }
    if aux_heads is not None:
        payload[AUX_KEY] = clean_state_dict(OrderedDict((k, v.detach().cpu()) for k, v in aux_heads.items()))
    from kdtune.storage import atomic_write

    path = Path(path)
    with atomic_write(path, "wb", durable=durable) as f:
        torch.save(payload, f)
    return path


# ------------------------------------------------------------------------------------------------ reading


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_ERR else text[: _MAX_ERR - 3] + "..."


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _unpickling_error(err: Exception, role: str, source: str) -> CheckpointError:
    msg = str(err)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if m:
        return CheckpointError(
            f"{role} {source} holds a Python object other than tensors and plain containers ({m.group(1)}); "
            "kdtune loads checkpoints with weights_only=True and never unpickles arbitrary objects: "
            "re-save it from trusted code as torch.save(model.state_dict(), path)"
        )
    return CheckpointError(
        f"cannot read {role} {source}: not a torch.save file or damaged "
        f"({_one_line(msg.split('error:')[-1])}); pass a checkpoint written by torch.save"
    )


def read_checkpoint(source: str | os.PathLike, map_location: Any = "cpu", role: str = "checkpoint") -> Any:
    """``torch.load(..., weights_only=True)`` of a path, or the same through the torch hub cache for an
    http(s) URL; every failure becomes one CheckpointError line."""
    src = os.fspath(source)
    if _is_url(src):
        try:
            return torch.hub.load_state_dict_from_url(
                src, map_location=map_location, progress=False, weights_only=True
            )
        except pickle.UnpicklingError as e:
            raise _unpickling_error(e, role, src) from None
        except (OSError, ValueError, RuntimeError) as e:  # URLError/HTTPError are OSErrors
            raise CheckpointError(
                f"could not download {role} {src} ({type(e).__name__}: {_one_line(e)}); check the address, "
                "or download the file and pass its path"
            ) from None
    path = Path(src).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{role} not found: looked for {path.absolute()}; pass the path of an existing checkpoint file "
            "or an http(s) URL"
        )
    if path.is_dir():
        raise CheckpointError(f"{role} {src} is a directory; pass the checkpoint file inside it")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {role} {src} ({e.strerror or e}); check its permissions") from None
    if not head:
        raise CheckpointError(f"cannot read {role} {src}: the file is empty; copy or save it again")
    if not head.startswith((ZIP_MAGIC, b"\x80")):  # torch.save writes a zip archive (a pickle before 1.6)
        raise CheckpointError(
            f"cannot read {role} {src}: not a torch.save file (it starts with {head!r}); pass a checkpoint "
            "written by torch.save"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(e, role, src) from None
    except Exception as e:  # damaged files surface as assorted errors (EOFError, IndexError, RuntimeError, ...)
        if head == ZIP_MAGIC and "central directory" in str(e):
            raise CheckpointError(
                f"cannot read {role} {src}: the file is truncated or damaged ({path.stat().st_size} bytes, its zip "
                "archive has no end); copy or save it again"
            ) from None
        raise CheckpointError(
            f"cannot read {role} {src} ({type(e).__name__}: {_one_line(e)}); "
            "pass a checkpoint written by torch.save"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) or k.endswith("_extra_state") for k, v in obj.items())
    )


def unwrap(obj: Any, role: str, source: str) -> tuple[OrderedDict, dict | None, str]:
    """(state_dict, kdtune header or None, format name) of a loaded checkpoint object."""
    if isinstance(obj, Mapping) and "kdtune_format" in obj:
        version = obj["kdtune_format"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{role} {source} has kdtune_format {version!r}, newer than this kdtune reads "
                f"({FORMAT_VERSION}); upgrade kdtune"
            )
        missing = [k for k in ("arch", "num_classes", "in_channels", "state_dict") if k not in obj]
        if missing or not _is_state_dict(obj["state_dict"]):
            what = f"lacks {', '.join(missing)}" if missing else "has no tensors under 'state_dict'"
            raise CheckpointError(f"{role} {source} is a damaged kdtune checkpoint ({what}); save it again")
        header = {k: obj[k] for k in ("arch", "num_classes", "in_channels")}
        header["meta"] = dict(obj.get("meta") or {})
        return clean_state_dict(obj["state_dict"]), header, "kdtune"
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return clean_state_dict(obj[key]), None, f"{{'{key}': state_dict}}"
        if _is_state_dict(obj):
            return clean_state_dict(obj), None, "state_dict"
        keys = ", ".join(map(str, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
        raise CheckpointError(
            f"{role} {source} holds no state_dict (a dict with keys {keys}); expected a kdtune checkpoint, "
            "a state_dict, or a dict with one under 'model', 'net' or 'state_dict'"
        )
    raise CheckpointError(
        f"{role} {source} holds a {type(obj).__name__}, not a state_dict; save model.state_dict() instead"
    )


def split_aux_heads(obj: Any, sd: OrderedDict, header: dict | None) -> tuple[OrderedDict, OrderedDict | None]:
    """``(model state_dict, auxiliary heads' state_dict or None)``: a kdtune file's ``aux_heads``, or the two
    parts of an official HSAKD network (``backbone.*`` and ``auxiliary_classifier.*``, nothing else)."""
    if header is not None:
        aux = obj.get(AUX_KEY) if isinstance(obj, Mapping) else None
        return sd, (clean_state_dict(aux) if _is_state_dict(aux) else None)
    backbone, aux = HSAKD_PARTS
    if any(k.startswith(aux) for k in sd) and all(k.startswith(HSAKD_PARTS) for k in sd):
        model = OrderedDict((k[len(backbone) :], v) for k, v in sd.items() if k.startswith(backbone))
        heads = OrderedDict((k[len(aux) :], v) for k, v in sd.items() if k.startswith(aux))
        return model, heads
    return sd, None


# ------------------------------------------------------------------------------------------------ fitting


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _head_and_stem(model: nn.Module) -> tuple[str | None, str | None]:
    """State-dict keys whose shapes carry num_classes (dim 0 of the final classifier: the last
    ``nn.Linear``, or the last conv where there is none) and in_channels (dim 1 of the first conv)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    head = linears[-1] if linears else (convs[-1][0] if convs else None)
    stem = convs[0][0] if convs and convs[0][1].groups == 1 else None
    return (f"{head}.weight" if head is not None else None), (f"{stem}.weight" if stem is not None else None)


def _probe_sizes(arch: str, num_classes: int | None, in_channels: int | None) -> tuple[int, int]:
    """Sizes to build a first model with before the state dict's shapes are read: the given ones, else the
    factory's defaults (toy models have some), else 10 classes and 3 channels."""
    params = inspect.signature(MODELS.get(arch)).parameters

    def default(name: str, fallback: int) -> int:
        p = params.get(name)
        return p.default if p is not None and isinstance(p.default, int) else fallback

    nc = num_classes if num_classes is not None else default("num_classes", 10)
    ic = in_channels if in_channels is not None else default("in_channels", 3)
    return nc, ic


def _fix_hint(role: str, n: int, what: str) -> str:
    if role.startswith("teacher"):
        return "train a teacher on this data set or pass teacher=<matching checkpoint>"
    return f"pass a checkpoint trained with {n} {what}"


def _count(n: int, field: str) -> str:
    if field == "num_classes":
        return f"{n} class" if n == 1 else f"{n} classes"
    return f"{n} input channel" if n == 1 else f"{n} input channels"


def _check_value(
    role: str,
    source: str,
    subject: str,
    field: str,
    have: int,
    want: int | None,
    data: str | None,
    evidence: str,
) -> None:
    """``subject`` is "is a resnet8 with" (kdtune files name their arch) or "(read as resnet8) has"."""
    if want is None or int(want) == int(have):
        return
    got = _count(have, field) + (f" ({evidence})" if evidence else "")
    need = f"data {data} has {_count(int(want), field)}" if data else f"{field}={want} was asked for"
    noun = "classes" if field == "num_classes" else "input channels"
    raise CheckpointError(
        f"{role} {source} {subject} {got}, but {need} ({field}); {_fix_hint(role, int(want), noun)}"
    )


def check_fit(model: nn.Module, sd: Mapping[str, Any], role: str, source: str, desc: str) -> None:
    """Raise CheckpointError naming the first key of ``model`` that is missing from ``sd`` or mis-shaped,
    else the first key of ``sd`` the model does not have. BN's ``num_batches_tracked`` may be absent."""
    expected = model.state_dict()
    missing, bad = [], []
    for k, v in expected.items():
        if k not in sd:
            if not k.endswith("num_batches_tracked"):
                missing.append(k)
        elif isinstance(v, Tensor) and isinstance(sd[k], Tensor) and v.shape != sd[k].shape:
            bad.append(k)
    unexpected = [k for k in sd if k not in expected]
    if not (missing or bad or unexpected):
        return
    counts = f"{len(bad)} mis-shaped, {len(missing)} missing, {len(unexpected)} unexpected keys"
    first = next((k for k in expected if k in bad or k in missing), None)
    if first is not None and first in bad:
        what = f"{first} is {_shape(sd[first])} in the file but {_shape(expected[first])} in the model"
    elif first is not None:
        what = f"{first} {_shape(expected[first])} is missing from the file"
    else:
        what = f"the file has {unexpected[0]} {_shape(sd[unexpected[0]])}, which the model lacks"
    raise CheckpointError(
        f"{role} {source} does not fit {desc}: {what} ({counts}); pass the architecture the checkpoint "
        "was trained with, or a checkpoint of this one"
    )


def load_model(
    source: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    map_location: Any = "cpu",
    *,
    role: str = "checkpoint",
    data: str | None = None,
) -> tuple[nn.Module, dict]:
    """Build the model a checkpoint holds and load its weights; return ``(model in eval mode, info)``.

    ``arch``/``num_classes``/``in_channels``, when given, must agree with the checkpoint (CheckpointError
    otherwise). ``role`` and ``data`` only word the errors, e.g. ``role="teacher checkpoint",
    data="cifar100"``. The file is read onto the CPU; the model is then moved to ``map_location`` when that
    is a device (string or ``torch.device``). ``info`` holds ``arch``, ``num_classes``, ``in_channels``,
    ``meta`` (``{}`` for foreign checkpoints), ``source``, ``format`` and ``aux_heads`` (the state_dict of the
    model's HSAKD auxiliary heads the file carries, or None; checked against the heads when they are built).
    """
    src = os.fspath(source)
    obj = read_checkpoint(src, map_location="cpu", role=role)
    sd, header, fmt = unwrap(obj, role, src)
    sd, aux_heads = split_aux_heads(obj, sd, header)

    if header is not None:
        file_arch = str(header["arch"])
        nc, ic = int(header["num_classes"]), int(header["in_channels"])
        if arch is not None and arch != file_arch:
            raise CheckpointError(
                f"{role} {src} is a {file_arch} with {nc} classes, but arch={arch} was asked for (arch); "
                f"pass a {arch} checkpoint or set the architecture to {file_arch}"
            )
        subject = f"is a {file_arch} with"
        _check_value(role, src, subject, "num_classes", nc, num_classes, data, "")
        _check_value(role, src, subject, "in_channels", ic, in_channels, data, "")
        if file_arch not in MODELS:
            raise CheckpointError(
                f"{role} {src} holds a {file_arch}, an architecture this kdtune does not know; "
                "upgrade kdtune or pass a checkpoint of a registered model"
            )
        model = create_model(file_arch, num_classes=nc, in_channels=ic)
        meta = header["meta"]
    else:
        if arch is None:
            raise CheckpointError(
                f"{role} {src} is a plain state_dict ({fmt}) that does not name its architecture; "
                "pass arch=<model name> (e.g. arch=resnet32x4)"
            )
        file_arch = arch
        probe_nc, probe_ic = _probe_sizes(arch, num_classes, in_channels)
        model = create_model(arch, num_classes=probe_nc, in_channels=probe_ic)
        head_key, stem_key = _head_and_stem(model)
        nc = int(sd[head_key].shape[0]) if head_key in sd and sd[head_key].dim() >= 1 else probe_nc
        ic = int(sd[stem_key].shape[1]) if stem_key in sd and sd[stem_key].dim() == 4 else probe_ic
        ev_nc = f"{head_key} is {_shape(sd[head_key])}" if head_key in sd else ""
        ev_ic = f"{stem_key} is {_shape(sd[stem_key])}" if stem_key in sd else ""
        subject = f"(read as {arch}) has"
        _check_value(role, src, subject, "num_classes", nc, num_classes, data, ev_nc)
        _check_value(role, src, subject, "in_channels", ic, in_channels, data, ev_ic)
        if (nc, ic) != (probe_nc, probe_ic):
            model = create_model(arch, num_classes=nc, in_channels=ic)
        meta = {}

    desc = f"{file_arch} with {nc} classes and {ic} input channels"
    check_fit(model, sd, role, src, desc)
    own = model.state_dict()
    sd = clean_state_dict(sd)  # a copy, so filling BN counters below leaves the caller's dict alone
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    model.load_state_dict(sd, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    info = {
        "arch": file_arch,
        "num_classes": nc,
        "in_channels": ic,
        "meta": meta,
        "source": src,
        "format": fmt,
        "aux_heads": aux_heads,
    }
    return model, info
