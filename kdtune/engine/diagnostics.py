"""Teacher diagnostics from logits: a classifier's calibration, and a student's agreement with its teacher.

- :func:`calibration` (logits ``[N, C]``, labels ``[N]``): ``acc`` (top-1, %), ``nll`` (mean cross-entropy,
  nats), ``ece`` (15 equal-width bins ``(lo, hi]`` of the top-1 confidence, Guo et al. 2017) and ``entropy``
  (mean softmax entropy, nats); computed in float64.
- :func:`agreement` (teacher and student logits on the same examples): ``agree`` (% of equal top-1) and ``kl``
  = mean_i KL(p_t || p_s) at temperature 1 (nats), from float64 ``log_softmax``. :func:`epoch_agreement` names
  them as an epoch records them (:data:`EPOCH_KEYS`).
- :func:`save_val_logits` / :func:`load_val_logits`: a stage's ``val_logits.pt`` (float32 ``[N_val, C]``,
  the labels, checksums of the split and the weights). A reader gets the logits only for the same split and
  the same teacher; otherwise None and the reason.

Free of Ray and MLflow. More: docs/diagnostics.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ECE_BINS = 15
VAL_LOGITS = "val_logits.pt"  # beside a stage's final.pt
VAL_LOGITS_FORMAT = 1
EPOCH_KEYS = ("val_agree", "val_kl_teacher")
STAGE_KEYS = tuple(f"{s}_{k}" for s in ("test", "val") for k in ("nll", "ece", "entropy"))


def calibration(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict[str, float]:
    """Top-1 accuracy (%), NLL, ECE over ``bins`` equal-width confidence bins and mean entropy (nats)."""
    if logits.dim() != 2 or logits.shape[0] == 0 or labels.shape != logits.shape[:1]:
        raise ValueError(f"calibration needs logits [N>0, C] and labels [N]; got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")  # fmt: skip
    z = logits.detach().to(torch.float64)
    y = labels.detach().to(device=z.device, dtype=torch.long)
    logp = F.log_softmax(z, dim=1)
    conf, pred = logp.max(dim=1)
    conf = conf.exp()
    correct = (pred == y).to(torch.float64)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=z.device)
    idx = torch.bucketize(conf, edges[1:-1], right=False)  # bin b holds edges[b] < conf <= edges[b + 1]
    gap = torch.zeros(bins, dtype=torch.float64, device=z.device).scatter_add_(0, idx, correct - conf)
    n = z.shape[0]
    out = torch.stack([
        100.0 * correct.mean(),
        F.nll_loss(logp, y),
        gap.abs().sum() / n,  # sum_b |B_b| / n * |acc(B_b) - conf(B_b)|
        -(logp.exp() * logp).sum(dim=1).mean(),
    ]).tolist()  # fmt: skip
    return dict(zip(("acc", "nll", "ece", "entropy"), out))


def agreement(teacher_logits: Tensor, student_logits: Tensor) -> dict[str, float]:
    """Top-1 agreement (%) of two classifiers on the same examples and KL(teacher || student) (nats, T = 1)."""
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2 or not len(teacher_logits):
        raise ValueError(f"agreement needs two [N>0, C] logits of one shape; got {tuple(teacher_logits.shape)} "
                         f"and {tuple(student_logits.shape)}")  # fmt: skip
    lt = F.log_softmax(teacher_logits.detach().to(torch.float64), dim=1)
    ls = F.log_softmax(student_logits.detach().to(device=lt.device, dtype=torch.float64), dim=1)
    agree = (lt.argmax(dim=1) == ls.argmax(dim=1)).to(torch.float64).mean() * 100.0
    kl = (lt.exp() * (lt - ls)).sum(dim=1).mean()
    a, k = torch.stack([agree, kl]).tolist()
    return {"agree": a, "kl": k}


def epoch_agreement(teacher_logits: Tensor | None, student_logits: Tensor | None) -> dict[str, float] | None:
    """:func:`agreement` under the names an epoch records (:data:`EPOCH_KEYS`); None without both logits."""
    if teacher_logits is None or student_logits is None:
        return None
    a = agreement(teacher_logits, student_logits)
    return {"val_agree": a["agree"], "val_kl_teacher": a["kl"]}


def stage_metrics(split: str, logits: Tensor, labels: Tensor) -> dict[str, float]:
    """``<split>_nll``, ``<split>_ece`` and ``<split>_entropy`` (:data:`STAGE_KEYS`) of a stage's model."""
    c = calibration(logits, labels)
    return {f"{split}_{k}": c[k] for k in ("nll", "ece", "entropy")}


# ---------------------------------------------------------------------------------------------- val_logits.pt


def split_labels(split) -> Tensor:
    """A split's labels in its order: an in-memory ``Split``'s ``y``, or a folder dataset's ``targets``."""
    y = getattr(split, "y", None)
    if y is None:
        y = getattr(split, "targets", None)
        y = y() if callable(y) else y
    return torch.as_tensor(y if y is not None else [], dtype=torch.long).cpu()


def split_sha(split) -> str:
    """sha256 of a split: its images and labels (in memory), or its labels and file names (folder data)."""
    from kdtune.engine.teacher_store import tensors_sha

    x = getattr(split, "x", None)
    if isinstance(x, Tensor):
        return tensors_sha({"x": x, "y": split.y})
    h = hashlib.sha256(tensors_sha({"y": split_labels(split)}).encode())
    for path, _ in getattr(split, "samples", []):
        h.update(os.path.basename(str(path)).encode() + b"\0")
    return h.hexdigest()


def save_val_logits(path: str | os.PathLike, logits: Tensor, labels: Tensor, *, split_sha: str, teacher_sha: str,
                    **meta: Any) -> Path:  # fmt: skip
    """Write ``val_logits.pt`` atomically: float32 logits, int64 labels, the checksums, ``meta`` (plain values)."""
    from kdtune.storage import atomic_write

    obj = {"format": VAL_LOGITS_FORMAT, "logits": logits.detach().to("cpu", torch.float32).contiguous(),
           "labels": labels.detach().to("cpu", torch.long).contiguous(), "split_sha": split_sha,
           "teacher_sha": teacher_sha, **meta}  # fmt: skip
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return path


def load_val_logits(path: str | os.PathLike, *, labels: Tensor, split_sha: str, teacher_sha: str,
                    num_classes: int) -> tuple[Tensor | None, str | None]:  # fmt: skip
    """``(logits, None)`` when ``path`` holds the logits of this teacher (``teacher_sha``) on this split (its
    labels, ``split_sha``, ``num_classes``), else ``(None, why)``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is not used
        return None, f"it cannot be read ({type(e).__name__})"
    if not isinstance(obj, dict) or obj.get("format") != VAL_LOGITS_FORMAT:
        return None, "it is not a kdtune val_logits file of this version"
    z, y = obj.get("logits"), obj.get("labels")
    n = int(labels.shape[0])
    if not isinstance(z, Tensor) or not isinstance(y, Tensor) or tuple(z.shape) != (n, num_classes):
        shape = tuple(z.shape) if isinstance(z, Tensor) else None
        return None, f"it holds logits of shape {shape}, not ({n}, {num_classes})"
    if not torch.equal(y, labels.to("cpu", torch.long)) or obj.get("split_sha") != split_sha:
        return None, "its validation split is not this run's (labels or checksum differ)"
    if obj.get("teacher_sha") != teacher_sha:
        return None, "it was made by other teacher weights"
    return z.to(torch.float32), None
