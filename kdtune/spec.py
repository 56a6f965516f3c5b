"""The sweep spec: one YAML file that describes a whole sweep, validated before anything starts.

A spec names the data set, the teacher (a checkpoint, or a teacher stage to train once), the students, the
methods (each with an optional narrowing or widening of its search space), the budget, the scheduler, the
metric, the storage path and the MLflow tracking URI. :func:`load_spec` reads and validates it into a frozen
:class:`SweepSpec`; every problem raises :class:`~kdtune.errors.ConfigError` naming the field (``budget.trials``,
``methods.dkd.space.beta``, ...) before Ray is started. :func:`stage_key` hashes the identity of a stage (a
teacher or the CE-trained student) so that it is trained once and shared by every sweep that needs it.

Example (``sweeps/digits.yaml``)::

    name: digits-demo
    data: digits
    teacher: {model: resnet8x4, train: {epochs: 15}}
    students: [resnet8]
    methods: [ce, kd, dkd, dist, wttm]
    budget: {trials: 4, epochs: 8, concurrency: 2, cpus_per_trial: 1}
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdtune.config import CHOICES, read_word
from kdtune.errors import ConfigError, did_you_mean

SCHEDULERS = ("asha", "none", "hyperband")
ON_RESUME = ("resume", "restart", "skip")
TEACHER_METHODS = ("ce", "ls", "mse")
MAX_EPOCHS = 10_000
MAX_TRIALS = 100_000
# Metrics a sweep may select on: validation numbers and training loss. Never the test split.
METRIC_MODES = {"val_acc": "max", "best_val_acc": "max", "val_loss": "min", "train_loss": "min"}
# TrainConfig fields the sweep itself sets; `train:` may not.
SWEEP_OWNED = ("data", "data_root", "download", "val_fraction", "data_seed", "model", "teacher", "teacher_model",
               "init", "method", "hp", "epochs", "seed", "out", "overwrite", "resume")  # fmt: skip
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Override:
    """How a spec changes one parameter of a method's space: a fixed value, a set of choices, or a range."""

    kind: str  # "fixed" | "choices" | "range"
    value: Any = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def to_yaml(self) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "choices":
            return list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def contains(self, v: Any) -> bool:
        if self.kind == "fixed":
            return v == self.value
        if self.kind == "choices":
            return v in self.choices
        try:
            return self.low <= float(v) <= self.high  # type: ignore[operator]
        except (TypeError, ValueError):
            return False


@dataclass(frozen=True)
class MethodSpec:
    name: str
    space: dict = field(default_factory=dict)  # param -> Override
    starts: Any = True  # True: the published starting points; False: none; a list of dicts: these
    trials: int | None = None  # overrides budget.trials for this method

    def to_yaml(self) -> dict[str, Any]:
        return {"space": {k: o.to_yaml() for k, o in self.space.items()}, "starts": self.starts,
                "trials": self.trials}  # fmt: skip


@dataclass(frozen=True)
class TeacherSpec:
    model: str | None = None
    checkpoint: str | None = None  # a trained teacher (path or URL); None: train a teacher stage
    method: str = "ce"
    hp: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)  # TrainConfig fields of the stage, over the trials' `train`

    @property
    def is_stage(self) -> bool:
        return self.checkpoint is None


@dataclass(frozen=True)
class Budget:
    trials: int = 8
    epochs: int = 30
    concurrency: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    repeats: int = 1
    fuse: int | str = 1  # members per fused bundle (one Tune trial); "auto": picked per device (kdtune.tune.fused)


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class TrackingSpec:
    enabled: bool = True
    uri: str | None = None  # None: sqlite:///<experiment dir>/mlflow.db


@dataclass(frozen=True)
class FailureSpec:
    max_failures: int = 1  # retries of a trial that errored (from its last checkpoint)
    on_resume: str = "resume"  # errored trials on `kdtune resume`: resume | restart | skip


