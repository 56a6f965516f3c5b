"""Checks of a sweep spec against the world before any work starts: ``preflight(spec)``.

:func:`kdtune.spec.load_spec` checks the spec itself (fields, names, ranges, every method's hyperparameters
and their combinations). :func:`preflight` checks what the spec points at, so that a sweep that cannot
succeed is refused in the driver before Ray starts, instead of failing every trial, each problem in one line.

What it checks, one by one: docs/preflight.md §Preflight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdtune.errors import ConfigError, KdtuneError
from kdtune.names import DATASET_IMAGE_SIZES, DATASET_SHAPES

# Folder data sets take their class count from the folders found, so a checkpoint's is checked when the
# data is read (a subset of ImageNet is legitimate), not here.
FOLDER_DATASETS = ("imagenet", "tiny-imagenet")
SQLITE_MAGIC = b"SQLite format 3\x00"


def preflight(spec) -> None:
    """Raise :class:`ConfigError` (one line per problem) if what ``spec`` points at cannot be used."""
    problems: list[str] = []
    for check in (_teacher_checkpoint, _method_constraints, _data, _storage, _experiment_files):
        try:
            check(spec)
        except KdtuneError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def _teacher_checkpoint(spec) -> None:
    """Each teacher checkpoint loads and fits the data (its classes and channels)."""
    for t in spec.teacher_list():
        if t.checkpoint is None or "://" in t.checkpoint:
            continue  # a teacher stage is trained by the sweep; a URL is fetched when the sweep starts
        from kdtune.models.checkpoint import load_model

        classes, channels = DATASET_SHAPES[spec.data]
        if spec.data in FOLDER_DATASETS:
            classes = None
        role = f"teachers.{t.name} checkpoint" if t.name else "teacher checkpoint"
        load_model(t.checkpoint, arch=t.model, num_classes=classes, in_channels=channels, role=role,
                   data=spec.data)  # fmt: skip


def _method_constraints(spec) -> None:
    if spec.data in FOLDER_DATASETS:
        _index_methods_on_folders(spec)
        return  # the class count is known once the folders are scanned
    import torch

    from kdtune.losses import METHODS
    from kdtune.losses.base import MethodContext
    from kdtune.models import create_model
    from kdtune.tune.spaces import SpaceContext, build_space, load_source

    classes, channels = DATASET_SHAPES[spec.data]
    split: dict = {}  # the training split's size and labels, read once for the methods with needs_indices
    checked: set = set()  # (teacher architecture, student, method): all that a group's checks read of it
    models: dict = {}  # one model per architecture (building one, its random init, is most of the time)
    shapes: dict = {}  # probed stage shapes per (method's needs, student, teacher)
    for g in spec.groups():
        student, method = g.student, g.method
        t = spec.named_teacher(g.teacher)
        teacher_arch = t.model if t is not None else None
        cls = METHODS.get(method)
        what = (teacher_arch if cls.needs_teacher else None, student, method)
        if what in checked:
            continue  # another teacher of the same architecture (CE and MSE teachers): the same checks
        checked.add(what)
        if getattr(cls, "extends_teacher", False):
            raise ConfigError(f"methods.{method} trains a teacher's auxiliary heads, a stage the sweep builds for the "
                              "methods that need it (hsakd), not a method to compare; drop it from methods")  # fmt: skip
        if cls.needs_teacher and teacher_arch is None:
            continue  # a checkpoint without teacher.model: its architecture is checked when it is read
        if cls.needs_indices:
            if spec.download:
                continue  # the data is fetched when the sweep starts; CRD's nce_k is checked by each trial
            if not split:
                from kdtune.data import load_data

                d = load_data(spec.data, root=spec.data_root, download=False, val_fraction=spec.val_fraction,
                              seed=spec.data_seed)  # fmt: skip
                split = {"num_train": len(d.train), "train_targets": d.train.y}
        ms = spec.method(method)
        ctx = SpaceContext(method=method, data=spec.data, student=student,
                           teacher=teacher_arch if cls.needs_teacher else None, epochs=spec.budget.epochs,
                           num_classes=classes)  # fmt: skip
        fn = build_space(method, ctx, ms.space, load_source(method))
        if ms.starts is False:
            points = []
        else:
            points, _ = fn.valid_starts(None if ms.starts is True else list(ms.starts))
        fixed = {k: o.value for k, o in ms.space.items() if o.kind == "fixed"}
        for arch in (student, teacher_arch if cls.needs_teacher else None):
            if arch is not None and arch not in models:
                models[arch] = create_model(arch, num_classes=classes, in_channels=channels)
        s_model, t_model = models[student], models[teacher_arch] if cls.needs_teacher else None
        skey = (cls.needs_student_stages, cls.needs_teacher_stages, student, teacher_arch if t_model else None)
        if not points:  # no starting point left: the configuration the space itself starts from
            points = [{k: v for k, v in fn.record()[0].items() if k in cls.hparams}]
        for point in points:
            try:
                if skey not in shapes:  # a model without stages: its one-line error, named below
                    shapes[skey] = _stage_shapes(cls, s_model, t_model, channels, DATASET_IMAGE_SIZES.get(spec.data))
                hp = cls.resolve({k: v for k, v in {**point, **fixed}.items() if k in cls.hparams})
                mctx = MethodContext(
                    num_classes=classes, epochs=spec.budget.epochs, steps_per_epoch=1, device=torch.device("cpu"),
                    student=s_model, teacher=t_model, student_feat_dim=getattr(s_model, "feat_dim", None),
                    teacher_feat_dim=getattr(t_model, "feat_dim", None) if t_model is not None else None,
                    init_error=0.0 if cls.needs_init else None,  # the CE-student stage measures it
                    train_batches=_no_batches,  # what a method needs to be built; nothing is trained here
                    **shapes[skey],
                    **(split if cls.needs_indices else {}),
                    extra=_teacher_heads(cls, t_model, classes),
                )
                cls(hp, mctx)
            except KdtuneError as e:
                who = f"{student} from teacher {g.teacher}" if g.teacher else student
                raise ConfigError(f"methods.{method} ({who} on {spec.data}): {e}") from None


def _index_methods_on_folders(spec) -> None:
    """A method that reads each sample's index (CRD) on ImageNet, whose folder loader gives none: refused now
    rather than by every trial (Tiny-ImageNet is held in memory and gives indices)."""
    from kdtune.losses import METHODS

    if spec.data != "imagenet":
        return
    for method in dict.fromkeys(g.method for g in spec.groups()):
        if METHODS.get(method).needs_indices:
            raise ConfigError(f"methods.{method}: method={method} needs each sample's index, which the folder "
                              f"loader of 'imagenet' does not give; use an in-memory data set")  # fmt: skip


def _stage_shapes(cls, s_model, t_model, channels: int, size: int | None) -> dict:
    """The stage shapes a stage method is built with (a connector a pair cannot have is refused here, before
    any trial); a model without stages raises its one-line error."""
    import torch

    from kdtune.losses.base import probe_stage_shapes

    out = {}
    cpu = torch.device("cpu")
    if cls.needs_student_stages:
        out["student_stages"] = probe_stage_shapes(s_model, channels, size or 32, cpu)
    if cls.needs_teacher_stages and t_model is not None:
        out["teacher_stages"] = probe_stage_shapes(t_model, channels, size or 32, cpu)
    return out


def _teacher_heads(cls, t_model, classes: int) -> dict:
    """For a method that reads the teacher's HSAKD branches: branches of the teacher's shape (untrained: the sweep
    trains them in its heads stage), so the method is built as a trial builds it; a teacher family without
    branches raises its one-line error."""
    if not getattr(cls, "needs_teacher_heads", False) or t_model is None:
        return {}
    from kdtune.models.aux_heads import build_aux_heads

    return {"teacher_heads": build_aux_heads(t_model, classes)}


def _no_batches():
    return iter(())


def _data(spec) -> None:
    if spec.download or spec.data in FOLDER_DATASETS:
        return
    from kdtune.data import load_data

    load_data(spec.data, root=spec.data_root, download=False, val_fraction=spec.val_fraction,
              seed=spec.data_seed)  # fmt: skip


def _storage(spec) -> None:
    if "://" in spec.storage:
        return
    p = Path(spec.storage)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"storage {p} is a file, not a directory; set storage: to a directory")
    exp = Path(spec.experiment_dir)
    if exp.exists() and not exp.is_dir():
        raise ConfigError(f"experiment {exp} is a file, not a directory; move it away or choose another name:")
    existing = next(q for q in (exp, *exp.parents) if q.exists())
    if not existing.is_dir():
        raise ConfigError(f"storage {p} lies under the file {existing}; set storage: to a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"storage {p}: {existing} is not writable; set storage: to a directory you can write")


def _experiment_files(spec) -> None:
    check_experiment(spec.experiment_dir, mlflow_db=spec.tracking.enabled and not spec.tracking.uri)


def _sqlite_problem(path: Path) -> str | None:
    """SQLite's own check of a database file, opened read-only; None when it is sound."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return None  # locked, or a hot journal a read-only check cannot roll back: not evidence of damage
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        return str(e)
    result = "; ".join(str(r[0]) for r in rows[:3])
    return None if result == "ok" else result


