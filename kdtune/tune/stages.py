"""Stages: models a sweep trains once and every trial reuses (a teacher; DiSK's CE-trained student).

A stage is keyed by :func:`kdtune.spec.stage_key` (a hash of ``TrainConfig.identity()``) and cached under
``<storage>/stages/<key>/`` with ``final.pt``, ``result.json``, ``config.yaml`` and a sha256 manifest. It is
built through :func:`kdtune.storage.build_once`: among all drivers (and nodes) that share the storage and need
the same stage at the same time, exactly one trains it while the others wait for it; a reader verifies the
manifest, so a stage killed mid-build or damaged on disk is never used. The stage's ``result.json`` records
what trials need from it, measured once: the model's validation and test accuracy (a teacher) and, for a CE
student, its ``train_error``/``val_error`` as the engine measures them for a warm start (DiSK's budget anchor,
``delta`` centred on it before any trial runs). Trials receive those figures and do not evaluate again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtune.spec import stage_key

STAGE_FILES = ("final.pt", "result.json")


@dataclass
class Stage:
    name: str  # "teacher" | "ce-<student>"
    key: str
    dir: Path
    config: dict
    result: dict
    cached: bool

    @property
    def model_path(self) -> Path:
        return self.dir / "final.pt"

    def summary(self) -> dict[str, Any]:
        r = self.result
        keep = ("test_acc", "val_acc", "best_val_acc", "best_test_acc", "epochs", "train_error", "val_error",
                "train_s", "train_images_per_s", "wall_s", "arch")  # fmt: skip
        return {k: r[k] for k in keep if r.get(k) is not None}

    def teacher_info(self) -> dict[str, Any]:
        """What a trial's Trainer takes as ``teacher_info`` (measured once, here)."""
        r = self.result
        return {"arch": r.get("arch") or self.config.get("model"), "val_acc": r.get("val_acc"),
                "test_acc": r.get("test_acc")}  # fmt: skip

    def init_info(self) -> dict[str, Any]:
        """What a trial's Trainer takes as ``init_info`` (the CE student's errors, measured once, here)."""
        return {"train_error": self.result.get("train_error"), "val_error": self.result.get("val_error")}


def is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in STAGE_FILES)


def train_stage(cfg_dict: dict, out: str, threads: int) -> dict:
    """Train one stage into ``out`` (runs inside a Ray task); returns its result dict without the history.

    Adds ``train_error``/``val_error`` of the final model, measured by the engine's warm-start code (what DiSK
    receives as ``init_error`` when a trial starts from this model).
    """
    import torch

    from kdtune.config import TrainConfig, dumps
    from kdtune.engine import train
    from kdtune.engine.trainer import Trainer
    from kdtune.storage import atomic_write_text

    torch.set_num_threads(max(1, int(threads)))
    cfg = TrainConfig.from_dict({**cfg_dict, "out": out, "overwrite": True})
    result = train(cfg)
    probe = Trainer(cfg.replace(init=str(Path(out) / "final.pt"), out=None, overwrite=False))
    result["train_error"] = probe.init_info["train_error"]
    result["val_error"] = probe.init_info.get("val_error")
    atomic_write_text(Path(out) / "result.json", dumps(result))
    return {k: v for k, v in result.items() if k != "history"}


def ray_task_runner(resources: dict | None) -> Callable[[dict, str, int], dict]:
    """Run :func:`train_stage` as a Ray task with ``resources`` (``num_cpus``, ``num_gpus``)."""
    res = dict(resources or {})

    def run(cfg_dict: dict, out: str, threads: int) -> dict:
        import ray

        task = ray.remote(train_stage).options(num_cpus=res.get("num_cpus", 1), num_gpus=res.get("num_gpus", 0),
                                               max_retries=0)  # fmt: skip
        return ray.get(task.remote(cfg_dict, out, threads))

    return run


def ensure_stage(
    name: str,
    cfg_dict: dict,
    root: Path,
    *,
    resources: dict | None = None,
    log=print,
    runner: Callable[[dict, str, int], dict] | None = None,
) -> Stage:
    """The cached stage for ``cfg_dict``, trained now if missing (as a Ray task with ``resources``, or by
    ``runner(cfg_dict, out_dir, threads)``), once among every process that shares ``root``."""
    from kdtune.config import TrainConfig
    from kdtune.storage import artifact_path, build_once

    cfg = TrainConfig.from_dict(cfg_dict)
    key = stage_key(cfg)
    final = artifact_path(root, key)
    what = f"{cfg.model} ({cfg.method}, {cfg.epochs} epochs on {cfg.data})"
    threads = max(1, int((resources or {}).get("num_cpus", 1)))
    run = runner or ray_task_runner(resources)
    built: list[float] = []

    def build(work: Path) -> None:
        log(f"stage {name}: training {what} -> {final}")
        t0 = time.time()
        run(cfg.to_dict(), str(work), threads)
        built.append(time.time() - t0)

    if not final.exists():
        log(f"stage {name}: {what} is not built yet")
    build_once(root, key, build)
    result = json.loads((final / "result.json").read_text())
    acc = f"test acc {result.get('test_acc', float('nan')):.2f}%"
    if built:
        log(f"stage {name}: done in {built[0]:.0f}s, {acc}")
    else:
        log(f"stage {name}: {what} cached at {final} ({acc})")
    return Stage(name, key, final, cfg.to_dict(), result, cached=not built)
