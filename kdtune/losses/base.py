"""The contract between the engine and a distillation method.

A method lives in one file of ``kdtune/losses/``: a pure loss function of tensors (the formula, paper and
equation in its docstring) and a small :class:`Method` subclass that the engine drives. The subclass is
registered once with ``@register_method`` and declares its hyperparameters with :class:`HParam`, which gives
``kdtune methods`` its listing and the config parser its range checks.

The engine calls, in order: ``Method(hparams, ctx)`` (``ctx`` a :class:`MethodContext`),
``trainable_modules()`` (trained by the student's optimiser), ``setup()`` (fresh runs only), then per epoch
``on_epoch_start(epoch)``, per step ``losses(out)`` (a dict of *already weighted* scalar terms, which the
engine sums and back-propagates) and ``epoch_metrics()`` (logged as ``method_<name>``); ``state_dict()`` /
``load_state_dict()`` hold all state but the trainable modules'. What a method needs it declares in class
flags (``needs_*``) and finds in :class:`StepOutputs` and ``ctx``; its randomness comes from
``self.generator(epoch, step)``; losses run in fp32 under autocast (``with fp32():``).
More: docs/methods.md §The method contract (every call and flag in detail).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.registry import Registry


@dataclass(frozen=True)
class HParam:
    """A method hyperparameter: default, type and valid range.

    ``low``/``high`` bound the value; ``low_open``/``high_open`` make a bound strict (``0 < T``).
    ``choices`` restricts to a set. ``doc`` says what the value weighs or controls. ``added``: the date a
    hyperparameter was added to an existing method; while it holds its default, a run's identity leaves it out
    (``TrainConfig.identity``), so stages and runs keyed before it existed keep their keys and resume.
    """

    default: Any
    doc: str
    type: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    added: str | None = None

    def range_text(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        if self.type is bool:
            return "{true, false}"
        if self.type not in (int, float):
            return self.type.__name__
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def check(self, name: str, value: Any, method: str) -> Any:
        """Coerce ``value`` to the declared type and check its range; raise ConfigError naming the field."""
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                v: Any = value.lower() in ("true", "1", "yes", "on")
            elif self.type is bool:
                v = bool(value)
            elif value is None and self.default is None:
                return None
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{method}.{name}={value!r} is not a {self.type.__name__}; valid range {self.range_text()}"
            ) from None
        if self.choices is not None:
            if v not in self.choices:
                raise ConfigError(f"{method}.{name}={v!r} is not one of {self.range_text()}")
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            bad = isinstance(v, float) and math.isnan(v)
            if self.low is not None:
                bad |= v <= self.low if self.low_open else v < self.low
            if self.high is not None:
                bad |= v >= self.high if self.high_open else v > self.high
            if bad:
                raise ConfigError(f"{method}.{name}={v} is out of range; valid range {self.range_text()}")
        return v


@dataclass(frozen=True)
class StageShapes:
    """The per-sample shapes of a model's :class:`~kdtune.models.common.Stages` (no batch dimension)."""

    stem: tuple[int, ...]
    post: tuple[tuple[int, ...], ...]
    pre: tuple[tuple[int, ...], ...]
    pooled: int


