"""The sweep spec: one YAML file that describes a whole sweep, validated before anything starts.

A spec names the data set, the teacher (a checkpoint, or a teacher stage to train once), the students, the
methods (each with an optional narrowing or widening of its search space), the budget, the scheduler, the
metric, the storage path and the MLflow tracking URI. :func:`load_spec` reads and validates it into a frozen
:class:`SweepSpec`; every problem raises :class:`~kdtune.errors.ConfigError` naming the field (``budget.trials``,
``methods.dkd.space.beta``, ...) before Ray is started. :func:`stage_key` hashes the identity of a stage (a
teacher or the CE-trained student) so that it is trained once and shared by every sweep that needs it.

The spec's fields, defaults and bounds are declared once, in :mod:`kdtune.spec_model` (whose frozen objects are
re-exported here); this module is the loader: it reads each field with its declared default and bounds
(:func:`kdtune.spec_schema.read_field`) and checks what a field's declaration cannot say: the shorthand forms,
registered names, cross-field rules, method spaces and the TrainConfig fields under ``train:``.

More: docs/spec.md §Spec.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdtune.errors import ConfigError, did_you_mean
from kdtune.spec_model import (  # noqa: F401 - the spec's objects and constants, imported from here by kdtune
    MAX_EPOCHS,
    MAX_FUSE,
    MAX_TRIALS,
    METRIC_MODES,
    NAME_PATTERN,
    ON_RESUME,
    RANGE_KEYS,
    SCHEDULERS,
    SWEEP_OWNED,
    TEACHER_METHODS,
    TEACHER_NAME_PATTERN,
    Budget,
    FailureSpec,
    FuseCount,
    Group,
    MethodSpec,
    Override,
    SchedulerSpec,
    SweepSpec,
    TeacherSpec,
    TrackingSpec,
    default_grace_period,
    default_of,
    fields_of,
)
from kdtune.spec_schema import (
    bounds,
    check_trial_configs,
    in_bounds,
    parse_override,
    range_text,
    read_field,
    train_fields,
)

_NAME_RE = re.compile(NAME_PATTERN)
_TEACHER_RE = re.compile(TEACHER_NAME_PATTERN)


# ---------------------------------------------------------------------------------------------- loading


def load_spec(path_or_dict: str | Path | dict, *, base_dir: str | Path | None = None) -> SweepSpec:
    """Read a spec (a YAML path or a dict) and validate it; raise ConfigError naming the first bad field.

    Relative ``storage`` paths are made absolute against the current directory (where ``kdtune sweep``
    runs), relative teacher checkpoints against ``base_dir`` (the spec file's directory) when they exist
    there, else the current directory.
    """
    source = None
    if isinstance(path_or_dict, dict):
        raw = dict(path_or_dict)
    else:
        from kdtune.config import load_yaml_mapping

        p = Path(path_or_dict)
        raw = load_yaml_mapping(p, "sweep spec", "check the path (examples in sweeps/)")
        raw.setdefault("name", p.stem)
        source = str(p.resolve())
        base_dir = base_dir or p.resolve().parent
    return _parse(raw, source=source, base_dir=Path(base_dir) if base_dir else None)


def _parse(raw: dict, source: str | None, base_dir: Path | None) -> SweepSpec:
    from kdtune.config import TrainConfig  # no torch: names are checked by kdtune.names, so the sections
    # before `methods` are refused at once; the methods (and torch) are imported for their hyperparameters

    _no_unknown("", raw, _keys(SweepSpec) - {"source"})

    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"name={name!r} is not a valid experiment name; use letters, digits, '.', '_' or '-' (it names a folder)"
        )
    data = read_field("", raw, "data")
    _lookup("data", data, "data set")
    val_fraction, data_seed, seed = (read_field("", raw, k) for k in ("val_fraction", "data_seed", "seed"))

    students = raw.get("students")
    if isinstance(students, str):
        students = [students]
    if not isinstance(students, list) or not students:
        raise ConfigError("students must be a non-empty list of model names, e.g. students: [resnet8x4]")
    for i, s in enumerate(students):
        _lookup(f"students[{i}]", s, "model")
    if len(set(students)) != len(students):
        raise ConfigError(f"students lists a model twice ({students}); list each once")

    budget = _budget(raw.get("budget") or {})
    scheduler = _scheduler(raw.get("scheduler"), budget)
    metric = read_field("", raw, "metric")
    if metric.startswith("test"):
        raise ConfigError(
            f"metric={metric} would select hyperparameters on the test split; use {default_of(SweepSpec, 'metric')} "
            f"(the default) or one of {', '.join(METRIC_MODES)}"
        )
    if metric not in METRIC_MODES:
        raise ConfigError(f"metric={metric!r} is not valid{did_you_mean(metric, METRIC_MODES)}; choose one of "
                          f"{', '.join(METRIC_MODES)}")  # fmt: skip
    mode = read_field("", raw, "mode") or METRIC_MODES[metric]  # null: the metric's
    if mode not in ("max", "min"):
        raise ConfigError(f"mode={mode!r} is not valid; choose max or min")
    if metric.startswith(("val", "best_val")) and val_fraction <= 0:
        raise ConfigError(
            f"metric={metric} needs a validation split but val_fraction=0; set val_fraction: "
            f"{default_of(SweepSpec, 'val_fraction'):g}"
        )

    train = train_fields("train", raw.get("train") or {}, TrainConfig)
    ce_student = train_fields("ce_student", raw.get("ce_student") or {}, TrainConfig)
    teachers = _teachers(raw.get("teachers"), TrainConfig, base_dir)  # before the methods (and torch): fast refusals
    if raw.get("teacher") is not None and teachers:
        raise ConfigError("the spec has both teacher and teachers; keep teachers (a list of named teachers) or "
                          "teacher (one), not both")  # fmt: skip
    for t in teachers:
        other = next((x for x in t.students or () if x not in students), None)
        if other is not None:
            raise ConfigError(f"teachers.{t.name}.students lists {other}, which is not in students ({', '.join(students)})"
                              f"; add it to students or drop it there")  # fmt: skip
    from kdtune.losses import METHODS

    methods = _methods(raw.get("methods"), METHODS, TrainConfig)
    teacher = _teacher(raw.get("teacher"), TrainConfig, base_dir)
    if teachers and all(METHODS.get(m.name).needs_teacher for m in methods):
        untaught = next((x for x in students if not any(t.students is None or x in t.students for t in teachers)), None)
        if untaught is not None:
            raise ConfigError(f"students lists {untaught}, but no teacher teaches it (each of teachers names its "
                              f"students); add {untaught} to a teacher's students or drop it from students")  # fmt: skip
    needs_teacher = [m.name for m in methods if METHODS.get(m.name).needs_teacher]
    if needs_teacher and teacher is None and not teachers:
        raise ConfigError(
            f"teacher is missing but method {needs_teacher[0]} needs one; add teacher: {{model: resnet32x4}} "
            "(a teacher stage trained once) or teacher: {checkpoint: path/to/teacher.pt}"
        )

    storage = raw.get("storage") or default_of(SweepSpec, "storage")
    if not isinstance(storage, str):
        raise ConfigError(f"storage={storage!r} must be a path")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().absolute())
    tracking = _tracking(raw.get("tracking"))
    failures = _failures(raw.get("failures"))

    spec = _build(
        SweepSpec, "", name=name, data=data, students=tuple(students), methods=tuple(methods), teacher=teacher,
        teachers=teachers or None, data_root=read_field("", raw, "data_root"), download=read_field("", raw, "download"),
        val_fraction=val_fraction, data_seed=data_seed, budget=budget, scheduler=scheduler, metric=metric, mode=mode,
        train=train, ce_student=ce_student, storage=storage, tracking=tracking, failures=failures, seed=seed,
        source=source,
    )  # fmt: skip
    check_trial_configs(spec, TrainConfig)
    return spec


# ---------------------------------------------------------------------------------------------- sections


def _budget(raw: Any) -> Budget:
    if not isinstance(raw, dict):
        raise ConfigError("budget must be a mapping, e.g. budget: {trials: 8, epochs: 30, concurrency: 2}")
    _no_unknown("budget.", raw, _keys(Budget))
    values = {k: _fuse(raw) if k == "fuse" else read_field("budget.", raw, k) for k in fields_of(Budget)}
    return _build(Budget, "budget.", **values)


def _fuse(raw: dict) -> int | str:
    """budget.fuse: an integer in its declared bounds (members per fused bundle), or 'auto'."""
    v = raw.get("fuse", default_of(Budget, "fuse"))
    if v == "auto":
        return v
    b = bounds(fields_of(Budget)["fuse"])
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ConfigError(f"budget.fuse={v!r} must be an integer {range_text(b)} (members per fused bundle) or 'auto'")
    if not in_bounds(int(v), b):
        raise ConfigError(f"budget.fuse={int(v)} is out of range; it must be {range_text(b)} or 'auto'")
    return int(v)


def _scheduler(raw: Any, budget: Budget) -> SchedulerSpec:
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError("scheduler must be a name (asha, none, hyperband) or a mapping {name: asha, ...}")
    _no_unknown("scheduler.", raw, _keys(SchedulerSpec))
    name = str(raw.get("name", default_of(SchedulerSpec, "name"))).lower()
    if name in ("fifo", "null", "None"):
        name = "none"
    if name not in SCHEDULERS:
        raise ConfigError(
            f"scheduler.name={name!r} is not valid{did_you_mean(name, SCHEDULERS)}; choose one of {', '.join(SCHEDULERS)}"
        )
    grace = read_field("scheduler.", raw, "grace_period", hi=budget.epochs)  # at most the epochs
    if grace is None:
        grace = default_grace_period(budget.epochs)
    rf = read_field("scheduler.", raw, "reduction_factor")
    return _build(SchedulerSpec, "scheduler.", name=name, grace_period=grace, reduction_factor=rf)


def _tracking(raw: Any) -> TrackingSpec:
    if raw is None:
        return TrackingSpec()
    if isinstance(raw, bool):
        return TrackingSpec(enabled=raw)
    if isinstance(raw, str):
        raw = {"uri": raw}
    if not isinstance(raw, dict):
        raise ConfigError("tracking must be a mapping {enabled: true, uri: sqlite:///...|http://host:5000}")
    _no_unknown("tracking.", raw, _keys(TrackingSpec))
    uri = raw.get("uri")
    if uri is not None and not isinstance(uri, str):
        raise ConfigError(f"tracking.uri={uri!r} must be a URI string or null (embedded SQLite)")
    if uri:
        from kdtune.tracking.uri import normalize_tracking_uri

        uri = normalize_tracking_uri(uri)
    return _build(TrackingSpec, "tracking.", enabled=read_field("tracking.", raw, "enabled"), uri=uri or None,
                  optuna=read_field("tracking.", raw, "optuna") or None, models=read_field("tracking.", raw, "models"))


def _failures(raw: Any) -> FailureSpec:
    if raw is None:
        return FailureSpec()
    if not isinstance(raw, dict):
        raise ConfigError("failures must be a mapping {max_failures: 1, on_resume: resume}")
    _no_unknown("failures.", raw, _keys(FailureSpec))
    on_resume = str(raw.get("on_resume", default_of(FailureSpec, "on_resume")))
    if on_resume not in ON_RESUME:
        raise ConfigError(
            f"failures.on_resume={on_resume!r} is not valid{did_you_mean(on_resume, ON_RESUME)}; choose one of "
            f"{', '.join(ON_RESUME)}"
        )
    max_failures = read_field("failures.", raw, "max_failures")
    return _build(FailureSpec, "failures.", max_failures=max_failures, on_resume=on_resume)


def _teachers(raw: Any, TrainConfig, base_dir: Path | None) -> tuple[TeacherSpec, ...]:
    """``teachers:``: a list of named teachers (a mapping each, with ``name``), names unique."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError("teachers must be a non-empty list of named teachers, e.g. teachers: [{name: ce, model: "
                          "resnet20, method: ce}, {name: mse, model: resnet20, method: mse}]")  # fmt: skip
    out: list[TeacherSpec] = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or not r.get("name"):
            raise ConfigError(f"teachers[{i}] needs a name, e.g. {{name: mse, model: resnet20, method: mse}} (a stage) "
                              "or {name: ce, checkpoint: path/to/teacher.pt}")  # fmt: skip
        name = str(r["name"])
        r = {**r, "name": name}
        if not _TEACHER_RE.fullmatch(name):
            raise ConfigError(f"teachers[{i}].name={name!r} is not a valid teacher name; use up to 24 letters, digits "
                              "or '_' (it is part of group and stage names)")  # fmt: skip
        t = _teacher(r, TrainConfig, base_dir, where=f"teachers.{name}.")
        same = next((o for o in out if o.name == name), None)
        if same is not None:
            raise ConfigError(f"teachers: two teachers are named {name!r}; give each teacher its own name")
        twin = next((o for o in out if o.checkpoint is not None and o.checkpoint == t.checkpoint), None)
        if twin is not None:
            raise ConfigError(f"teachers.{name}: the same checkpoint as teachers.{twin.name} ({t.checkpoint}); "
                              "list each teacher once")  # fmt: skip
        out.append(t)
    return tuple(out)


def _teacher(raw: Any, TrainConfig, base_dir: Path | None, where: str = "teacher.") -> TeacherSpec | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"checkpoint": raw}
    if not isinstance(raw, dict):
        raise ConfigError("teacher must be a checkpoint path or a mapping {model: resnet32x4, train: {...}}")
    _no_unknown(where, raw, _keys(TeacherSpec) - ({"name", "students"} if where == "teacher." else set()))
    model = read_field(where, raw, "model")
    if model is not None:
        _lookup(f"{where}model", model, "model")
    ckpt = read_field(where, raw, "checkpoint")
    if ckpt is None and model is None:
        raise ConfigError(
            f"{where[:-1]} needs a model (a teacher stage to train) or a checkpoint; add {where}model"
        )
    if ckpt is not None:
        if "://" not in ckpt:
            p = Path(ckpt).expanduser()
            if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
                p = base_dir / p
            if not p.exists():
                raise ConfigError(
                    f"{where}checkpoint={ckpt} does not exist; check the path, or drop it and set {where}model "
                    "to train a teacher stage"
                )
            ckpt = str(p.resolve())
        for k in ("method", "hp", "train"):
            if raw.get(k):
                raise ConfigError(
                    f"{where}{k} applies to a teacher stage, not a checkpoint; drop {where}{k}"
                )
    method = str(raw.get("method", default_of(TeacherSpec, "method")))
    if method not in TEACHER_METHODS:
        raise ConfigError(
            f"{where}method={method!r} is not a teacher objective{did_you_mean(method, TEACHER_METHODS)}; "
            f"choose one of {', '.join(TEACHER_METHODS)}"
        )
    hp = raw.get("hp") or {}
    if not isinstance(hp, dict):
        raise ConfigError(
            f"{where}hp must be a mapping of {method}'s hyperparameters, e.g. {{smoothing: 0.1}}"
        )
    train = train_fields(f"{where}train", raw.get("train") or {}, TrainConfig, allow_epochs=True)
    name = raw.get("name") if where != "teacher." else None
    taught = raw.get("students")
    if taught is not None:
        taught = [taught] if isinstance(taught, str) else taught
        if not isinstance(taught, list) or not taught or not all(isinstance(x, str) for x in taught):
            raise ConfigError(f"{where}students must be a non-empty list of the spec's students, e.g. [resnet8x4]")
        taught = tuple(taught)
    return _build(TeacherSpec, where, name=name, students=taught, model=model, checkpoint=ckpt, method=method, hp=dict(hp), train=train)


def _methods(raw: Any, METHODS, TrainConfig) -> list[MethodSpec]:
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        raw = {str(m): {} for m in raw} if all(isinstance(m, str) for m in raw) else None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            "methods must be a non-empty list (methods: [kd, dkd]) or a mapping of method -> options"
        )
    out = []
    for name, opts in raw.items():
        name = str(name)
        where = f"methods.{name}"
        _lookup(where, name, "method")
        cls = METHODS.get(name)
        opts = opts or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"{where} must be a mapping {{space: {{...}}, starts: true, trials: N}}")
        _no_unknown(where + ".", opts, _keys(MethodSpec) - {"name"})
        space_raw = opts.get("space") or {}
        if not isinstance(space_raw, dict):
            raise ConfigError(f"{where}.space must map parameter -> value | [choices] | {{low, high, log}}")
        space = {
            str(k): parse_override(f"{where}.space.{k}", str(k), v, cls, TrainConfig)
            for k, v in space_raw.items()
        }
        starts = opts.get("starts", default_of(MethodSpec, "starts"))
        if not isinstance(starts, bool) and not (
            isinstance(starts, list) and all(isinstance(s, dict) for s in starts)
        ):
            raise ConfigError(f"{where}.starts must be true (published points), false, or a list of mappings")
        trials = read_field(where + ".", opts, "trials")
        out.append(_build(MethodSpec, where + ".", name=name, space=space, starts=starts, trials=trials))
    return out


# ---------------------------------------------------------------------------------------------- helpers


def _no_unknown(prefix: str, raw: dict, allowed: set) -> None:
    for k in raw:
        if k not in allowed:
            raise ConfigError(
                f"{prefix}{k}: unknown field{did_you_mean(str(k), sorted(allowed))}; valid fields"
                f"{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(allowed))}"
            )


def _lookup(where: str, name: Any, kind: str) -> None:
    from kdtune.names import check_name

    check_name(kind, name, where)


def _keys(cls: type) -> set[str]:
    return set(fields_of(cls))


def _build(cls: type, where: str, **values: Any) -> Any:
    """The frozen ``cls`` of checked values; should its declaration refuse one still, one line names the field."""
    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{where}{key}={err.get('input')!r}: {err['msg'].lower()}") from None


def stage_key(cfg) -> str:
    """A 16-hex-digit hash of what defines a stage's computation (``TrainConfig.identity()``)."""
    ident = cfg.identity() if hasattr(cfg, "identity") else dict(cfg)
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_specs(old: dict, new: dict) -> list[str]:
    """Dotted names of the fields whose values differ between two resolved specs (``to_dict()``)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        if not d and prefix:
            return {prefix: {}}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}
