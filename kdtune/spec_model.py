"""What a sweep spec is: the one declaration of its fields, their defaults and their bounds.

Each part of a spec is a frozen pydantic dataclass, and these are the objects the rest of kdtune reads
(``spec.budget.trials``, ``spec.scheduler.grace_period``, ``spec.method("dkd")``...). Nothing else states a
default or a bound: :func:`kdtune.spec.load_spec` fills an absent field with the default declared here and checks
a value against the bounds declared here (:mod:`kdtune.spec_schema`), and the JSON Schema an editor uses is
derived from these fields. Importing this module imports pydantic, not torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

import yaml
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from kdtune.names import DATASET_NAMES

SCHEDULERS = ("asha", "none", "hyperband")
ON_RESUME = ("resume", "restart", "skip")
TEACHER_METHODS = ("ce", "ls", "mse")
MAX_EPOCHS = 10_000
MAX_TRIALS = 100_000
MAX_FUSE = 64
# Metrics a sweep may select on: validation numbers and training loss. Never the test split.
METRIC_MODES = {"val_acc": "max", "best_val_acc": "max", "val_loss": "min", "train_loss": "min"}
# TrainConfig fields the sweep itself sets; `train:` may not.
SWEEP_OWNED = ("data", "data_root", "download", "val_fraction", "data_seed", "model", "teacher", "teacher_model",
               "init", "method", "hp", "epochs", "seed", "out", "overwrite", "resume")  # fmt: skip
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
TEACHER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_]{0,23}$"  # a teacher's short name: part of group and stage names
RANGE_KEYS = ("low", "high", "log", "step")  # the Override fields a range is written with
FuseCount = Annotated[int, Field(ge=1, le=MAX_FUSE)]

_frozen = dataclass(frozen=True, kw_only=True, config=ConfigDict(defer_build=True))  # validators built at first use


@dataclass(frozen=True)
class Override:
    """How a spec changes one parameter of a method's space: a fixed value, a set of choices, or a range."""

    kind: Literal["fixed", "choices", "range"]
    value: Any = None
    choices: tuple = ()
    low: Union[int, float, None] = None  # noqa: UP007 - an int stays an int (an integer range)
    high: Union[int, float, None] = None  # noqa: UP007
    log: bool = Field(False, description="search the range on a log scale")
    step: Union[int, float, None] = Field(None, gt=0, description="the grid of the range")  # noqa: UP007
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


@_frozen
class MethodSpec:
    """A method of the sweep and how the spec changes its search space."""

    name: str
    space: dict[str, Override] = Field(
        default_factory=dict,
        description="narrow or widen the method's space: a range {low, high}, a list of choices, or a fixed value",
    )
    starts: Union[bool, list[dict]] = Field(  # noqa: UP007
        True, description="true: the published starting points; false: none; or a list of points"
    )
    trials: int | None = Field(None, ge=1, le=MAX_TRIALS, description="this method's own budget (default budget.trials)")

    def to_yaml(self) -> dict[str, Any]:
        return {"space": {k: o.to_yaml() for k, o in self.space.items()}, "starts": self.starts,
                "trials": self.trials}  # fmt: skip


@_frozen
class TeacherSpec:
    """The teacher: a trained checkpoint, or a teacher stage trained once and shared."""

    name: str | None = Field(None, pattern=TEACHER_NAME_PATTERN,
                             description="its short name (each of `teachers:` has one; `teacher:` none)")  # fmt: skip
    model: str | None = Field(None, description="architecture; a teacher stage is trained when no checkpoint")
    checkpoint: str | None = Field(None, description="a trained teacher: path or URL")
    method: Literal[TEACHER_METHODS] = Field("ce", description="the teacher stage's objective")  # type: ignore[valid-type]
    hp: dict = Field(default_factory=dict, description="hyperparameters of the teacher objective")
    train: dict = Field(default_factory=dict, description="TrainConfig fields of the stage, over the trials' `train`")
    students: tuple[str, ...] | None = Field(
        None, description="in `teachers:`, the students it teaches (default: all), for teacher -> student pairs"
    )

    @property
    def is_stage(self) -> bool:
        return self.checkpoint is None


