"""Stages: models a sweep trains once and every trial reuses (a teacher; DiSK's CE-trained student).

A stage is keyed by :func:`kdtune.spec.stage_key` (a hash of ``TrainConfig.identity()``) and cached under
``<storage>/stages/<key>/`` with ``final.pt``, ``result.json`` and ``config.yaml``: any later sweep with the
same definition reuses it. Training happens in a temporary folder beside it that is renamed into place when
complete, so a driver killed mid-stage never leaves a folder that looks finished. The CE student's
``result.json`` also records its ``train_error``, measured as the engine measures it for a warm start
(DiSK's budget anchor), so the DiSK space can centre ``delta`` on it before any trial runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtune.spec import stage_key
from kdtune.tune.lock import pid_alive

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
                "train_s", "train_images_per_s", "wall_s")  # fmt: skip
        return {k: r[k] for k in keep if r.get(k) is not None}


def is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in STAGE_FILES)


def _clean_stale(root: Path, key: str) -> None:
    host = socket.gethostname()
    for d in root.glob(f".tmp-{key}-*"):
        parts = d.name.split("-")
        try:
            pid, h = int(parts[-1]), "-".join(parts[2:-1])
        except (ValueError, IndexError):
            continue
        if h == host and not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def train_stage(cfg_dict: dict, out: str, threads: int) -> dict:
    """Train one stage into ``out`` (runs inside a Ray task); returns its result dict without the history.

    Adds ``train_error``/``val_error`` of the final model, measured by the engine's warm-start code (what DiSK
    receives as ``init_error`` when a trial starts from this model).
    """
    import torch

    from kdtune.config import TrainConfig, dumps
    from kdtune.engine import train
    from kdtune.engine.trainer import Trainer

    torch.set_num_threads(max(1, int(threads)))
    cfg = TrainConfig.from_dict({**cfg_dict, "out": out, "overwrite": True})
    result = train(cfg)
    probe = Trainer(cfg.replace(init=str(Path(out) / "final.pt"), out=None, overwrite=False))
    result["train_error"] = probe.init_info["train_error"]
    result["val_error"] = probe.init_info.get("val_error")
    tmp = Path(out) / ".result.json.tmp"
    tmp.write_text(dumps(result))
    tmp.replace(Path(out) / "result.json")
    return {k: v for k, v in result.items() if k != "history"}


def ensure_stage(
    name: str,
    cfg_dict: dict,
    root: Path,
    *,
    resources: dict | None = None,
    log=print,
) -> Stage:
    """The cached stage for ``cfg_dict``, trained now (as a Ray task with ``resources``) if missing."""
    from kdtune.config import TrainConfig

    cfg = TrainConfig.from_dict(cfg_dict)
    key = stage_key(cfg)
    root = Path(root)
    final = root / key
    what = f"{cfg.model} ({cfg.method}, {cfg.epochs} epochs on {cfg.data})"
    if is_complete(final):
        result = json.loads((final / "result.json").read_text())
        log(f"stage {name}: {what} cached at {final} (test acc {result.get('test_acc', float('nan')):.2f}%)")
        return Stage(name, key, final, cfg.to_dict(), result, cached=True)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, key)
    tmp = root / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"stage {name}: training {what} -> {final}")
    t0 = time.time()
    res = dict(resources or {})
    threads = max(1, int(res.get("num_cpus", 1)))
    import ray

    task = ray.remote(train_stage).options(num_cpus=res.get("num_cpus", 1), num_gpus=res.get("num_gpus", 0),
                                           max_retries=0)  # fmt: skip
    try:
        ray.get(task.remote(cfg.to_dict(), str(tmp), threads))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() and not is_complete(final):
        shutil.rmtree(final, ignore_errors=True)  # not ours and not finished: no sweep can use it
    try:
        tmp.rename(final)
    except OSError:  # another sweep finished the same stage first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    result = json.loads((final / "result.json").read_text())
    log(
        f"stage {name}: done in {time.time() - t0:.0f}s, test acc {result.get('test_acc', float('nan')):.2f}%"
    )
    return Stage(name, key, final, cfg.to_dict(), result, cached=False)
