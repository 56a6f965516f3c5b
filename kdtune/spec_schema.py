"""The sweep spec's JSON Schema (``kdtune validate --schema``) and the check of one of its scalar fields, both
read from the one declaration of the spec's fields in :mod:`kdtune.spec_model`.

An editor given the schema (YAML language server: ``# yaml-language-server: $schema=kdtune-sweep.schema.json``
at the top of a spec, or VS Code's ``yaml.schemas``) completes field names, shows each field's meaning, default
and bounds, and flags a wrong type, an unknown field or a name that is not registered. The schema's models are
derived from the declaration: each field keeps its default, bounds and description, and only the forms a YAML
file may use instead of the resolved type are added (``students: resnet8``, ``teacher: path.pt``,
``scheduler: asha``, ``methods: [kd, dkd]``...). :func:`kdtune.spec.load_spec` remains the validator a sweep
runs (it also checks what a schema cannot: a method's hyperparameter ranges, the teacher checkpoint's
architecture, the starting points); a spec it accepts validates against this schema (tested on the shipped
``sweeps/``). Importing this module imports pydantic, not torch.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    create_model,
)
from pydantic.fields import FieldInfo

from kdtune.config import (
    AMP_MODES,
    CHOICES,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    TrainConfig,
    read_word,
    word_booleans,
)
from kdtune.errors import ConfigError, did_you_mean
from kdtune.names import METHOD_NAMES, MODEL_NAMES
from kdtune.spec_model import (
    RANGE_KEYS,
    SCHEDULERS,
    SECTIONS,
    SWEEP_OWNED,
    Budget,
    FailureSpec,
    MethodSpec,
    Override,
    SchedulerSpec,
    SweepSpec,
    TeacherSpec,
    TrackingSpec,
    default_of,
    fields_of,
)

SCHEMA_ID = "https://kdtune.invalid/schemas/sweep-spec.json"
Model = Literal[MODEL_NAMES]  # type: ignore[valid-type]
Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]
Scalar = Union[float, int, str, bool]  # noqa: UP007 - a union the schema spells out
_FORBID = ConfigDict(extra="forbid")


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
    return create_model(name, __config__=_FORBID, __doc__=doc, **fields)


def _written(title: str, cls: type, /, keep: tuple[str, ...] | None = None, drop: tuple[str, ...] = (),
             config: ConfigDict = _FORBID, **forms: Any) -> type[BaseModel]:  # fmt: skip
    """A model of what a spec may write for the part ``cls``: each declared field with its default, bounds and
    description; ``forms`` give the type a field may be written as where it differs from the resolved one (a
    type, or ``(type, default)`` where the default differs too: ``name`` is the file's name when left out)."""
    fields: dict[str, Any] = {}
    for key, info in fields_of(cls).items():
        if key in drop or (keep is not None and key not in keep):
            continue
        form = forms.get(key, info.annotation)
        if isinstance(form, tuple):  # (type, default); a default of ... makes the field required as written
            form, default = form
            info = ... if default is ... else FieldInfo.merge_field_infos(info, default=default, default_factory=None)
        fields[key] = (form, info)
    return create_model(title, __config__=config, __doc__=cls.__doc__, **fields)


@functools.cache
def input_model() -> type[BaseModel]:
    """The model of a spec as written (``SweepSpecModel``), whose JSON Schema is the spec's."""
    Range = _written("Range", Override, keep=RANGE_KEYS, low=(float, ...), high=(float, ...), step=float | None)
    Range.__doc__ = "A searched range of a hyperparameter."
    MethodOptions = _written("MethodOptions", MethodSpec, drop=("name",),
                             space=dict[str, Union[Range, list[Scalar], Scalar]])  # type: ignore[valid-type]  # noqa: UP007
    stage_fields = _train_model(
        "StageTrainFields", tuple(k for k in SWEEP_OWNED if k != "epochs"), "TrainConfig fields of a stage"
    )
    trial_fields = _train_model("TrainFields", SWEEP_OWNED, "TrainConfig fields shared by every trial")
    Teacher = _written("Teacher", TeacherSpec, model=Model | None, train=stage_fields, students=Union[list[Model], Model, None])  # noqa: UP007
    Scheduler = _written("Scheduler", SchedulerSpec)
    Tracking = _written("Tracking", TrackingSpec)
    return _written(
        "SweepSpecModel", SweepSpec, drop=("source",), config=ConfigDict(extra="forbid", title="kdtune sweep spec"),
        name=(str | None, None), storage=str | None, students=Union[list[Model], Model],  # noqa: UP007
        methods=Union[list[Method], Method, dict[Method, Union[MethodOptions, None]]],  # type: ignore[valid-type]  # noqa: UP007
        teacher=Union[Teacher, str, None], teachers=list[Teacher] | None, budget=_written("Budget", Budget),  # type: ignore[valid-type]  # noqa: UP007
        scheduler=(Union[Scheduler, Literal[SCHEDULERS], None], None),  # type: ignore[valid-type]  # noqa: UP007
        tracking=(Union[Tracking, bool, str, None], None), failures=_written("Failures", FailureSpec),  # noqa: UP007
        train=trial_fields, ce_student=trial_fields,
    )  # fmt: skip


def json_schema() -> dict[str, Any]:
    """The sweep spec's JSON Schema (draft 2020-12)."""
    schema = input_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    return schema


# ---------------------------------------------------------------------------------------------- scalar checks
# `kdtune.spec` reads each scalar field of a spec through its declared field (default, type and bounds), so the
# schema an editor sees and the validator a sweep runs hold one definition of each field.
_BOUNDS = {"ge": (">=", "["), "gt": (">", "("), "le": ("<=", "]"), "lt": ("<", ")")}


def field_of(where: str, key: str) -> FieldInfo:
    """The declared field ``<where><key>`` (``where`` like ``budget.`` or ``methods.dkd.``)."""
    section = where.split(".", 1)[0] if where else ""
    return fields_of(SECTIONS[section])[key]


def bounds(info: FieldInfo) -> dict[str, float]:
    """``{"ge": 1, "le": 100}`` of a field's numeric constraints (those of a bounded member of a union too:
    ``budget.fuse`` is an integer in [1, 64] or 'auto')."""
    metadata = list(info.metadata)
    for arg in get_args(info.annotation):
        if get_origin(arg) is Annotated:
            metadata += [m for a in get_args(arg)[1:] for m in getattr(a, "metadata", [a])]
    return {name: getattr(m, name) for m in metadata for name in _BOUNDS if getattr(m, name, None) is not None}


def range_text(b: dict[str, float]) -> str:
    lo = next(((k, v) for k, v in b.items() if k in ("ge", "gt")), None)
    hi = next(((k, v) for k, v in b.items() if k in ("le", "lt")), None)
    if lo and hi:
        return f"in {_BOUNDS[lo[0]][1]}{lo[1]:g}, {hi[1]:g}{_BOUNDS[hi[0]][1]}"
    k, v = lo or hi  # type: ignore[misc]
    return f"{_BOUNDS[k][0]} {v:g}"


def in_bounds(value: Any, b: dict[str, float]) -> bool:
    """``value`` is a number (not a bool) within the bounds ``b`` (:func:`bounds`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return all({"ge": value >= v, "gt": value > v, "le": value <= v, "lt": value < v}[k] for k, v in b.items())


def scalar_kind(info: FieldInfo) -> type | None:
    """bool, int, float or str: what a field holds (a Literal's words are strings; None may be allowed besides)."""
    t = info.annotation
    args = [a for a in get_args(t) if a is not type(None)] if get_origin(t) in (Union, types.UnionType) else [t]
    if len(args) == 1 and get_origin(args[0]) is Literal:
        args = [type(get_args(args[0])[0])]
    return args[0] if len(args) == 1 and args[0] in (bool, int, float, str) else None


def check_scalar(where: str, key: str, value: Any, kind: type | None = None, hi: float | None = None) -> Any:
    """``value`` of field ``<where><key>`` checked by pydantic against the field's type ``kind`` (bool, int,
    float or str, strictly: no "3" for 3, no true for 1; the declared one when not given) and its declared bounds
    (``hi`` tightens the upper one); raises ConfigError in one line naming the field. Integer-valued floats count
    as integers (YAML ``8.0``)."""
    name = f"{where}{key}"
    info = field_of(where, key)
    kind = kind or scalar_kind(info)
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
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]  # type: ignore[index]
        raise ConfigError(f"{name}={value!r} must be {what}") from None


def read_field(where: str, raw: dict, key: str, hi: float | None = None) -> Any:
    """Scalar field ``<where><key>`` of a spec section ``raw``: its declared default when absent, None where the
    field may be null, else the value checked (:func:`check_scalar`)."""
    info = field_of(where, key)
    value = raw.get(key, info.get_default(call_default_factory=True))
    if value is None and not info.is_required() and info.default is None:  # a field that may be null
        return None
    kind = scalar_kind(info)
    out = check_scalar(where, key, value, kind, hi=hi)
    return kind(out) if kind in (int, float) else out


# ---------------------------------------------------------------------------------------------- spaces, train
# What a field's declaration cannot say: a method space's values are checked against the method's declared
# hyperparameters or TrainConfig's fields, and `train:` sections against TrainConfig.


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
        unknown = set(v) - set(RANGE_KEYS)
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
        log = bool(v.get("log", default_of(Override, "log")))
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0 (got {low})")
        step, step_bounds = v.get("step"), bounds(fields_of(Override)["step"])
        if step is not None and (not in_bounds(step, step_bounds) or log):
            raise ConfigError(f"{where}.step must be a number {range_text(step_bounds)} and cannot be combined with "
                              "log: true")  # fmt: skip
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


def train_fields(where: str, raw: Any, TrainConfig, allow_epochs: bool = False) -> dict:
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


def check_trial_configs(spec: SweepSpec, TrainConfig) -> None:
    """Build one TrainConfig per group (method defaults) so a bad `train:` value fails now, naming the field.

    Fixed hyperparameters are checked one by one (:func:`parse_override`); their combination with the others is
    not decided here, with the method's defaults standing in for searched values (``lambda_min: 60`` fails
    beside the default ``lambda_max`` 50, while the space searches lambda_max up to 1000): it is decided with the
    space, which knows what each parameter may be (:func:`kdtune.tune.spaces.build_space`, run by ``kdtune
    validate`` and ``kdtune sweep``). A config that fails without the fixed hyperparameters fails here."""
    placeholder = "<teacher stage>"
    for student, method in dict.fromkeys((g.student, g.method) for g in spec.groups()):  # once per pair
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
    for t in spec.teacher_list():
        if not t.is_stage:
            continue
        try:
            TrainConfig.from_dict(spec.teacher_stage_config(t))
        except ConfigError as e:
            raise ConfigError(f"teacher stage{' ' + t.name if t.name else ''}: {e}") from None
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