class Group(NamedTuple):
    """One group of a sweep: a Tune experiment, an Optuna study, an MLflow view. ``teacher`` is the teacher's
    name in a sweep of several teachers (``teachers:``) for a method that reads a teacher, else None."""

    teacher: str | None
    student: str
    method: str

    @property
    def name(self) -> str:
        return f"{self.teacher}-{self.student}-{self.method}" if self.teacher else f"{self.student}-{self.method}"


@_frozen
class Budget:
    """How many trials, how long, and on what resources."""

    trials: int = Field(8, ge=1, le=MAX_TRIALS, description="trials per method")
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS, description="epochs of each trial")
    concurrency: int = Field(1, ge=1, le=10_000, description="trials at a time")
    cpus_per_trial: float = Field(1.0, gt=0, le=1024)
    gpus_per_trial: float = Field(0.0, ge=0, le=64, description="fractional GPUs are bookkeeping only")
    repeats: int = Field(1, ge=1, le=100, description="reruns of each method's best configuration over seeds")
    repeat_warm_start: Literal["shared", "seed"] = Field(
        "shared", description="a warm-started method's repeats (DiSK): from the sweep's one CE student (shared), "
        "or each from a CE student trained on the repeat's own seed (seed)"
    )
    fuse: Union[FuseCount, Literal["auto"]] = Field(  # noqa: UP007
        1, description="trials of a group trained as one fused bundle (1: unfused; auto: picked per device)"
    )


@_frozen
class SchedulerSpec:
    """The trial scheduler of each group (ASHA stops the worst trials early)."""

    name: Literal[SCHEDULERS] = "asha"  # type: ignore[valid-type]
    grace_period: int | None = Field(None, ge=1, description="at most budget.epochs; default budget.epochs // 8")
    reduction_factor: float = Field(2.0, gt=1, le=100)


