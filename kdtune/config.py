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

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "bf16", "off")
PRESETS = ("crd",)
# Students that the CRD recipe trains at lr 0.01 instead of 0.05.
_CRD_LOW_LR = ("mobilenetv2", "shufflev1", "shufflev2")


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
            for k, v in preset_values(str(preset), str(plain.get("model", cls.model))).items():
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
        from kdtune.data import DATASETS
        from kdtune.losses import METHODS
        from kdtune.models import MODELS

        self._coerce()
        DATASETS.get(self.data)
        MODELS.get(self.model)
        if self.teacher_model is not None:
            MODELS.get(self.teacher_model)
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
        _require(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a number > 0")
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        _require(0 < self.lr_decay <= 1, "lr_decay", self.lr_decay, "in (0, 1]")
        _require(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", self.warmup_epochs, "in [0, epochs)")
        _require(self.save_every >= 0, "save_every", self.save_every, "an integer >= 0")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("amp", self.amp, AMP_MODES)
        if self.preset is not None:
            _choice("preset", self.preset, PRESETS)
        for m in self.milestones:
            _require(
                0 < m < self.epochs, "milestones", self.milestones, "epochs strictly between 0 and epochs"
            )
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones={self.milestones} must be increasing")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"device={self.device!r} is not valid; use auto, cpu, cuda or cuda:N")
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
        if self.resume and self.overwrite:
            raise ConfigError("resume=true and overwrite=true contradict each other; pass one of them")

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
        for k in ("out", "overwrite", "resume", "save_every", "num_workers", "device", "eval_batch_size"):
            d.pop(k)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def preset_values(name: str, model: str) -> dict[str, Any]:
    """Named recipes. ``crd``: the CIFAR-100 benchmark recipe of CRD/RepDistiller used by most KD tables."""
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


def load_yaml_mapping(
    path: str | Path, what: str = "config file", hint: str = "check the path"
) -> dict[str, Any]:
    """The mapping a YAML file holds (``{}`` for an empty file); a missing file, bad YAML or another kind of
    value raises :class:`ConfigError` naming the file as ``what`` (a missing one with ``hint``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist; {hint}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML{where}; fix its syntax") from None
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


def _require(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value} is out of range; it must be {valid}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(
            f"{name}={value!r} is not valid{did_you_mean(value, choices)}; choose one of {', '.join(choices)}"
        )


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
