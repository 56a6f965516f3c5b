"""Shared pieces of the model zoo: the :class:`KDModel` base (the registry contract in one place), small
conv helpers, the weight initialisations of the public CIFAR code, and argument checks.

Module and parameter names inside every CIFAR model follow HobbitLong/RepDistiller (the CRD benchmark code,
also used by mdistiller), so the teacher checkpoints published with those repositories load into kdtune's
models unchanged (see :mod:`kdtune.models.checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdtune.errors import ConfigError

#: The feature-based KD methods that need :meth:`KDModel.forward_stages` (stage maps, not just the pooled h).
STAGE_METHODS = ("at", "sp", "vid", "fitnet", "reviewkd", "hsakd")


@dataclass
class Stages:
    """The intermediate features of one forward (RepDistiller's ``model(x, is_feat=True, preact=...)``).

    - ``stem``: f0, the stem output (4-D);
    - ``post``: the stage outputs f1..fL, as the next stage receives them (RepDistiller's default features);
    - ``pre``: their pre-activation versions, same shapes, position by position (RepDistiller's
      ``preact=True``; what "pre" is per family: the docstring of each model class);
    - ``pooled``: h, the penultimate vector ``(B, feat_dim)``, the input of the classifier (exactly what
      ``forward_features`` returns).

    Every tensor keeps its autograd graph (nothing is detached or copied): detach what you keep as a target.
    Do not modify them in place (they are saved for backward; ``pre`` and ``post`` may be the same tensor).
    """

    stem: Tensor
    post: list[Tensor]
    pre: list[Tensor]
    pooled: Tensor


def no_stages_error(model: nn.Module) -> ConfigError:
    """The one-line error of ``forward_stages`` on a model without stage features (toys, torchvision)."""
    arch = getattr(model, "kdtune_arch", None) or type(model).__name__
    return ConfigError(
        f"model {arch} exposes no stage features (forward_stages); the methods {', '.join(STAGE_METHODS)} "
        "need them: use a CIFAR-zoo model (resnet*, wrn_*, vgg*, mobilenetv2, shufflev1, shufflev2) or a "
        "method that uses logits or the pooled features only"
    )


class NoStages:
    """Mixin for models without stage features: ``has_stages`` is False, ``forward_stages`` raises."""

    has_stages: bool = False

    def forward_stages(self, x: Tensor):
        raise no_stages_error(self)  # type: ignore[arg-type]


class KDModel(nn.Module):
    """Base of the zoo: ``forward(x, return_features=False)`` around ``forward_features`` and a linear head,
    and ``forward_stages(x) -> (logits, Stages)`` for the feature-based methods.

    Subclasses set ``feat_dim`` (the input size of the final linear classifier) and name their classifier in
    ``head_name`` (``"fc"``, ``"linear"`` or ``"classifier"``: the attribute names of the public code, kept
    for checkpoint keys). They implement ``_forward_impl(x, collect) -> (pooled, Stages | None)`` (one code
    path for both: with ``collect=False`` it is the plain forward, returning ``None`` for the stages) and set
    ``has_stages = True``, or override ``forward_features(x) -> (B, feat_dim)`` only (then ``has_stages``
    stays False and ``forward_stages`` raises ConfigError).

    ``has_stages`` is a class attribute, so callers can check it without running a forward.
    """

    feat_dim: int
    head_name: str = "fc"
    has_stages: bool = False

    def _forward_impl(self, x: Tensor, collect: bool) -> tuple[Tensor, Stages | None]:  # pragma: no cover
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        return self._forward_impl(x, collect=False)[0]

    def forward(self, x: Tensor, return_features: bool = False):
        feats = self.forward_features(x)
        logits = getattr(self, self.head_name)(feats)
        if return_features:
            return logits, feats
        return logits

    def forward_stages(self, x: Tensor) -> tuple[Tensor, Stages]:
        """``(logits, Stages)`` from one forward; the logits equal ``forward(x)``'s bit for bit, and every
        BatchNorm runs exactly once (as in ``forward``), so running statistics are updated once per call."""
        if not self.has_stages:
            raise no_stages_error(self)
        pooled, stages = self._forward_impl(x, collect=True)
        assert stages is not None
        return getattr(self, self.head_name)(pooled), stages


def run_stage(layer: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run the blocks of one stage; return ``(pre, post)`` of its **last** block (RepDistiller's ``is_last``):
    the blocks before it run as in ``layer(x)``, the last one is called with ``return_pre=True``."""
    *blocks, last = layer
    for block in blocks:
        x = block(x)
    return last(x, return_pre=True)


def check_in_channels(in_channels: int, arch: str) -> int:
    """Return ``in_channels`` as an int, or raise ConfigError when it is not a positive integer."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(
            f"{arch}: in_channels must be a positive integer (1 for grey images, 3 for RGB), "
            f"got {in_channels!r}"
        )
    return in_channels


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


def global_pool(x: Tensor) -> Tensor:
    """Global average pooling to ``(B, C)``; equals the fixed ``AvgPool2d`` of the public code at 32x32."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def init_kaiming_fan_out(model: nn.Module) -> None:
    """He init (fan_out, ReLU) for convs, BN weight 1 / bias 0 (RepDistiller ``resnet.py``, ``resnetv2.py``;
    He et al., "Delving Deep into Rectifiers", ICCV 2015, eq. 10)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def init_normal_fan_out(model: nn.Module, linear_std: float | None) -> None:
    """Convs ~ N(0, 2 / (k*k*out)), conv biases 0, BN 1/0, linear bias 0 and, when ``linear_std`` is
    given, linear weight ~ N(0, linear_std) (RepDistiller ``wrn.py``: ``None``; ``vgg.py``,
    ``mobilenetv2.py``: 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded), as papers report them."""
    return sum(p.numel() for p in model.parameters())
