"""The sweep spec as a pydantic model, for its JSON Schema (``kdtune validate --schema``).

An editor given the schema (YAML language server: ``# yaml-language-server: $schema=kdtune-sweep.schema.json``
at the top of a spec, or VS Code's ``yaml.schemas``) completes field names, shows each field's meaning and
flags a wrong type, an unknown field or a name that is not registered. :func:`kdtune.spec.load_spec` remains
the validator a sweep runs (it also checks what a schema cannot: a method's hyperparameter ranges, the
teacher checkpoint's architecture, the starting points); a spec it accepts validates against this schema
(tested on the shipped ``sweeps/``). Importing this module imports pydantic, not torch.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from kdtune.config import AMP_MODES, CHOICES, OPTIMIZERS, PRESETS, SCHEDULES, TrainConfig, word_booleans
from kdtune.names import DATASET_NAMES, METHOD_NAMES, MODEL_NAMES
from kdtune.spec import (
    MAX_EPOCHS,
    MAX_FUSE,
    MAX_TRIALS,
    METRIC_MODES,
    ON_RESUME,
    SCHEDULERS,
    SWEEP_OWNED,
    TEACHER_METHODS,
)

SCHEMA_ID = "https://kdtune.invalid/schemas/sweep-spec.json"
Model = Literal[MODEL_NAMES]  # type: ignore[valid-type]
Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _train_model(name: str, owned: tuple[str, ...], doc: str) -> type[BaseModel]:
    """A model of the TrainConfig fields a spec section may set (all optional), typed from the dataclass."""
    literal = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "amp": AMP_MODES, "preset": PRESETS, **CHOICES}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in owned:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if f.name in literal:
            words = tuple(literal[f.name])  # and YAML's booleans where a word is off/on (amp: off)
            typ: Any = Literal[words + word_booleans(words)]  # type: ignore[valid-type]
        elif isinstance(default, bool):
            typ = bool
        elif isinstance(default, int):
            typ = int
        elif isinstance(default, float):
            typ = float
        elif isinstance(default, list):
            typ = list[int]
        else:
            typ = str
        fields[f.name] = (typ | None, Field(None, description=f"default {default!r} (`kdtune train --help`)"))
    model = create_model(name, __config__=ConfigDict(extra="forbid"), **fields)
    model.__doc__ = doc
    return model


TrainFields = _train_model("TrainFields", SWEEP_OWNED, "TrainConfig fields shared by every trial")
StageTrainFields = _train_model(
    "StageTrainFields", tuple(k for k in SWEEP_OWNED if k != "epochs"), "TrainConfig fields of a stage"
)


class Range(_Strict):
    """A searched range of a hyperparameter."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)


Scalar = Union[float, int, str, bool]  # noqa: UP007 - a union the schema spells out


class MethodOptions(_Strict):
    space: dict[str, Union[Range, list[Scalar], Scalar]] = Field(  # noqa: UP007
        default_factory=dict,
        description="narrow or widen the method's space: a range {low, high}, a list of choices, or a fixed value",
    )
    starts: Union[bool, list[dict[str, Any]]] = Field(  # noqa: UP007
        True, description="true: the published starting points; false: none; or a list of points"
    )
    trials: int | None = Field(None, ge=1, le=MAX_TRIALS, description="this method's own budget (default budget.trials)")


class Teacher(_Strict):
    model: Model | None = Field(None, description="architecture; a teacher stage is trained when no checkpoint")
    checkpoint: str | None = Field(None, description="a trained teacher: path or URL")
    method: Literal[TEACHER_METHODS] = "ce"  # type: ignore[valid-type]
    hp: dict[str, Any] = Field(default_factory=dict, description="hyperparameters of the teacher objective")
    train: StageTrainFields = Field(default_factory=StageTrainFields)  # type: ignore[valid-type]


class Budget(_Strict):
    trials: int = Field(8, ge=1, le=MAX_TRIALS, description="trials per method")
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS)
    concurrency: int = Field(1, ge=1, le=10_000, description="trials at a time")
    cpus_per_trial: float = Field(1.0, gt=0, le=1024)
    gpus_per_trial: float = Field(0.0, ge=0, le=64, description="fractional GPUs are bookkeeping only")
    repeats: int = Field(1, ge=1, le=100, description="reruns of each method's best configuration over seeds")
    fuse: Union[Annotated[int, Field(ge=1, le=MAX_FUSE)], Literal["auto"]] = Field(  # noqa: UP007
        1, description="trials of a group trained as one fused bundle (1: unfused; auto)"
    )


class Scheduler(_Strict):
    name: Literal[SCHEDULERS] = "asha"  # type: ignore[valid-type]
    grace_period: int | None = Field(None, ge=1, description="default epochs // 8")
    reduction_factor: float = Field(2.0, gt=1, le=100)


class Tracking(_Strict):
    enabled: bool = True
    uri: str | None = Field(None, description="null: sqlite:///<storage>/<name>/mlflow.db; or http://host:5000")


class Failures(_Strict):
    max_failures: int = Field(1, ge=0, le=100, description="retries of an errored trial")
    on_resume: Literal[ON_RESUME] = "resume"  # type: ignore[valid-type]