def probe_stage_shapes(model: nn.Module, in_channels: int, image_size: int, device) -> StageShapes:
    """The stage shapes of ``model`` on inputs of this data's shape, probed as RepDistiller does (two images,
    eval mode) but touching nothing a lone run would notice: no BatchNorm statistics change (eval mode, the
    training mode restored), no global RNG is drawn from (a batch of zeros), no gradient is kept. A model
    without stages raises its one-line ConfigError."""
    from kdtune.models.common import no_stages_error

    if not getattr(model, "has_stages", False):
        raise no_stages_error(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(2, in_channels, image_size, image_size, device=device)
            _, st = model.forward_stages(x)
    finally:
        model.train(was)
    return StageShapes(stem=tuple(st.stem.shape[1:]), post=tuple(tuple(t.shape[1:]) for t in st.post),
                       pre=tuple(tuple(t.shape[1:]) for t in st.pre), pooled=int(st.pooled.shape[1]))  # fmt: skip


@contextlib.contextmanager
def fp32():
    """Full fp32 for a loss computed on ``.float()`` inputs: autocast off (CUDA and CPU), and on a GPU TF32 off
    for matmuls and convolutions (the engine turns it on for the networks; a Gram matrix in TF32 is 1e-3 off,
    times SP's 3000). Feature losses with eps of 1e-7, Gram expansions and exponentials are meaningless in
    bf16. The legacy TF32 flags are used: mixing them with the newer precision API raises in this torch."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass
class MethodContext:
    """What a method may know about the run it is part of."""

    num_classes: int
    epochs: int
    steps_per_epoch: int
    device: torch.device
    student: nn.Module
    teacher: nn.Module | None = None
    student_feat_dim: int | None = None
    teacher_feat_dim: int | None = None
    # Yields (images, targets) of the training split, normalised, on the device, without augmentation.
    train_batches: Callable[[], Iterator[tuple[Tensor, Tensor]]] | None = None
    # Student error (fraction in [0, 1]) of the CE-trained warm-start checkpoint, when one was given.
    init_error: float | None = None
    extra: dict = field(default_factory=dict)
    # Stage shapes (methods with needs_*_stages), probed before the method exists.
    student_stages: StageShapes | None = None
    teacher_stages: StageShapes | None = None
    # The training split (methods with needs_indices): its size and labels on the device.
    num_train: int | None = None
    train_targets: Tensor | None = None
    seed: int = 0  # the run's seed: Method.generator draws from (seed, epoch, step)


@dataclass
class StepOutputs:
    """Everything a method's ``losses`` sees for one training step. Logits are float32."""

    student_logits: Tensor
    targets: Tensor
    epoch: int
    step: int
    teacher_logits: Tensor | None = None
    student_features: Tensor | None = None
    teacher_features: Tensor | None = None
    images: Tensor | None = None
    student_stages: Any = None  # kdtune.models.common.Stages (needs_student_stages), with its graph
    teacher_stages: Any = None  # the teacher's (needs_teacher_stages), detached
    indices: Tensor | None = None  # int64 indices into the training split (needs_indices)


class Method:
    """Base class of every objective: teacher objectives (ce, ls, mse) and distillation methods."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    needs_student_features: ClassVar[bool] = False
    needs_teacher_features: ClassVar[bool] = False
    needs_student_stages: ClassVar[bool] = False
    needs_teacher_stages: ClassVar[bool] = False
    needs_indices: ClassVar[bool] = False
    needs_teacher_heads: ClassVar[bool] = False  # HSAKD: the teacher's rotation heads, in ctx.extra["teacher_heads"]
    needs_init: ClassVar[bool] = False  # requires a warm-start student checkpoint (init=...)
    # Why the method cannot train in a fused bundle (kdtune.engine.bundle); empty: it can.
    unfusable: ClassVar[str] = ""
    hparams: ClassVar[dict[str, HParam]] = {}

    def __init_subclass__(cls, **kwargs):
        """One rule for what a fused bundle cannot give (kdtune.engine.bundle): its stacked student yields
        logits and pooled features, the batches of one loader, no per-sample index. A method needing more says
        why in ``unfusable`` without having to remember it."""
        super().__init_subclass__(**kwargs)
        if cls.unfusable:
            return
        if cls.needs_student_stages or cls.needs_teacher_stages:
            cls.unfusable = ("it reads stage maps, and a bundle's stacked student yields only its logits and pooled "
                             "features")  # fmt: skip
        elif cls.needs_indices:
            cls.unfusable = "it reads each sample's index, which a bundle's training pass does not pass on"
        elif cls.transform_batch is not Method.transform_batch:
            cls.unfusable = "it transforms the batch, which a bundle's members share untransformed"

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        self.hp = hp
        self.ctx = ctx
        self.epoch = 0

    @classmethod
    def resolve(cls, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``overrides``, every value type-checked and range-checked."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(cls.hparams))
        if unknown:
            valid = ", ".join(sorted(cls.hparams)) or "none"
            raise ConfigError(
                f"method {cls.name!r} has no hyperparameter {unknown[0]!r}; its hyperparameters: {valid}"
            )
        out = {k: h.check(k, overrides.get(k, h.default), cls.name) for k, h in cls.hparams.items()}
        cls.check_combination(out)
        return out

    @classmethod
    def check_combination(cls, hp: dict[str, Any]) -> None:
        """Cross-field checks (e.g. lambda_max > lambda_min); raise ConfigError."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}

    def setup(self) -> None:
        pass

    def transform_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch both networks see this step (HSAKD: four rotations); identity by default."""
        return x, y

    def generator(self, epoch: int, step: int) -> torch.Generator:
        """A generator of this method's own, seeded by (run seed, epoch, step): a resumed run and a fused member
        draw what the lone run draws at that step, whatever ran before."""
        g = torch.Generator(device=self.ctx.device)
        g.manual_seed((self.ctx.seed * 1_000_003 + epoch * 100_003 + step * 7 + 12345) & 0x7FFFFFFFFFFFFFFF)
        return g

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        raise NotImplementedError

    def epoch_metrics(self) -> dict[str, float]:
        """The method's own statistics of the epoch just trained (see the module docstring); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


LOGIT_STD_EPS = 1e-7  # added to the std, as in the official code


def logit_standardize(logits: Tensor) -> Tensor:
    """Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024: its Z-score
    pre-process, as its official code computes it): ``(z - mean(z)) / (1e-7 + std(z))`` over the class dimension of each sample, with
    the unbiased std (torch's default, as the official code). Float32 in, float32 out."""
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (LOGIT_STD_EPS + z.std(dim=-1, keepdim=True))


METHOD_METRIC_PREFIX = "method_"  # epoch_metrics() keys appear in the engine's metrics with this prefix


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method subclass under ``cls.name``."""
    if not cls.name:
        raise RuntimeError(f"{cls.__name__} has no name")
    return METHODS.register(cls.name)(cls)
