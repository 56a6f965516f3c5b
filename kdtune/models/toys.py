"""The toy models: DiSK's function classes (Kag et al., "Scaffolding a Student to Instill Knowledge", ICLR 2023
submission, appendix A.1-A.2) and the MLP of Hamidi et al.'s synthetic experiment (ECCV 2024).

- 1-D intervals (A.1): unions of soft intervals ``h(x; a, b) = sigma_k(x - a) - sigma_k(x - b)`` (``k = 10``),
  one for the student, two for the teacher; ``f(x)`` is the probability of "blue" (label 1), the logits
  ``[log(1 - f), log f]``, computed in log space and floored at ``log(1e-6)``.
- 2-D Gaussians (A.2): MLPs with batch norm then ReLU, 2 hidden units (student), 8 and 16 (teacher).
- ``toy_mlp128`` (Hamidi et al.): D -> 128 -> 128 -> C with ReLU, no batch norm, as the authors' code.

Features (the ``return_features=True`` contract): the MLPs return the input of the classifier; the interval
models return the per-interval activations ``h_j(x)`` ``(B, n_intervals)``, from which the logits follow by
the fixed map above (not a linear layer: the toy exception to the contract). No stage features:
``has_stages`` is False and ``forward_stages`` raises ConfigError. ``ensemble=S`` builds S independent copies
(outputs ``(S, B, C)``) of the DiSK models; member ``i`` after :meth:`init_members` equals a single model of the
same seed. Inputs are float vectors ``(B, D)`` (``in_channels`` is ``D``). More: docs/toys.md §Models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.models.common import NoStages
from kdtune.models.registry import register_model

INTERVAL_LOW, INTERVAL_HIGH = 0.0, 9.0  # the feature axis of the 1-D problem (appendix A.1)
KAPPA = 10.0  # sigmoid scale k of the interval functions (not given by the paper)
LOG_FLOOR_EPS = 1e-6  # the interval logits are floored at log(eps): see IntervalNet


def _check(num_classes: int, in_channels: int, arch: str, need_classes: int | None, need_dim: int | None):
    if need_classes is not None and num_classes != need_classes:
        raise ConfigError(
            f"{arch} is a {need_classes}-class toy model; got num_classes={num_classes} (use disk-intervals)"
        )
    if need_dim is not None and in_channels != need_dim:
        raise ConfigError(
            f"{arch} takes {need_dim}-D inputs; got in_channels={in_channels} (use disk-intervals)"
        )
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(
            f"{arch}: in_channels (the input dimension D) must be a positive integer, got {in_channels!r}"
        )


def _log_interval(x: Tensor, a: Tensor, b: Tensor, kappa: float) -> Tensor:
    """``log(sigma_k(x - a) - sigma_k(x - b))`` for ``a <= b``, exact in floating point (no clamping).

    With ``u = k (x - a)`` and ``v = k (x - b)``: ``log sigma(u) - softplus(v) + log(1 - e^{k (a - b)})``.
    """
    gap = (kappa * (a - b)).clamp(max=-1e-6)
    return F.logsigmoid(kappa * (x - a)) - F.softplus(kappa * (x - b)) + torch.log(-torch.expm1(gap))


class IntervalNet(NoStages, nn.Module):
    """Union of ``n_intervals`` soft intervals on the real line (appendix A.1), a binary classifier.

    ``ends`` holds ``2 n`` raw end points per model ``(*E, n_intervals, 2)``; sorted, consecutive pairs are the
    intervals, which keeps ``0 <= a < b < c < d <= 9`` of the appendix without projecting the parameters.
    For ordered, disjoint intervals ``1 - f = sigma(-u_1) + sum_j h(x; b_j, a_{j+1}) + sigma(v_n)`` is a sum of
    positive terms, so both logits ``log(1 - f)`` and ``log f`` are computed exactly in log space, then floored
    at ``log(eps)`` (see the module docstring).
    """

    def __init__(
        self,
        n_intervals: int,
        kappa: float = KAPPA,
        ensemble: int | None = None,
        low: float = INTERVAL_LOW,
        high: float = INTERVAL_HIGH,
        eps: float = LOG_FLOOR_EPS,
    ):
        super().__init__()
        self.n_intervals = int(n_intervals)
        self.kappa = float(kappa)
        self.log_eps = math.log(eps)
        self.low, self.high = float(low), float(high)
        self.ensemble = ensemble
        lead = () if ensemble is None else (int(ensemble),)
        self.ends = nn.Parameter(torch.empty(*lead, self.n_intervals, 2))
        self.feat_dim = self.n_intervals
        with torch.no_grad():
            self.ends.uniform_(self.low, self.high)

    def init_members(self, seeds: Sequence[int]) -> None:
        """End points uniform on [0, 9], member ``i`` drawn from ``torch.Generator().manual_seed(seeds[i])``."""
        with torch.no_grad():
            rows = []
            for s in seeds:
                g = torch.Generator().manual_seed(int(s))
                rows.append(self.low + (self.high - self.low) * torch.rand(self.n_intervals, 2, generator=g))
            self.ends.copy_(torch.stack(rows).reshape(self.ends.shape))

    def intervals(self) -> tuple[Tensor, Tensor]:
        """Sorted end points ``(a, b)``, each ``(*E, n_intervals)``: interval j is ``(a[..., j], b[..., j])``."""
        e = torch.sort(self.ends.flatten(-2), dim=-1).values.unflatten(-1, (self.n_intervals, 2))
        return e[..., 0], e[..., 1]

    def forward(self, x: Tensor, return_features: bool = False):
        if x.dim() >= 2 and x.shape[-1] == 1:
            x = x[..., 0]
        x = x.to(self.ends.dtype).unsqueeze(-1)  # (..., B, 1)
        a, b = self.intervals()
        a, b = a.unsqueeze(-2), b.unsqueeze(-2)  # (*E, 1, n)
        log_h = _log_interval(x, a, b, self.kappa)  # (..., B, n)
        log_p = torch.logsumexp(log_h, dim=-1)
        k = self.kappa
        parts = [F.logsigmoid(-k * (x[..., 0] - a[..., 0])), F.logsigmoid(k * (x[..., 0] - b[..., -1]))]
        if self.n_intervals > 1:
            gaps = _log_interval(x, b[..., :-1], a[..., 1:], k)  # the red gaps between consecutive intervals
            parts.append(torch.logsumexp(gaps, dim=-1))
        log_q = torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)
        logits = torch.stack([log_q, log_p], dim=-1).clamp(min=self.log_eps)
        if return_features:
            return logits, log_h.exp()
        return logits


class BNMLP(NoStages, nn.Module):
    """``W_L phi(... phi(W_1 x))`` with ``phi`` = batch norm then ReLU (appendix A.2), optionally an ensemble.

    Hidden layers: weight ``(*E, out, in)`` without bias, batch-norm affine ``gamma``/``beta`` ``(*E, out)`` and
    running statistics (momentum 0.1, eps 1e-5, as ``nn.BatchNorm1d``). Classifier: weight and bias.
    Initialisation as ``nn.Linear`` (uniform in +-1/sqrt(fan_in)).
    """

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int],
        out_dim: int,
        ensemble: int | None = None,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        self.in_dim, self.widths, self.out_dim = int(in_dim), tuple(int(w) for w in widths), int(out_dim)
        self.ensemble = ensemble
        self.bn_momentum, self.bn_eps = bn_momentum, bn_eps
        lead = () if ensemble is None else (int(ensemble),)
        dims = [self.in_dim, *self.widths]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(*lead, o, i)) for i, o in zip(dims, dims[1:])]
        )
        self.gammas = nn.ParameterList([nn.Parameter(torch.ones(*lead, o)) for o in self.widths])
        self.betas = nn.ParameterList([nn.Parameter(torch.zeros(*lead, o)) for o in self.widths])
        for j, o in enumerate(self.widths):
            self.register_buffer(f"running_mean{j}", torch.zeros(*lead, o))
            self.register_buffer(f"running_var{j}", torch.ones(*lead, o))
        self.head_weight = nn.Parameter(torch.empty(*lead, self.out_dim, dims[-1]))
        self.head_bias = nn.Parameter(torch.empty(*lead, self.out_dim))
        self.feat_dim = dims[-1]
        self._init(None)

    def _shapes(self):
        return [(w, w.shape[-1]) for w in self.weights] + [
            (self.head_weight, self.head_weight.shape[-1]),
            (self.head_bias, self.head_weight.shape[-1]),
        ]

    @torch.no_grad()
    def _init(self, generator: torch.Generator | None) -> None:
        for p, fan_in in self._shapes():
            bound = 1.0 / math.sqrt(fan_in)
            p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)

    @torch.no_grad()
    def init_members(self, seeds: Sequence[int]) -> None:
        """Re-initialise member ``i`` from ``torch.Generator().manual_seed(seeds[i])`` (batch norm reset)."""
        if self.ensemble is None:
            if len(seeds) != 1:
                raise ValueError("a single model takes one seed")
            self._init(torch.Generator().manual_seed(int(seeds[0])))
        else:
            if len(seeds) != self.ensemble:
                raise ValueError(f"need {self.ensemble} seeds, got {len(seeds)}")
            for i, s in enumerate(seeds):
                g = torch.Generator().manual_seed(int(s))
                for p, fan_in in self._shapes():
                    bound = 1.0 / math.sqrt(fan_in)
                    p[i].copy_(torch.rand(p[i].shape, generator=g) * 2 * bound - bound)
        for p in [*self.gammas]:
            p.fill_(1.0)
        for p in [*self.betas]:
            p.zero_()
        for j in range(len(self.widths)):
            getattr(self, f"running_mean{j}").zero_()
            getattr(self, f"running_var{j}").fill_(1.0)

    def forward(self, x: Tensor, return_features: bool = False):
        h = x.to(self.head_weight.dtype)
        for j, w in enumerate(self.weights):
            z = torch.matmul(h, w.transpose(-1, -2))  # (..., B, out)
            rm, rv = getattr(self, f"running_mean{j}"), getattr(self, f"running_var{j}")
            if self.training and z.shape[-2] > 1:
                mean = z.mean(dim=-2)
                var = z.var(dim=-2, unbiased=False)
                with torch.no_grad():
                    n = z.shape[-2]
                    m = self.bn_momentum
                    rm.mul_(1 - m).add_(m * mean.detach().expand_as(rm))
                    rv.mul_(1 - m).add_(m * (var.detach() * n / (n - 1)).expand_as(rv))
            else:
                mean, var = rm, rv
            z = (z - mean.unsqueeze(-2)) * torch.rsqrt(var.unsqueeze(-2) + self.bn_eps)
            h = torch.relu(z * self.gammas[j].unsqueeze(-2) + self.betas[j].unsqueeze(-2))
        logits = torch.matmul(h, self.head_weight.transpose(-1, -2)) + self.head_bias.unsqueeze(-2)
        if return_features:
            return logits, h
        return logits


# Sizes of appendix A.2.
TEACHER_WIDTHS = (8, 16)
STUDENT_WIDTHS = (2,)


@register_model("toy_interval_teacher")
def toy_interval_teacher(num_classes: int = 2, in_channels: int = 1, kappa: float = KAPPA, ensemble=None):
    """Teacher of the 1-D problem: the 2-interval class F (appendix A.1)."""
    _check(num_classes, in_channels, "toy_interval_teacher", 2, 1)
    return IntervalNet(2, kappa=kappa, ensemble=ensemble)


@register_model("toy_interval_student")
def toy_interval_student(num_classes: int = 2, in_channels: int = 1, kappa: float = KAPPA, ensemble=None):
    """Student of the 1-D problem: the 1-interval class H (appendix A.1)."""
    _check(num_classes, in_channels, "toy_interval_student", 2, 1)
    return IntervalNet(1, kappa=kappa, ensemble=ensemble)


@register_model("toy_mlp_teacher")
def toy_mlp_teacher(num_classes: int = 3, in_channels: int = 2, ensemble=None):
    """Teacher of the 2-D problem: D -> 8 -> 16 -> C with batch norm and ReLU (appendix A.2)."""
    _check(num_classes, in_channels, "toy_mlp_teacher", None, None)
    return BNMLP(in_channels, TEACHER_WIDTHS, num_classes, ensemble=ensemble)


@register_model("toy_mlp_student")
def toy_mlp_student(num_classes: int = 3, in_channels: int = 2, ensemble=None):
    """Student of the 2-D problem: D -> 2 -> C with batch norm and ReLU (appendix A.2)."""
    _check(num_classes, in_channels, "toy_mlp_student", None, None)
    return BNMLP(in_channels, STUDENT_WIDTHS, num_classes, ensemble=ensemble)


class ReluMLP(NoStages, nn.Module):
    """``D -> widths... -> C``: ``nn.Linear`` layers (PyTorch's default init) with ReLU between them, no batch
    norm, no dropout: the ``MLP`` of the authors' synthetic experiment (Hamidi et al., ECCV 2024, ToyGuassian-MSEKD:
    ``fc1``/``fc2``/``fc3``, 128 hidden units). Features: the last hidden activation (the classifier's input)."""

    def __init__(self, in_dim: int, widths: Sequence[int], out_dim: int):
        super().__init__()
        dims = [int(in_dim), *(int(w) for w in widths)]
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:]))
        self.fc = nn.Linear(dims[-1], int(out_dim))
        self.feat_dim = dims[-1]

    def forward(self, x: Tensor, return_features: bool = False):
        h = x.to(self.fc.weight.dtype)
        for layer in self.hidden:
            h = torch.relu(layer(h))
        logits = self.fc(h)
        return (logits, h) if return_features else logits


MLP128_WIDTHS = (128, 128)


@register_model("toy_mlp128")
def toy_mlp128(num_classes: int = 3, in_channels: int = 30):
    """D -> 128 -> 128 -> C with ReLU (Hamidi et al. ECCV 2024's synthetic experiment; its data set: mse-gauss)."""
    _check(num_classes, in_channels, "toy_mlp128", None, None)
    return ReluMLP(in_channels, MLP128_WIDTHS, num_classes)
