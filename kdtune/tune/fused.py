"""Fused groups (``budget.fuse: K``): how many members a unit holds, what a fused group may search, and the
member rule that prunes members inside their unit.

A unit of K > 1 members (:mod:`kdtune.tune.protocol`) is one Tune trial and one slot, trained as one fused
:class:`~kdtune.engine.bundle.Bundle` by the one trainable (:mod:`kdtune.tune.trainable`); Tune runs a fused
group's units FIFO and each member is pruned by ASHA's rule applied per member (:class:`MemberPruner`, over the
group's shared rung file ``fuse/<group>/rungs.jsonl``). ``auto`` (:func:`resolve_fuse`) is
:data:`CPU_AUTO_FUSE` on the CPU and the device's memory over :data:`GPU_MEMBER_GIB` on a GPU; an unfusable
method gets 1. Why these numbers, and the checkpoint protocol of a unit: ``docs/fused.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from kdtune.errors import ConfigError
from kdtune.storage import read_jsonl

CPU_AUTO_FUSE = 4
GPU_MEMBER_GIB = 2.0
MAX_AUTO_FUSE = 16



# ---------------------------------------------------------------------------------------------- planning


def resolve_fuse(fuse: int | str, method: str, gpus_per_trial: float, budget: int, gpu_gib: float | None = None) -> int:
    """K for one group: ``fuse`` (int or ``auto``) checked against the method, capped at the group's budget.
    ``gpu_gib``: the device's memory (None: asked of torch when ``gpus_per_trial > 0``)."""
    from kdtune.losses import METHODS

    cls = METHODS.get(method)
    if fuse == "auto":
        if cls.unfusable:
            return 1
        k = CPU_AUTO_FUSE
        if gpus_per_trial > 0:
            gib = gpu_gib if gpu_gib is not None else _gpu_gib()
            if gib is not None:
                k = int(gib * min(1.0, gpus_per_trial) // GPU_MEMBER_GIB)
        k = max(1, min(MAX_AUTO_FUSE, k))
    else:
        k = int(fuse)
        if k > 1 and cls.unfusable:
            raise ConfigError(
                f"budget.fuse={k} cannot fuse method {method}: {cls.unfusable}; use budget.fuse: auto "
                f"({method} then runs one trial per slot) or 1"
            )
    return max(1, min(k, budget))


def _gpu_gib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:  # noqa: BLE001 - no device: the CPU's value
        pass
    return None


def check_fusable(group: str, parameters: dict, method: str, base: dict) -> None:
    """A fused group may search only what members can hold each their own way (FUSABLE_FIELDS, method
    hyperparameters); one line naming the first parameter that is not."""
    from kdtune.engine.bundle import FUSABLE_FIELDS
    from kdtune.losses import METHODS

    hps = METHODS.get(method).hparams
    for name in parameters:
        field_ = name[len("train."):] if name.startswith("train.") else name
        if name in hps and not name.startswith("train."):
            continue
        if field_ not in FUSABLE_FIELDS:
            raise ConfigError(
                f"budget.fuse: group {group} searches {name}, which the members of a bundle must share "
                f"(they may differ only in the method's hyperparameters and {', '.join(FUSABLE_FIELDS)}); "
                "use budget.fuse: 1 or fix it in the space"
            )
    if base.get("compile"):
        raise ConfigError("budget.fuse > 1 cannot be used with train.compile=true; drop one of them")


def units(budget: int, fuse: int) -> int:
    """Tune trials a group of ``budget`` members needs in bundles of ``fuse``."""
    return math.ceil(budget / max(1, fuse))


# ---------------------------------------------------------------------------------------------- member ASHA


def rung_epochs(epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """ASHA's rung milestones below ``epochs`` (Ray's ASHA with one bracket)."""
    out, k = [], 0
    while True:
        r = int(grace_period * reduction_factor**k)
        if r >= epochs:
            return out
        if not out or r > out[-1]:
            out.append(r)
        k += 1


class MemberPruner:
    """ASHA's decision for a member at a rung, against every value the group's members recorded at that rung
    (``fuse/<group>/rungs.jsonl``, appended by all bundles of the group). Idempotent per (member, rung): a
    restarted bundle asking again gets the decision taken against the values recorded before it."""

    def __init__(self, path: Path, rungs: list[int], reduction_factor: float, mode: str):
        self.path = path
        self.rungs = set(rungs)
        self.rf = reduction_factor
        self.mode = mode
        path.parent.mkdir(parents=True, exist_ok=True)

    def _records(self) -> list[dict]:
        return read_jsonl(self.path)

    def prune(self, member: str, epoch: int, value: float | None) -> bool:
        if epoch not in self.rungs or value is None or not math.isfinite(value):
            return False
        before = []
        for rec in self._records():
            if rec.get("rung") != epoch:
                continue
            if rec.get("member") == member:
                break  # recorded already: decide against what came before it
            before.append(float(rec["value"]))
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps({"member": member, "rung": epoch, "value": value, "time": time.time()}) + "\n")
        if not before:
            return False
        import numpy as np

        v = value if self.mode == "max" else -value
        vals = [x if self.mode == "max" else -x for x in before]
        cutoff = float(np.nanpercentile(vals, (1 - 1 / self.rf) * 100))
        return v < cutoff


def member_early_stopping(spec) -> dict:
    """What a fused group's bundles need to prune members (``TrialContext.fuse``): the metric, and the rungs
    of ASHA's rule (none with ``scheduler: none``)."""
    s = spec.scheduler
    rungs = rung_epochs(spec.budget.epochs, s.grace_period, s.reduction_factor) if s.name != "none" else []
    return {"metric": spec.metric, "mode": spec.mode, "rungs": rungs, "reduction_factor": s.reduction_factor}
