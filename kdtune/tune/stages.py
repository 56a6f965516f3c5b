"""Stages: models a sweep trains once and every trial reuses (a teacher; DiSK's CE-trained student).

A stage is keyed by :func:`kdtune.spec.stage_key` (a hash of ``TrainConfig.identity()``) and cached under
``<storage>/stages/<key>/`` with ``final.pt``, ``result.json``, ``config.yaml`` and a sha256 manifest. It is
built through :func:`kdtune.storage.build_once`: among all drivers (and nodes) that share the storage and need
the same stage at the same time, exactly one trains it while the others wait for it; a reader verifies the
manifest, so a stage killed mid-build or damaged on disk is never used. The stage's ``result.json`` records
what trials need from it, measured once: the model's validation and test accuracy (a teacher) and, for a CE
student, its ``train_error``/``val_error`` as the engine measures them for a warm start (DiSK's budget anchor,
``delta`` centred on it before any trial runs). Trials receive those figures and do not evaluate again. A stage
of a teacher objective (ce, ls, mse) or of HSAKD's heads also records its final model's calibration on the test
and validation splits (:data:`kdtune.engine.diagnostics.STAGE_KEYS`) and writes its validation logits to
``val_logits.pt`` (in the manifest), which every trial reads instead of running the teacher over that split.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtune.spec import stage_key

STAGE_FILES = ("final.pt", "result.json")  # and val_logits.pt where the stage has a validation split
# the calibration figures of a teacher's stage (kdtune.engine.diagnostics.STAGE_KEYS, not imported: no torch here)
DIAGNOSTIC_KEYS = ("test_nll", "test_ece", "test_entropy", "val_nll", "val_ece", "val_entropy")


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
                "train_s", "train_images_per_s", "wall_s", "arch", *DIAGNOSTIC_KEYS)  # fmt: skip
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
    receives as ``init_error`` when a trial starts from this model). A teacher objective's stage (ce, ls, mse)
    and the HSAKD heads stage (``extends_teacher``: its final.pt holds the teacher's weights, unchanged) add the
    final model's calibration (:func:`teacher_diagnostics`) and write ``val_logits.pt`` into ``out``.
    """
    import torch

    from kdtune.config import TrainConfig, dumps
    from kdtune.data import load_data
    from kdtune.engine import train
    from kdtune.engine.trainer import Trainer, load_init_model
    from kdtune.losses import METHODS
    from kdtune.spec_model import TEACHER_METHODS
    from kdtune.storage import atomic_write_text

    torch.set_num_threads(max(1, int(threads)))
    cfg = TrainConfig.from_dict({**cfg_dict, "out": out, "overwrite": True})
    data = load_data(cfg.data, root=cfg.data_root, download=cfg.download, val_fraction=cfg.val_fraction,
                     seed=cfg.data_seed)  # fmt: skip
    result = train(cfg, data=data)
    final = str(Path(out) / "final.pt")
    heads = getattr(METHODS.get(cfg.method), "extends_teacher", False)
    if heads:  # a teacher with new heads: no student to probe; its network is the teacher's, unchanged
        probe = Trainer(cfg.replace(method="ce", hp={}, teacher=None, out=None, overwrite=False), data=data)
        probe.student.load_state_dict(load_init_model(probe.cfg.replace(init=final), data)[0].state_dict())
    else:
        probe = Trainer(cfg.replace(init=final, out=None, overwrite=False), data=data)
        result["train_error"] = probe.init_info["train_error"]
        result["val_error"] = probe.init_info.get("val_error")
    if heads or cfg.method in TEACHER_METHODS:
        result.update(teacher_diagnostics(probe, Path(out)))
    atomic_write_text(Path(out) / "result.json", dumps(result))
    return {k: v for k, v in result.items() if k != "history"}


def teacher_diagnostics(probe, out: Path) -> dict[str, float]:
    """The calibration of ``probe.student`` (a Trainer holding a stage's final model) on the test and validation
    splits: ``test_nll``, ``test_ece``, ``test_entropy`` and ``val_*`` likewise (:data:`DIAGNOSTIC_KEYS`;
    accuracy is the stage's ``test_acc``/``val_acc``), and its validation logits written to
    ``out/val_logits.pt`` with the split's labels and checksums (:func:`kdtune.engine.diagnostics.
    save_val_logits`). No validation split: the test figures only, no file."""
    from kdtune.engine import diagnostics as dg
    from kdtune.engine.teacher_store import weights_sha

    model, data = probe.student, probe.data
    test = probe.evaluate(model, probe.test_loader, keep_logits=True)
    found = dg.stage_metrics("test", test["logits"], test["labels"])
    if probe.val_loader is not None:
        val = probe.evaluate(model, probe.val_loader, keep_logits=True)
        found.update(dg.stage_metrics("val", val["logits"], val["labels"]))
        dg.save_val_logits(out / dg.VAL_LOGITS, val["logits"], val["labels"], split_sha=dg.split_sha(data.val),
                           teacher_sha=weights_sha(model), data=data.name, arch=probe.cfg.model,
                           val_fraction=probe.cfg.val_fraction, data_seed=probe.cfg.data_seed, amp=str(probe.amp_dtype),
                           device=str(probe.device))  # fmt: skip
    return found


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
    key: str | None = None,
) -> Stage:
    """The cached stage for ``cfg_dict``, trained now if missing (as a Ray task with ``resources``, or by
    ``runner(cfg_dict, out_dir, threads)``), once among every process that shares ``root``. ``key``: the
    stage's folder name (default :func:`kdtune.spec.stage_key` of the config)."""
    from kdtune.config import TrainConfig
    from kdtune.storage import artifact_path, build_once

    cfg = TrainConfig.from_dict(cfg_dict)
    key = key or stage_key(cfg)
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