class SweepSpecModel(_Strict):
    """A kdtune sweep: one YAML file (`kdtune sweep spec.yaml`)."""

    model_config = ConfigDict(extra="forbid", title="kdtune sweep spec")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                             description="the experiment's folder under storage (default: the file's name)")  # fmt: skip
    data: Literal[DATASET_NAMES] = "digits"  # type: ignore[valid-type]
    data_root: str | None = Field(None, description="$KDTUNE_DATA, else ~/.cache/kdtune/data")
    download: bool = False
    val_fraction: float = Field(0.1, ge=0, lt=1, description="hyperparameters are chosen on this split")
    data_seed: int = Field(0, ge=0)
    teacher: Union[Teacher, str, None] = Field(None, description="a checkpoint path, or a teacher mapping")  # noqa: UP007
    students: Union[list[Model], Model] = Field(..., description="a group per (student, method)")  # noqa: UP007
    methods: Union[list[Method], Method, dict[Method, Union[MethodOptions, None]]] = Field(  # noqa: UP007
        ..., description="a list, or a mapping to narrow/widen a method's space"
    )
    budget: Budget = Field(default_factory=Budget)
    scheduler: Union[Scheduler, Literal[SCHEDULERS], None] = None  # type: ignore[valid-type]  # noqa: UP007
    metric: Literal[tuple(METRIC_MODES)] = "val_acc"  # type: ignore[valid-type]
    mode: Literal["max", "min"] | None = Field(None, description="default: the metric's (max for accuracies)")
    train: TrainFields = Field(default_factory=TrainFields)  # type: ignore[valid-type]
    ce_student: TrainFields = Field(default_factory=TrainFields)  # type: ignore[valid-type]
    storage: str | None = Field(None, description="where experiments live (default runs/sweeps)")
    tracking: Union[Tracking, bool, str, None] = None  # noqa: UP007
    failures: Failures = Field(default_factory=Failures)
    seed: int = Field(0, ge=0, description="trials' seed and the TPE sampler's seed")


def json_schema() -> dict[str, Any]:
    """The sweep spec's JSON Schema (draft 2020-12)."""
    schema = SweepSpecModel.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    return schema


# ---------------------------------------------------------------------------------------------- scalar checks
# `kdtune.spec` checks each scalar field of a spec through the field of these models (type and bounds), so the
# schema an editor sees and the validator a sweep runs hold one definition of each field.
SECTIONS: dict[str, type[BaseModel]] = {
    "": SweepSpecModel, "budget": Budget, "scheduler": Scheduler, "failures": Failures, "tracking": Tracking,
    "teacher": Teacher, "methods": MethodOptions,
}  # fmt: skip
_BOUNDS = {"ge": (">=", "["), "gt": (">", "("), "le": ("<=", "]"), "lt": ("<", ")")}


def field_of(where: str, key: str):
    """The pydantic FieldInfo of ``<where><key>`` (``where`` like ``budget.`` or ``methods.dkd.``)."""
    section = where.split(".", 1)[0] if where else ""
    return SECTIONS[section].model_fields[key]


def bounds(info) -> dict[str, float]:
    """``{"ge": 1, "le": 100}`` of a field's numeric constraints."""
    out = {}
    for m in info.metadata:
        for name in _BOUNDS:
            if getattr(m, name, None) is not None:
                out[name] = getattr(m, name)
    return out


def range_text(b: dict[str, float]) -> str:
    lo = next(((k, v) for k, v in b.items() if k in ("ge", "gt")), None)
    hi = next(((k, v) for k, v in b.items() if k in ("le", "lt")), None)
    if lo and hi:
        return f"in {_BOUNDS[lo[0]][1]}{lo[1]:g}, {hi[1]:g}{_BOUNDS[hi[0]][1]}"
    k, v = lo or hi  # type: ignore[misc]
    return f"{_BOUNDS[k][0]} {v:g}"


def check_scalar(where: str, key: str, value: Any, kind: type, hi: float | None = None) -> Any:
    """``value`` of field ``<where><key>`` checked by pydantic against the field's type ``kind`` (bool, int,
    float or str, strictly: no "3" for 3, no true for 1) and its bounds (``hi`` tightens the upper one);
    raises ConfigError in one line naming the field. Integer-valued floats count as integers (YAML ``8.0``)."""
    from typing import Annotated

    from pydantic import AllowInfNan, Strict, TypeAdapter, ValidationError

    from kdtune.errors import ConfigError

    name = f"{where}{key}"
    info = field_of(where, key)
    b = bounds(info)
    if hi is not None:
        b.pop("lt", None)
        b["le"] = min(hi, b.get("le", hi))
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    extra: list[Any] = [Strict()]
    if kind is float:
        extra.append(AllowInfNan(False))
    adapter = TypeAdapter(Annotated[(kind, *extra, Field(**b))])  # type: ignore[valid-type]
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        err = e.errors()[0]["type"]
        if err in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            shown = f"{value:g}" if kind is float else value
            raise ConfigError(f"{name}={shown} is out of range; it must be {range_text(b)}") from None
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        raise ConfigError(f"{name}={value!r} must be {what}") from None
