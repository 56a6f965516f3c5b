"""The configuration of one training run: ``TrainConfig``, parsed from ``key=value`` words and YAML.

Everything a run depends on is a field here, so a config fully defines a run (and its result.json records
it resolved). Method hyperparameters live in ``hp``; on the command line they are written either bare
(``T=4``) or prefixed with the method (``kd.T=4``), and are type- and range-checked by the method's
declared :class:`~kdtune.losses.base.HParam`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdtune.errors import ConfigError, did_you_mean
from kdtune.names import check_name

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "bf16", "off")
TEACHER_STORE_MODES = ("auto", "on", "off")  # kdtune.engine.teacher_store
PRESETS = ("crd", "hsakd", "hsakd_heads")
# Students that the CRD recipe trains at lr 0.01 instead of 0.05 (HSAKD's student script too: --init-lr 0.01).
_CRD_LOW_LR = ("mobilenetv2", "shufflev1", "shufflev2")
# HSAKD's recipes (winycg/HSAKD): the student's (train_student_cifar.sh: CRD's schedule, Nesterov) and the frozen
# teacher's heads (train_teacher_freezed.sh: 100 epochs, x0.1 at 30/60/90, Nesterov). Their milestones are these
# fractions of the epochs, so that a shorter run (epochs=30) keeps the schedule's shape.
_HSAKD_EPOCHS = 240
_HSAKD_MILESTONES = (150 / 240, 180 / 240, 210 / 240)
_HSAKD_HEADS_EPOCHS = 100
_HSAKD_HEADS_MILESTONES = (0.3, 0.6, 0.9)
DEVICE_RE = r"auto|cpu|cuda(:\d+)?|mps"
# The one check of each field's value (TrainConfig.validate) and what `kdtune train --help` shows of it.
NAMED = {"data": "data set", "model": "model", "teacher_model": "model", "method": "method"}
RANGES = {
    "epochs": (lambda v, c: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v, c: v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v, c: v >= 1, "an integer >= 1"),
    "lr": (lambda v, c: v > 0 and math.isfinite(v), "a number > 0"),
    "momentum": (lambda v, c: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v, c: v >= 0, "a number >= 0"),
    "val_fraction": (lambda v, c: 0 <= v < 1, "in [0, 1)"),
    "lr_decay": (lambda v, c: 0 < v <= 1, "in (0, 1]"),
    "warmup_epochs": (lambda v, c: 0 <= v < c.epochs, "in [0, epochs)"),
    "save_every": (lambda v, c: v >= 0, "an integer >= 0"),
    "num_workers": (lambda v, c: v >= 0, "an integer >= 0"),
    "seed": (lambda v, c: v >= 0, "an integer >= 0"),
    "data_seed": (lambda v, c: v >= 0, "an integer >= 0"),
}
CHECKPOINT_FIELDS = ("teacher", "init")
# Fields whose value is one of a few words. A field whose words include "off" or "on" (amp today) is a word
# switch: see read_word.
CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "amp": AMP_MODES, "preset": PRESETS,
           "teacher_store": TEACHER_STORE_MODES}
# The word each YAML boolean stands for in a word switch. YAML 1.1 (PyYAML: `key=value` words on the command
# line, --config files and sweep specs alike) reads an unquoted off/no/false (any case) as False and
# on/yes/true as True, so `amp=off` arrives as False and `amp=no`, `amp=false` arrive the same way.
BOOL_WORDS = {False: "off", True: "on"}


@dataclass
class TrainConfig:
    # data
    data: str = "digits"
    data_root: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    data_seed: int = 0
    augment: bool = True
    # models
    model: str = "resnet8"
    teacher: str | None = None  # checkpoint path or URL
    teacher_model: str | None = None  # architecture of the teacher; default: read from the checkpoint
    init: str | None = None  # warm-start checkpoint for the student (DiSK needs a CE-trained one)
    # objective
    method: str = "ce"
    hp: dict = field(default_factory=dict)
    # optimisation
    preset: str | None = None
    epochs: int = 30
    batch_size: int = 64
    eval_batch_size: int = 1024
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list = field(
        default_factory=list
    )  # epochs at which a step schedule multiplies lr by lr_decay
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    # execution
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 4  # folder data sets only
    # the teacher's outputs per training view, computed once and read by every run that shares them
    # (kdtune.engine.teacher_store): on, off, or auto (on where a store folder is given and the disk holds it)
    teacher_store: str = "auto"
    teacher_store_dir: str | None = None  # default for teacher_store=on: ~/.cache/kdtune/teacher-store
    # output
    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    save_every: int = 1  # epochs between resumable state checkpoints (0: only at the end)

    # ------------------------------------------------------------------ construction
    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_help(cls) -> list[str]:
        """One line per field: name, type, default and valid values (``kdtune train --help``)."""
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            if f.name in NAMED:
                valid = f"a {NAMED[f.name]} name (`kdtune {'data' if f.name == 'data' else NAMED[f.name] + 's'}`)"
            elif f.name in RANGES:
                valid = RANGES[f.name][1]
            elif f.name in CHOICES:
                valid = "one of " + ", ".join(CHOICES[f.name])
            elif f.name == "device":
                valid = "auto, cpu, cuda, cuda:N or mps"
            elif f.name == "hp":
                valid = "the method's hyperparameters (`kdtune methods <method>`)"
            elif f.name == "milestones":
                valid = "increasing epochs in (0, epochs)"
            elif f.name in CHECKPOINT_FIELDS:
                valid = "a checkpoint file, run directory or http(s) URL"
            elif isinstance(default, bool):
                valid = "true or false"
            elif f.name in ("out", "data_root"):
                valid = "a directory"
            else:
                valid = ""
            shown = "none" if default is None else json.dumps(default).strip('"')
            lines.append(f"  {f.name:<16} {str(f.type):<12} default {shown:<8} {valid}".rstrip())
        return lines

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build and validate a config from a flat dict (``hp`` may be a nested dict).

        Keys that are not fields are method hyperparameters (bare, or prefixed ``<method>.``). A ``preset``
        fills the fields the dict does not set.
        """
        d = dict(d)
        hp = dict(d.pop("hp", None) or {})
        method = str(d.get("method", cls.method))
        names = set(cls.fields())
        plain: dict[str, Any] = {}
        for k, v in d.items():
            if k in names:
                plain[k] = v
            elif "." in k:
                prefix, _, name = k.partition(".")
                if prefix != method:
                    raise ConfigError(
                        f"{k}={v!r} sets a hyperparameter of method {prefix!r} but method={method}; "
                        f"write {method}.{name}=... or method={prefix}"
                    )
                hp[name] = v
            else:
                hp[k] = v
        preset = plain.get("preset")
        if preset is not None:
            for k, v in preset_values(str(preset), str(plain.get("model", cls.model)), plain.get("epochs")).items():
                plain.setdefault(k, v)
        cfg = cls(**plain, hp=hp)
        cfg.validate(known_keys=names)
        return cfg

    @classmethod
    def from_args(cls, words: list[str], config_file: str | Path | None = None) -> TrainConfig:
        """``--config file.yaml`` (optional) overlaid with ``key=value`` words."""
        base: dict[str, Any] = {}
        if config_file is not None:
            base = load_yaml_mapping(config_file)
        base.update(parse_overrides(words))
        return cls.from_dict(base)

    # ------------------------------------------------------------------ validation
    def validate(self, known_keys: set[str] | None = None) -> None:
        """Check every field; the names, ranges and choices first (without importing torch, so a bad value
        is refused at once), then the method's hyperparameters and needs (this imports the methods)."""
        self._coerce()
        for name, kind in NAMED.items():
            if getattr(self, name) is not None:
                check_name(kind, getattr(self, name))
        for name, (ok, valid) in RANGES.items():
            _require(ok(getattr(self, name), self), name, getattr(self, name), valid)
        for name, choices in CHOICES.items():
            if name != "preset" or self.preset is not None:
                _choice(name, getattr(self, name), choices)
        for m in self.milestones:
            _require(
                0 < m < self.epochs, "milestones", self.milestones, "epochs strictly between 0 and epochs"
            )
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones={self.milestones} must be increasing")
        if not re.fullmatch(DEVICE_RE, self.device):
            raise ConfigError(f"device={self.device!r} is not valid; use auto, cpu, cuda or cuda:N")
        if self.resume and self.overwrite:
            raise ConfigError("resume=true and overwrite=true contradict each other; pass one of them")

        from kdtune.losses import METHODS

        method_cls = METHODS.get(self.method)
        unknown = sorted(set(self.hp) - set(method_cls.hparams))
        if unknown:
            k = unknown[0]
            valid_fields = sorted(known_keys or self.fields())
            hint = did_you_mean(k, valid_fields + sorted(method_cls.hparams))
            raise ConfigError(
                f"unknown setting {k!r}{hint}: it is neither a config field nor a hyperparameter of method "
                f"{self.method!r} (its hyperparameters: {', '.join(sorted(method_cls.hparams)) or 'none'}); "
                "see `kdtune train --help` and `kdtune methods`"
            )
        self.hp = method_cls.resolve(self.hp)
        if method_cls.needs_teacher and not self.teacher:
            raise ConfigError(
                f"method {self.method!r} needs a teacher: pass teacher=<checkpoint>, e.g. one trained with "
                f"`kdtune train method=ce model=<teacher> out=runs/teacher` (then teacher=runs/teacher)"
            )
        if method_cls.needs_init and not self.init:
            raise ConfigError(
                f"method {self.method!r} needs a CE-trained student to start from: run `kdtune train method=ce "
                f"model={self.model} data={self.data} out=runs/ce-student` and pass init=runs/ce-student"
            )

    def _coerce(self) -> None:
        """Convert values from YAML/CLI strings to the declared types, naming the field on failure."""
        for f in dataclasses.fields(self):
            if f.name == "hp":
                if not isinstance(self.hp, dict):
                    raise ConfigError(f"hp must be a mapping of hyperparameters, got {self.hp!r}")
                continue
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            try:
                if f.name in CHOICES:
                    v = read_word(v, CHOICES[f.name])  # amp=off: YAML's False back to "off"
                if f.name == "milestones":
                    if isinstance(v, str):
                        v = [x for x in re.split(r"[,\s]+", v.strip("[]() ")) if x]
                    v = [int(x) for x in (v or [])]
                elif v is None or (isinstance(v, str) and v.lower() in ("none", "null") and default is None):
                    v = None
                elif isinstance(default, bool):
                    v = _to_bool(v)
                elif isinstance(default, int):
                    if isinstance(v, float) and not v.is_integer():
                        raise ValueError
                    v = int(v)
                elif isinstance(default, float):
                    v = float(v)
                elif isinstance(v, bool) and f.name in CHOICES:
                    pass  # a boolean with no word here (amp=on): _choice refuses it as written
                elif isinstance(v, (int, float)) and f.type in ("str | None", "str"):
                    v = str(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{f.name}={v!r} has the wrong type; expected {f.type}") from None
            setattr(self, f.name, v)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hp"] = dict(self.hp)
        return d

    def identity(self) -> dict[str, Any]:
        """The fields that define the computation (not where it is written or whether it resumes)."""
        d = self.to_dict()
        for k in ("out", "overwrite", "resume", "save_every", "num_workers", "device", "eval_batch_size",
                  "teacher_store", "teacher_store_dir"):  # the store changes no output bit
            d.pop(k)
        if d.get("hp"):
            d["hp"] = identity_hp(self.method, d["hp"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def identity_hp(method: str, hp: dict[str, Any]) -> dict[str, Any]:
    """``hp`` less each hyperparameter added to the method later (``HParam.added``) that holds its default: the
    identity a run had before it existed (its stage key, its resume check)."""
    from kdtune.losses import METHODS

    declared = METHODS.get(method).hparams
    return {k: v for k, v in hp.items()
            if not (k in declared and declared[k].added and v == declared[k].default)}  # fmt: skip


def scaled_milestones(epochs: int, fractions) -> list[int]:
    """The epochs at ``fractions`` of ``epochs`` (rounded), strictly inside (0, epochs), increasing, distinct:
    a recipe's step schedule at another length (100 epochs, (0.3, 0.6, 0.9): 30, 60, 90; 10 epochs: 3, 6, 9)."""
    out: list[int] = []
    for f in fractions:
        m = int(math.floor(f * epochs + 0.5))
        if 0 < m < epochs and (not out or m > out[-1]):
            out.append(m)
    return out


def preset_values(name: str, model: str, epochs: Any = None) -> dict[str, Any]:
    """Named recipes. ``crd``: the CIFAR-100 benchmark recipe of CRD/RepDistiller used by most KD tables.
    ``hsakd``: HSAKD's student recipe (CRD's, with Nesterov momentum); ``hsakd_heads``: HSAKD's frozen-teacher
    heads (100 epochs, x0.1 at 30/60/90, Nesterov). The two HSAKD recipes place their milestones at the same
    fractions of ``epochs`` when a run sets it (``epochs`` as the config gives it, None when it does not)."""
    if name in ("hsakd", "hsakd_heads"):
        heads = name == "hsakd_heads"
        default = _HSAKD_HEADS_EPOCHS if heads else _HSAKD_EPOCHS
        try:
            n = int(epochs) if epochs is not None else default
        except (TypeError, ValueError):
            n = default  # the field's own check names the bad value
        return {
            "epochs": default,
            "batch_size": 64,
            "optimizer": "sgd",
            "lr": 0.01 if (model in _CRD_LOW_LR and not heads) else 0.05,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "schedule": "step",
            "milestones": scaled_milestones(n, _HSAKD_HEADS_MILESTONES if heads else _HSAKD_MILESTONES),
            "lr_decay": 0.1,
            "warmup_epochs": 0.0,
        }
    if name == "crd":
        return {
            "epochs": 240,
            "batch_size": 64,
            "optimizer": "sgd",
            "lr": 0.01 if model in _CRD_LOW_LR else 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "step",
            "milestones": [150, 180, 210],
            "lr_decay": 0.1,
            "warmup_epochs": 0.0,
        }
    raise ConfigError(
        f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; valid presets: {', '.join(PRESETS)}"
    )


def parse_overrides(words: list[str]) -> dict[str, Any]:
    """``["epochs=5", "kd.T=4"]`` -> ``{"epochs": 5, "kd.T": 4}`` with YAML scalar typing of values."""
    out: dict[str, Any] = {}
    for w in words:
        if "=" not in w or w.startswith("="):
            raise ConfigError(f"cannot read {w!r}: settings are written key=value, e.g. epochs=30")
        k, _, v = w.partition("=")
        try:
            val = yaml.safe_load(v) if v != "" else None
        except yaml.YAMLError:
            val = v
        out[k.strip()] = val
    return out


def read_text_file(path: str | Path, what: str = "config file", hint: str = "check the path") -> str:
    """The UTF-8 text of a file; a missing, unreadable or non-UTF-8 file, or a directory, raises ConfigError
    in one line naming the file as ``what`` and the fix (a missing one with ``hint``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{what} {str(p)!r} is a directory, not a file; pass the YAML file itself")
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} does not exist; {hint}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {str(p)!r} ({e.strerror or e}); check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} {str(p)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
            "pass a YAML text file, saved as UTF-8"
        ) from None


def load_yaml_mapping(
    path: str | Path, what: str = "config file", hint: str = "check the path"
) -> dict[str, Any]:
    """The mapping a YAML file holds (``{}`` for an empty file); a missing, unreadable or non-UTF-8 file,
    bad YAML or another kind of value raises :class:`ConfigError` naming the file as ``what`` (a missing
    one with ``hint``) and, for bad YAML, the line."""
    p = Path(path).expanduser()
    text = read_text_file(p, what, hint)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None)
        raise ConfigError(
            f"{what} {str(p)!r} is not valid YAML{where}" + (f" ({problem})" if problem else "")
            + "; fix its syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must be a mapping of key: value, not a {type(data).__name__}")
    return data


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    raise ValueError


def read_word(value: Any, choices: tuple[str, ...]) -> Any:
    """``value`` of a field whose valid values are the words ``choices``, with a YAML boolean read back as the
    word it was written as: False as "off" where "off" is a choice, True as "on" where "on" is one.

    YAML cannot tell ``off`` from ``no`` or ``false``, so each of them means "off" (and on/yes/true "on").
    Any other value, a boolean with no word among the choices included, is returned as it is, for
    :func:`_choice` to refuse. Keyed on the choices alone: any field listed in :data:`CHOICES` with an
    on/off word (e.g. a future ``teacher_store: auto | on | off``) reads its words from YAML the same way.
    """
    if isinstance(value, bool) and BOOL_WORDS[value] in choices:
        return BOOL_WORDS[value]
    return value


def word_booleans(choices: tuple[str, ...]) -> tuple[bool, ...]:
    """The YAML booleans a field with these word choices accepts in place of a word (for a schema)."""
    return tuple(b for b, word in BOOL_WORDS.items() if word in choices)


def _require(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value} is out of range; it must be {valid}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if isinstance(value, bool) or value not in choices:
        # a boolean is a YAML word (amp=on): name the words it may have been written as
        shown = ("on/yes/true" if value else "off/no/false") if isinstance(value, bool) else repr(value)
        raise ConfigError(
            f"{name}={shown} is not valid{did_you_mean(value, choices)}; choose one of {', '.join(choices)}"
        )


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


def as_config(cfg: TrainConfig | dict | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a dict or nothing, with ``overrides`` applied."""
    if cfg is None:
        return TrainConfig.from_dict(overrides)
    if isinstance(cfg, TrainConfig):
        return cfg.replace(**overrides) if overrides else cfg
    if isinstance(cfg, dict):
        return TrainConfig.from_dict({**cfg, **overrides})
    raise ConfigError(f"expected a TrainConfig or a dict, got {type(cfg).__name__}")