def default_grace_period(epochs: int) -> int:
    """``scheduler.grace_period`` when a spec leaves it out: an eighth of the epochs, at least one."""
    return max(1, epochs // 8)


@_frozen
class TrackingSpec:
    """MLflow tracking of the trials."""

    enabled: bool = True
    uri: str | None = Field(None, description="null: sqlite:///<storage>/<name>/mlflow.db; or http://host:5000")
    optuna: str | None = Field(
        None, description="the Optuna mirror: null: <storage>/<name>/optuna.db; or a database URL shared by "
        "experiments (postgresql://user@host/db), studies named <name>/<group>",
    )
    models: Literal["best", "all"] = Field(
        "best", description="students logged as MLflow models: each group's best trial's (best) or every completed trial's (all)"
    )


@_frozen
class FailureSpec:
    """What happens to a trial that errors."""

    max_failures: int = Field(1, ge=0, le=100, description="retries of an errored trial (from its last checkpoint)")
    on_resume: Literal[ON_RESUME] = Field("resume", description="errored trials on `kdtune resume`")  # type: ignore[valid-type]


@_frozen
class SweepSpec:
    """A kdtune sweep: one YAML file (`kdtune sweep spec.yaml`)."""

    name: str = Field(pattern=NAME_PATTERN, description="the experiment's folder under storage (default: the file's name)")
    data: Literal[DATASET_NAMES] = "digits"  # type: ignore[valid-type]
    data_root: str | None = Field(None, description="$KDTUNE_DATA, else ~/.cache/kdtune/data")
    download: bool = False
    val_fraction: float = Field(0.1, ge=0, lt=1, description="hyperparameters are chosen on this split")
    data_seed: int = Field(0, ge=0)
    teacher: TeacherSpec | None = Field(None, description="a checkpoint path, or a teacher mapping")
    teachers: tuple[TeacherSpec, ...] | None = Field(
        None, description="several named teachers instead of one: a group per (teacher, student, method)"
    )
    students: tuple[str, ...] = Field(description="a group per (student, method)")
    methods: tuple[MethodSpec, ...] = Field(description="a list, or a mapping to narrow/widen a method's space")
    budget: Budget = Field(default_factory=Budget)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: Literal[tuple(METRIC_MODES)] = "val_acc"  # type: ignore[valid-type]
    mode: Literal["max", "min"] | None = Field(None, description="default: the metric's (max for accuracies)")
    train: dict = Field(default_factory=dict, description="TrainConfig fields shared by every trial")
    ce_student: dict = Field(default_factory=dict, description="TrainConfig fields of the CE-trained student stage")
    storage: str = Field("runs/sweeps", description="where experiments live")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    failures: FailureSpec = Field(default_factory=FailureSpec)
    seed: int = Field(0, ge=0, description="trials' seed and the TPE sampler's seed")
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

    def teacher_list(self) -> tuple[TeacherSpec, ...]:
        """The sweep's teachers: those of ``teachers:`` (named), or the one ``teacher:`` (name None), or none."""
        return self.teachers or ((self.teacher,) if self.teacher is not None else ())

    def named_teacher(self, name: str | None) -> TeacherSpec | None:
        return next((t for t in self.teacher_list() if t.name == name), None)

    def groups(self) -> list[Group]:
        """The groups in the order they are swept: per teacher (of a method that reads one), student and method."""
        if not self.teachers:  # one teacher or none: a group per (student, method), as always
            return [Group(None, s, m.name) for s in self.students for m in self.methods]
        from kdtune.losses import METHODS

        needs = {m.name: METHODS.get(m.name).needs_teacher for m in self.methods}
        out = []
        for s in self.students:
            out += [Group(None, s, m.name) for m in self.methods if not needs[m.name]]
            out += [Group(t.name, s, m.name) for t in self.teachers if t.students is None or s in t.students
                    for m in self.methods if needs[m.name]]  # fmt: skip
        return out

    def data_fields(self) -> dict[str, Any]:
        return {"data": self.data, "data_root": self.data_root, "download": self.download,
                "val_fraction": self.val_fraction, "data_seed": self.data_seed}  # fmt: skip

    def trial_base(self, student: str, method: str) -> dict[str, Any]:
        """The TrainConfig dict every trial of a group starts from (teacher and init paths filled later)."""
        return {**self.train, **self.data_fields(), "model": student, "method": method,
                "epochs": self.budget.epochs, "seed": self.seed}  # fmt: skip

    def teacher_stage_config(self, t: TeacherSpec | None = None) -> dict[str, Any]:
        t = t if t is not None else self.teacher
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
        d["teacher"] = _teacher_dict(self.teacher)
        if self.teachers:
            d["teachers"] = [_teacher_dict(t) for t in self.teachers]
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


def _teacher_dict(t: TeacherSpec | None) -> dict | None:
    if t is None:
        return None
    d = dataclasses.asdict(t) if t.is_stage else {"model": t.model, "checkpoint": t.checkpoint}
    d.pop("students", None)
    if t.students is not None:
        d["students"] = list(t.students)
    if t.name is None:  # `teacher:` as it always was written (its experiments' spec.yaml compare equal)
        d.pop("name", None)
    else:
        d = {"name": t.name, **{k: v for k, v in d.items() if k != "name"}}
    return d


# The spec's sections by the prefix of their fields' names in errors (``budget.trials``, ``methods.dkd.trials``).
SECTIONS: dict[str, type] = {
    "": SweepSpec, "budget": Budget, "scheduler": SchedulerSpec, "tracking": TrackingSpec, "failures": FailureSpec,
    "teacher": TeacherSpec, "teachers": TeacherSpec, "methods": MethodSpec,
}  # fmt: skip


def fields_of(cls: type) -> dict[str, Any]:
    """The declared fields (pydantic ``FieldInfo``: default, bounds, description) of a part of the spec."""
    return cls.__pydantic_fields__  # type: ignore[attr-defined]


def default_of(cls: type, key: str) -> Any:
    """The declared default of field ``key`` of ``cls`` (a new one where it is made by a factory)."""
    return fields_of(cls)[key].get_default(call_default_factory=True)