def check_experiment(exp, mlflow_db: bool = True) -> None:
    """Raise ConfigError if an existing experiment directory holds a damaged database, state or saved spec
    (``kdtune resume`` calls it before reading them)."""
    exp = Path(exp)
    if not exp.is_dir():
        return
    fix = "move it away to start the experiment afresh, or restore it from a backup"
    for name in ("optuna.db", "mlflow.db") if mlflow_db else ("optuna.db",):
        f = exp / name
        if f.is_file() and f.stat().st_size > 0:
            with open(f, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
            if head != SQLITE_MAGIC:
                raise ConfigError(f"{f} is not an SQLite database (damaged?); {fix}")
            problem = _sqlite_problem(f)
            if problem:
                raise ConfigError(f"{f} is a damaged SQLite database ({problem}); {fix}")
    state = exp / "state.json"
    if state.is_file():
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(f"{state} is not valid JSON (damaged?); move it away (a resume writes it again from "
                              "the Tune experiment and the trials' folders), or restore it from a backup") from None
    _trial_states(exp)
    _tune_snapshots(exp)
    saved = exp / "spec.yaml"
    if saved.is_file():
        from kdtune.config import load_yaml_mapping

        load_yaml_mapping(saved, "the experiment's saved spec", fix)


def _tune_snapshots(exp: Path) -> None:
    """Refuse a resume whose Tune experiments (``tune/sweep``, ``tune/repeats``) would restore from a damaged
    snapshot: Tune would log the error and silently start the experiment over. The snapshot Tune reads is the
    ``experiment_state-*.json`` with the greatest name. (kdtune writes them through an atomic file system,
    :mod:`kdtune.tune.tunefs`: damage comes from outside.)"""
    for d in sorted(p for p in (exp / "tune").glob("*") if p.is_dir()):
        snaps = sorted(d.glob("experiment_state-*.json"), key=lambda f: f.name)
        if not snaps:
            continue
        try:
            ok = isinstance(json.loads(snaps[-1].read_text(encoding="utf-8")).get("trial_data"), list)
        except (UnicodeDecodeError, ValueError, AttributeError, OSError):
            ok = False
        if not ok:
            older = "the snapshot before it is then used" if len(snaps) > 1 else (
                "with none left, the Tune experiment starts over and its trials train again")  # fmt: skip
            raise ConfigError(f"{snaps[-1]} is a damaged Tune snapshot; restore it from a backup, or move it away "
                              f"({older}), then resume")  # fmt: skip
        gen = sorted(d.glob("search_gen_state-*.json"), key=lambda f: f.name)[-1:]  # the one Tune reads
        for f in [d / "tuner.pkl", *gen]:
            if f.is_file() and not _whole_pickle(f):
                raise ConfigError(f"{f} is damaged (a truncated pickle); restore it from a backup, or move the Tune "
                                  f"experiment {d} away (its trials then train again), then resume")  # fmt: skip


def _whole_pickle(f: Path) -> bool:
    """A pickle read to its STOP opcode without building any object (no import, no code run)."""
    import pickletools

    try:
        with open(f, "rb") as fh:
            for _ in pickletools.genops(fh):
                pass
        return True
    except (ValueError, EOFError, OSError):
        return False


def _trial_states(exp: Path) -> None:
    """Refuse a resume whose unfinished trials hold a damaged training state (``trials/<id>/ckpt/state.pt``,
    written atomically, so damage comes from outside): the trial would fail on it, retry and fail again. A
    torch checkpoint is a zip archive; its CRCs are checked without unpickling. Finished trials (``done.json``)
    never read theirs."""
    import zipfile

    for f in sorted((exp / "trials").glob("*/ckpt/state.pt")):
        trial = f.parent.parent
        if (trial / "done.json").is_file():
            continue
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
            problem = f"member {bad} fails its CRC" if bad else None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            problem = f"{type(e).__name__}: {str(e)[:80]}"
        if problem:
            raise ConfigError(f"{f} is damaged ({problem}); restore it from a backup, or delete it to train "
                              f"trial {trial.name} again from epoch 0, then resume")  # fmt: skip