@dataclass(frozen=True)
class SweepSpec:
    name: str
    data: str
    students: tuple
    methods: tuple  # of MethodSpec
    teacher: TeacherSpec | None = None
    data_root: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    data_seed: int = 0
    budget: Budget = field(default_factory=Budget)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    metric: str = "val_acc"
    mode: str = "max"
    train: dict = field(default_factory=dict)
    ce_student: dict = field(default_factory=dict)
    storage: str = "runs/sweeps"
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    failures: FailureSpec = field(default_factory=FailureSpec)
    seed: int = 0
    source: str | None = None  # the file it was read from (not part of the spec's identity)

    # ------------------------------------------------------------------ derived
    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage) / self.name

    @property
    def stages_dir(self) -> Path:
        return Path(self.storage) / "stages"

    def method(self, name: str) -> MethodSpec:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def needs_teacher(self) -> bool:
        from kdtune.losses import METHODS

        return any(METHODS.get(m.name).needs_teacher for m in self.methods)

    @property
    def needs_ce_student(self) -> bool:
        from kdtune.losses import METHODS

        return any(METHODS.get(m.name).needs_init for m in self.methods)

    def groups(self) -> list[tuple[str, str]]:
        """(student, method) pairs in the order they are swept; one Tune experiment each."""
        return [(s, m.name) for s in self.students for m in self.methods]

    def data_fields(self) -> dict[str, Any]:
        return {"data": self.data, "data_root": self.data_root, "download": self.download,
                "val_fraction": self.val_fraction, "data_seed": self.data_seed}  # fmt: skip

    def trial_base(self, student: str, method: str) -> dict[str, Any]:
        """The TrainConfig dict every trial of a group starts from (teacher and init paths filled later)."""
        return {**self.train, **self.data_fields(), "model": student, "method": method,
                "epochs": self.budget.epochs, "seed": self.seed}  # fmt: skip

    def teacher_stage_config(self) -> dict[str, Any]:
        t = self.teacher
        assert t is not None and t.is_stage
        return {**self.train, "epochs": self.budget.epochs, **t.train, **self.data_fields(), "model": t.model,
                "method": t.method, "hp": dict(t.hp), "seed": self.seed}  # fmt: skip

    def ce_student_config(self, student: str) -> dict[str, Any]:
        return {**self.train, "epochs": self.budget.epochs, **self.ce_student, **self.data_fields(),
                "model": student, "method": "ce", "seed": self.seed}  # fmt: skip

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (what ``spec.yaml`` in the experiment holds)."""
        d: dict[str, Any] = {"name": self.name, "data": self.data, "data_root": self.data_root,
                             "download": self.download, "val_fraction": self.val_fraction,
                             "data_seed": self.data_seed}  # fmt: skip
        t = self.teacher
        if t is None:
            d["teacher"] = None
        elif t.is_stage:
            d["teacher"] = dataclasses.asdict(t)
        else:
            d["teacher"] = {"model": t.model, "checkpoint": t.checkpoint}
        d["students"] = list(self.students)
        d["methods"] = {m.name: m.to_yaml() for m in self.methods}
        d["budget"] = dataclasses.asdict(self.budget)
        d["scheduler"] = dataclasses.asdict(self.scheduler)
        d["metric"], d["mode"] = self.metric, self.mode
        d["train"], d["ce_student"] = dict(self.train), dict(self.ce_student)
        d["storage"] = self.storage
        d["tracking"] = dataclasses.asdict(self.tracking)
        d["failures"] = dataclasses.asdict(self.failures)
        d["seed"] = self.seed
        return json.loads(json.dumps(d, default=str))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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

    fields = {f.name for f in dataclasses.fields(SweepSpec)} - {"source"}
    _no_unknown("", raw, fields)

    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"name={name!r} is not a valid experiment name; use letters, digits, '.', '_' or '-' (it names a folder)"
        )
    data = _str(raw, "data", "digits")
    _lookup("data", data, "data set")
    val_fraction = _num(raw, "val_fraction", 0.1)
    data_seed = _int(raw, "data_seed", 0)
    seed = _int(raw, "seed", 0)

    students = raw.get("students", raw.get("student"))
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
    metric = _str(raw, "metric", "val_acc")
    if metric.startswith("test"):
        raise ConfigError(
            f"metric={metric} would select hyperparameters on the test split; use val_acc (the default) or "
            f"one of {', '.join(METRIC_MODES)}"
        )
    if metric not in METRIC_MODES:
        raise ConfigError(f"metric={metric!r} is not valid{did_you_mean(metric, METRIC_MODES)}; choose one of "
                          f"{', '.join(METRIC_MODES)}")  # fmt: skip
    mode = _str(raw, "mode", METRIC_MODES[metric])
    if mode not in ("max", "min"):
        raise ConfigError(f"mode={mode!r} is not valid; choose max or min")
    if metric.startswith(("val", "best_val")) and val_fraction <= 0:
        raise ConfigError(
            f"metric={metric} needs a validation split but val_fraction=0; set val_fraction: 0.1"
        )

    train = _train_fields("train", raw.get("train") or {}, TrainConfig)
    ce_student = _train_fields("ce_student", raw.get("ce_student") or {}, TrainConfig)
    from kdtune.losses import METHODS

    methods = _methods(raw.get("methods"), METHODS, TrainConfig)
    teacher = _teacher(raw.get("teacher"), TrainConfig, base_dir)
    needs_teacher = [m.name for m in methods if METHODS.get(m.name).needs_teacher]
    if needs_teacher and teacher is None:
        raise ConfigError(
            f"teacher is missing but method {needs_teacher[0]} needs one; add teacher: {{model: resnet32x4}} "
            "(a teacher stage trained once) or teacher: {checkpoint: path/to/teacher.pt}"
        )

    storage = raw.get("storage") or "runs/sweeps"
    if not isinstance(storage, str):
        raise ConfigError(f"storage={storage!r} must be a path")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().absolute())
    tracking = _tracking(raw.get("tracking"))
    failures = _failures(raw.get("failures"))

    spec = SweepSpec(
        name=name, data=data, students=tuple(students), methods=tuple(methods), teacher=teacher,
        data_root=_opt_str(raw, "data_root"), download=_bool(raw, "download", False), val_fraction=val_fraction,
        data_seed=data_seed, budget=budget, scheduler=scheduler, metric=metric, mode=mode, train=train,
        ce_student=ce_student, storage=storage, tracking=tracking, failures=failures, seed=seed, source=source,
    )  # fmt: skip
    _check_trial_configs(spec, TrainConfig)
    return spec


# ---------------------------------------------------------------------------------------------- sections


def _budget(raw: Any) -> Budget:
    if not isinstance(raw, dict):
        raise ConfigError("budget must be a mapping, e.g. budget: {trials: 8, epochs: 30, concurrency: 2}")
    _no_unknown("budget.", raw, {f.name for f in dataclasses.fields(Budget)})
    return Budget(
        trials=_int(raw, "trials", 8, prefix="budget."),
        epochs=_int(raw, "epochs", 30, prefix="budget."),
        concurrency=_int(raw, "concurrency", 1, prefix="budget."),
        cpus_per_trial=_num(raw, "cpus_per_trial", 1.0, prefix="budget."),
        gpus_per_trial=_num(raw, "gpus_per_trial", 0.0, prefix="budget."),
        repeats=_int(raw, "repeats", 1, prefix="budget."),
        fuse=_fuse(raw),
    )


MAX_FUSE = 64


def _fuse(raw: dict) -> int | str:
    v = raw.get("fuse", 1)
    if v == "auto":
        return "auto"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ConfigError(f"budget.fuse={v!r} must be an integer >= 1 (members per fused bundle) or 'auto'")
    if not 1 <= int(v) <= MAX_FUSE:
        raise ConfigError(f"budget.fuse={int(v)} is out of range; it must be in [1, {MAX_FUSE}] or 'auto'")
    return int(v)


def _scheduler(raw: Any, budget: Budget) -> SchedulerSpec:
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError("scheduler must be a name (asha, none, hyperband) or a mapping {name: asha, ...}")
    _no_unknown("scheduler.", raw, {"name", "grace_period", "reduction_factor"})
    name = str(raw.get("name", "asha")).lower()
    if name in ("fifo", "null", "None"):
        name = "none"
    if name not in SCHEDULERS:
        raise ConfigError(
            f"scheduler.name={name!r} is not valid{did_you_mean(name, SCHEDULERS)}; choose one of {', '.join(SCHEDULERS)}"
        )
    grace = _int(raw, "grace_period", min(max(1, budget.epochs // 8), budget.epochs), hi=budget.epochs,
                 prefix="scheduler.")  # fmt: skip
    rf = _num(raw, "reduction_factor", 2.0, prefix="scheduler.")
    return SchedulerSpec(name=name, grace_period=grace, reduction_factor=rf)


def _tracking(raw: Any) -> TrackingSpec:
    if raw is None:
        return TrackingSpec()
    if isinstance(raw, bool):
        return TrackingSpec(enabled=raw)
    if isinstance(raw, str):
        raw = {"uri": raw}
    if not isinstance(raw, dict):
        raise ConfigError("tracking must be a mapping {enabled: true, uri: sqlite:///...|http://host:5000}")
    _no_unknown("tracking.", raw, {"enabled", "uri"})
    uri = raw.get("uri")
    if uri is not None and not isinstance(uri, str):
        raise ConfigError(f"tracking.uri={uri!r} must be a URI string or null (embedded SQLite)")
    if uri:
        from kdtune.tracking.uri import normalize_tracking_uri

        uri = normalize_tracking_uri(uri)
    return TrackingSpec(enabled=_bool(raw, "enabled", True, prefix="tracking."), uri=uri or None)


def _failures(raw: Any) -> FailureSpec:
    if raw is None:
        return FailureSpec()
    if not isinstance(raw, dict):
        raise ConfigError("failures must be a mapping {max_failures: 1, on_resume: resume}")
    _no_unknown("failures.", raw, {"max_failures", "on_resume"})
    on_resume = str(raw.get("on_resume", "resume"))
    if on_resume not in ON_RESUME:
        raise ConfigError(
            f"failures.on_resume={on_resume!r} is not valid{did_you_mean(on_resume, ON_RESUME)}; choose one of "
            f"{', '.join(ON_RESUME)}"
        )
    return FailureSpec(max_failures=_int(raw, "max_failures", 1, prefix="failures."),
                       on_resume=on_resume)  # fmt: skip


def _teacher(raw: Any, TrainConfig, base_dir: Path | None) -> TeacherSpec | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"checkpoint": raw}
    if not isinstance(raw, dict):
        raise ConfigError("teacher must be a checkpoint path or a mapping {model: resnet32x4, train: {...}}")
    _no_unknown("teacher.", raw, {"model", "checkpoint", "method", "hp", "train"})
    model = _opt_str(raw, "model", prefix="teacher.")
    if model is not None:
        _lookup("teacher.model", model, "model")
    ckpt = _opt_str(raw, "checkpoint", prefix="teacher.")
    if ckpt is None and model is None:
        raise ConfigError(
            "teacher needs a model (a teacher stage to train) or a checkpoint; add teacher.model"
        )
    if ckpt is not None:
        if "://" not in ckpt:
            p = Path(ckpt).expanduser()
            if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
                p = base_dir / p
            if not p.exists():
                raise ConfigError(
                    f"teacher.checkpoint={ckpt} does not exist; check the path, or drop it and set teacher.model "
                    "to train a teacher stage"
                )
            ckpt = str(p.resolve())
        for k in ("method", "hp", "train"):
            if raw.get(k):
                raise ConfigError(
                    f"teacher.{k} applies to a teacher stage, not a checkpoint; drop teacher.{k}"
                )
    method = str(raw.get("method", "ce"))
    if method not in TEACHER_METHODS:
        raise ConfigError(
            f"teacher.method={method!r} is not a teacher objective{did_you_mean(method, TEACHER_METHODS)}; "
            f"choose one of {', '.join(TEACHER_METHODS)}"
        )
    hp = raw.get("hp") or {}
    if not isinstance(hp, dict):
        raise ConfigError(
            f"teacher.hp must be a mapping of {method}'s hyperparameters, e.g. {{smoothing: 0.1}}"
        )
    train = _train_fields("teacher.train", raw.get("train") or {}, TrainConfig, allow_epochs=True)
    return TeacherSpec(model=model, checkpoint=ckpt, method=method, hp=dict(hp), train=train)


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
        _no_unknown(where + ".", opts, {"space", "starts", "trials"})
        space_raw = opts.get("space") or {}
        if not isinstance(space_raw, dict):
            raise ConfigError(f"{where}.space must map parameter -> value | [choices] | {{low, high, log}}")
        space = {
            str(k): parse_override(f"{where}.space.{k}", str(k), v, cls, TrainConfig)
            for k, v in space_raw.items()
        }
        starts = opts.get("starts", True)
        if not isinstance(starts, bool) and not (
            isinstance(starts, list) and all(isinstance(s, dict) for s in starts)
        ):
            raise ConfigError(f"{where}.starts must be true (published points), false, or a list of mappings")
        trials = opts.get("trials")
        if trials is not None:
            trials = _int(opts, "trials", 1, prefix=where + ".")
        out.append(MethodSpec(name=name, space=space, starts=starts, trials=trials))
    return out


def parse_override(where: str, name: str, v: Any, method_cls, TrainConfig) -> Override:
    """``4`` fixes a value, ``[1, 2, 4]`` gives choices, ``{low: 1, high: 8, log: true}`` a range.

    The name must be a hyperparameter of the method or a TrainConfig field (``lr``, ``weight_decay``...);
    values are checked against the hyperparameter's declared range.
    """
    hp = method_cls.hparams.get(name)
    tc_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if hp is None and (name not in tc_fields or name in SWEEP_OWNED):
        valid = sorted(method_cls.hparams) + ["lr", "weight_decay", "momentum", "batch_size", "..."]
        raise ConfigError(
            f"{where}: {name!r} is neither a hyperparameter of {method_cls.name}{did_you_mean(name, valid)} nor a "
            f"training field a trial may vary; {method_cls.name}'s hyperparameters: "
            f"{', '.join(sorted(method_cls.hparams)) or 'none'}"
        )
    if hp is not None:
        typ = hp.type
    else:
        default = tc_fields[name].default
        typ = type(default) if isinstance(default, (bool, int, float, str)) else float

    def check(value):
        if hp is not None:
            return hp.check(name, value, method_cls.name)
        # a value is taken as written or refused, never rounded or reinterpreted (2.5 is no batch size of 2,
        # "false" no True): a trial runs no value the user did not write
        if typ is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} is not true or false")
        if typ is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ConfigError(f"{where}={value!r} is not an integer")
        try:
            return typ(read_word(value, CHOICES.get(name, ())))  # amp: off (YAML's False) is the word
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} is not a {typ.__name__}") from None

    if isinstance(v, dict):
        unknown = set(v) - {"low", "high", "log", "step"}
        if unknown or "low" not in v or "high" not in v:
            raise ConfigError(
                f"{where}: a range is written {{low: 1, high: 8}} (optionally log: true, step: 1)"
            )
        if typ not in (int, float):
            raise ConfigError(
                f"{where}: {name} is a {typ.__name__}; give choices as a list instead of a range"
            )
        low, high = check(v["low"]), check(v["high"])
        if not low < high:
            raise ConfigError(f"{where}: low={low} must be below high={high}")
        log = bool(v.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0 (got {low})")
        step = v.get("step")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
            raise ConfigError(f"{where}.step must be a number > 0 and cannot be combined with log: true")
        if step is not None and typ is int and not float(step).is_integer():
            raise ConfigError(f"{where}.step={step} must be an integer: {name} is an integer")
        return Override("range", low=low, high=high, log=log, step=step, integer=typ is int)
    if isinstance(v, list):
        if not v:
            raise ConfigError(f"{where}: an empty list of choices; give at least one value")
        choices = tuple(check(x) for x in v)
        if len(set(choices)) != len(choices):
            raise ConfigError(f"{where}: choices {list(choices)} repeat a value")
        return Override("choices", choices=choices, integer=typ is int)
    return Override("fixed", value=check(v), integer=typ is int)


def _train_fields(where: str, raw: Any, TrainConfig, allow_epochs: bool = False) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where} must be a mapping of training settings, e.g. {{lr: 0.05, batch_size: 64}}"
        )
    names = set(TrainConfig.fields())
    owned = set(SWEEP_OWNED) - ({"epochs"} if allow_epochs else set())
    for k in raw:
        if k in owned:
            hint = {
                "epochs": "budget.epochs", "seed": "seed", "model": "students", "method": "methods",
                "teacher": "teacher", "hp": "methods.<name>.space",
            }.get(k, k if k.startswith("data") or k in ("download", "val_fraction") else "the sweep")  # fmt: skip
            raise ConfigError(f"{where}.{k} is set by the sweep; set it as {hint} instead")
        if k not in names:
            raise ConfigError(
                f"{where}.{k}: unknown training setting{did_you_mean(k, sorted(names))}; see `kdtune train --help`"
            )
    return dict(raw)


def _check_trial_configs(spec: SweepSpec, TrainConfig) -> None:
    """Build one TrainConfig per group (method defaults) so a bad `train:` value fails now, naming the field.

    Fixed hyperparameters are checked one by one (:func:`parse_override`); their combination with the others is
    not decided here, with the method's defaults standing in for searched values (``lambda_min: 60`` fails
    beside the default ``lambda_max`` 50, while the space searches lambda_max up to 1000): it is decided with the
    space, which knows what each parameter may be (:func:`kdtune.tune.spaces.build_space`, run by ``kdtune
    validate`` and ``kdtune sweep``). A config that fails without the fixed hyperparameters fails here."""
    placeholder = "<teacher stage>"
    for student, method in spec.groups():
        base = spec.trial_base(student, method)
        fixed = {k: o.value for k, o in spec.method(method).space.items() if o.kind == "fixed"}
        base.update({"teacher": placeholder, "init": "<ce student stage>"})
        try:
            TrainConfig.from_dict({**base, **_split_fixed(fixed, method)})
        except ConfigError:
            try:
                TrainConfig.from_dict({**base, **_split_fixed(fixed, method), "hp": {}})
            except ConfigError as e:
                raise ConfigError(f"sweep spec ({student}, {method}): {e}") from None
    if spec.teacher is not None and spec.teacher.is_stage:
        try:
            TrainConfig.from_dict(spec.teacher_stage_config())
        except ConfigError as e:
            raise ConfigError(f"teacher stage: {e}") from None
    if spec.needs_ce_student:
        try:
            TrainConfig.from_dict(spec.ce_student_config(spec.students[0]))
        except ConfigError as e:
            raise ConfigError(f"ce_student stage: {e}") from None


def _split_fixed(values: dict, method: str) -> dict:
    from kdtune.losses import METHODS

    hps = METHODS.get(method).hparams
    hp = {k: v for k, v in values.items() if k in hps}
    return {**{k: v for k, v in values.items() if k not in hps}, "hp": hp}


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


# Scalar fields are checked by the pydantic model of the spec (kdtune.spec_schema: its JSON Schema holds the
# same types and bounds); these read a field with its default and give one line naming it when it is wrong.


def _check(prefix: str, key: str, value: Any, kind: type, hi: float | None = None) -> Any:
    from kdtune.spec_schema import check_scalar

    return check_scalar(prefix, key, value, kind, hi=hi)


def _str(raw: dict, key: str, default: str) -> str:
    return _check("", key, raw.get(key, default), str)


def _opt_str(raw: dict, key: str, prefix: str = "") -> str | None:
    v = raw.get(key)
    return None if v is None else _check(prefix, key, v, str)


def _bool(raw: dict, key: str, default: bool, prefix: str = "") -> bool:
    return _check(prefix, key, raw.get(key, default), bool)


def _int(raw: dict, key: str, default: int, prefix: str = "", hi: int | None = None) -> int:
    """An integer field; its bounds are the model's (``hi`` tightens the upper one: grace_period <= epochs)."""
    return int(_check(prefix, key, raw.get(key, default), int, hi=hi))


def _num(raw: dict, key: str, default: float, prefix: str = "") -> float:
    return float(_check(prefix, key, raw.get(key, default), float))


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
