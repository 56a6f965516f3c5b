"""One engine interface for K ≥ 1 runs trained together: :func:`open_unit` gives a :class:`Bundle` for K > 1
and a :class:`LoneRun` (a :class:`Trainer` behind the bundle's member interface) for K = 1.

The interface (what the sweep's trainable uses): ``keys``, ``size``, ``epoch``, ``device``, ``data``, ``mode``,
``exact``; ``run()`` yields per epoch one metrics dict per member (with ``member``; a member whose loss became
NaN or infinite yields ``{"member", "epoch", "diverged": True, "error"}`` and leaves the unit);
``history(key)``, ``student(key)``, ``member_state(key)``, ``load_member_state(key, state)``,
``save_model(key, path)``, ``drop(key)``. A lone run is the plain Trainer, bit for bit: nothing is added to its
computation.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kdtune.config import TrainConfig
from kdtune.engine.bundle import Bundle
from kdtune.engine.trainer import DivergedError, Trainer


class LoneRun:
    """A Trainer as a unit of one member."""

    mode = "lone"
    exact = True
    mode_exact: dict[str, bool] = {}
    mode_timings: dict[str, float] = {}

    def __init__(self, cfg: TrainConfig, data=None, key: Hashable = 0, **kwargs):
        self.trainer = Trainer(cfg, data=data, **kwargs)
        self.keys: list[Hashable] = [key]
        self.epochs = cfg.epochs

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def epoch(self) -> int:
        return self.trainer.epoch

    @property
    def device(self):
        return self.trainer.device

    @property
    def data(self):
        return self.trainer.data

    def run(self) -> Iterator[list[dict[str, Any]]]:
        key = self.keys[0]
        try:
            for m in self.trainer.run():
                yield [{**m, "member": key, "bundle_size": 1}]
        except DivergedError as e:
            self.keys = []
            yield [{"member": key, "epoch": self.trainer.epoch, "diverged": True, "error": str(e)}]

    def history(self, key: Hashable) -> list[dict[str, Any]]:
        return self.trainer.history

    def student(self, key: Hashable):
        return self.trainer.student

    def member_state(self, key: Hashable) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_member_state(self, key: Hashable, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)

    def save_model(self, key: Hashable, path: str | Path, durable: bool = True) -> None:
        self.trainer.save_model(path, durable=durable)

    def drop(self, key: Hashable) -> None:
        self.keys = [k for k in self.keys if k != key]


def open_unit(cfgs: Sequence[TrainConfig], data=None, keys: Sequence[Hashable] | None = None, **kwargs):
    """A unit training ``cfgs`` (one per member, keyed by ``keys``): a LoneRun for one, a fused Bundle for more."""
    keys = list(range(len(cfgs))) if keys is None else list(keys)
    if len(cfgs) == 1:
        return LoneRun(cfgs[0], data=data, key=keys[0], **kwargs)
    return Bundle(cfgs, data=data, keys=keys, **kwargs)