# ---------------------------------------------------------------------------------------------- HSAKD heads

HEADS_STAGE = "hsakd-heads"
# What the heads stage takes over from its teacher's stage: the data, the seed and how it runs; the optimisation
# is HSAKD's own (preset hsakd_heads), never the teacher's.
HEADS_INHERITED = ("data", "data_root", "download", "val_fraction", "data_seed", "augment", "seed", "device",
                   "amp", "channels_last", "compile", "num_workers", "eval_batch_size")  # fmt: skip


def heads_stage_config(teacher, *, epochs: int | None = None, overrides: dict | None = None) -> dict:
    """The TrainConfig dict of the HSAKD heads stage on ``teacher`` (a :class:`Stage`, or anything with its
    ``config`` dict and ``model_path``: the plan's ``StagePlan``): ``method=hsakd_heads`` on the teacher's
    architecture and final.pt, with the data, seed and execution fields of the teacher's config and HSAKD's heads
    recipe (``preset=hsakd_heads``: SGD Nesterov 0.9, wd 5e-4, lr 0.05, batch 64, x0.1 at 30/60/90 % of the
    epochs). ``epochs`` defaults to the teacher stage's (the sweep's configured length; the official run is 100
    epochs against the teacher's 240); ``overrides`` sets any other field (e.g. ``batch_size``)."""
    base = {k: teacher.config[k] for k in HEADS_INHERITED if k in teacher.config}
    n = int(epochs if epochs is not None else teacher.config.get("epochs") or 100)
    return {**base, "model": teacher.config["model"], "method": "hsakd_heads", "teacher": str(teacher.model_path),
            "preset": "hsakd_heads", "epochs": n, **(overrides or {})}  # fmt: skip


def heads_stage_key(teacher_key: str, cfg_dict: dict) -> str:
    """``<teacher key>-hsakd-heads-<16 hex of the heads config>``: the heads stage's folder names its teacher's
    stage, and a new teacher (or another heads recipe) is another folder. The hash reads the teacher as its key,
    not its path, so a storage moved elsewhere keeps its keys."""
    from kdtune.config import TrainConfig

    ident = TrainConfig.from_dict(cfg_dict).identity()
    ident["teacher"] = f"stage:{teacher_key}"
    return f"{teacher_key}-{HEADS_STAGE}-{stage_key(ident)}"


@dataclass(frozen=True)
class TeacherRef:
    """What the heads stage needs of its teacher: a key, the config it inherits from and the checkpoint."""

    key: str
    config: dict
    model_path: Path


def checkpoint_teacher(path: str | Path, config: dict) -> TeacherRef:
    """A teacher given as a checkpoint (a spec's ``teacher: {checkpoint: ...}``) as the heads stage's teacher:
    keyed by the sha256 of the file's bytes (``ckpt`` and 16 hex), ``config`` the data and execution fields the
    heads stage inherits plus ``model`` (the teacher's architecture) and ``epochs``."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return TeacherRef(f"ckpt{h.hexdigest()[:16]}", dict(config), Path(path))


def ensure_heads_stage(
    teacher: Stage | TeacherRef,
    root: Path,
    *,
    epochs: int | None = None,
    overrides: dict | None = None,
    resources: dict | None = None,
    log=print,
    runner: Callable[[dict, str, int], dict] | None = None,
) -> Stage:
    """The HSAKD heads stage of ``teacher`` (the sweep's ``"teacher"`` :class:`Stage`, or
    :func:`checkpoint_teacher` of a checkpoint): its auxiliary branches trained on the frozen teacher, built once
    (``storage.build_once``, as every stage) and cached under ``root/<heads_stage_key>``. Its ``final.pt`` holds
    the teacher's weights, unchanged, and the branches, so it is the ``teacher=`` of every ``method=hsakd``
    trial. A second call with the same teacher and recipe returns the cached stage (``cached=True``).

    How the sweep driver uses it (``kdtune/tune/driver.py``, ``Driver.build_stages`` / ``contexts``; formerly
    ``runner.py``'s ``_build_stages``): once the teacher stage is built, if a group's method declares
    ``needs_teacher_heads`` (hsakd)::

        heads = built[HEADS_STAGE] = ensure_heads_stage(built["teacher"], self.spec.stages_dir,
                                                       resources=res, log=self.log)

    (recorded like the other stages: state.json, MLflow ``log_stage``), and that group's trials take
    ``teacher=str(heads.model_path)`` instead of the teacher's final.pt, with ``teacher_info=heads.teacher_info()``
    (the same teacher, its accuracy measured by the heads run). Alternatively the plan names the stage up front,
    since its key depends only on the teacher stage's key and config: ``cfg = heads_stage_config(teacher_plan)``,
    ``key = heads_stage_key(teacher_plan.key, cfg)``, a ``StagePlan(HEADS_STAGE, cfg, key, stages_dir / key)``
    after the teacher's, the hsakd groups' ``base["teacher"]`` its ``final.pt`` and ``HEADS_STAGE`` in their
    ``stages``; then ``build_stages`` must pass ``key=sp.key`` to :func:`ensure_stage`."""
    cfg = heads_stage_config(teacher, epochs=epochs, overrides=overrides)
    return ensure_stage(HEADS_STAGE, cfg, root, resources=resources, log=log, runner=runner,
                        key=heads_stage_key(teacher.key, cfg))  # fmt: skip
