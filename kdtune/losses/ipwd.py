"""IPWD, inverse probability weighting distillation (Niu, Chen, Zhou & Zhang, "Respecting Transfer Gap in
Knowledge Distillation", NeurIPS 2022, arXiv:2210.12787).

Each training sample's KD term is weighted by the inverse of its estimated propensity of being represented in
the teacher's "machine domain", ``w = 1 + H(y^cls, y) / H(y^kd, y)`` (:func:`inverse_propensity_weights`):
``y^kd`` from the student's own head, ``y^cls`` from an extra linear head (a trainable module) trained with CE
only. ``L = w_ce * CE(s, y) + w_kd * mean_b(w_b * T^2 * KL(p_t^T || p_s^T)) + w_cls * CE(head(f), y)``, with
``T = 4``, ``w_ce = 0.1``, ``w_kd = 0.9`` by default. The weights are detached. No official code exists: the
choices kdtune fixes are hyperparameters (``weighting`` per ``"sample"`` or per ``"class"``, the class
averages being method state; ``clip``; ``normalize``; ``detach_features``).
More: docs/methods.md §IPWD (each choice, and the measurement behind ``detach_features=False``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses.base import HParam, Method, MethodContext, StepOutputs, register_method

_EPS = 1e-8


def inverse_propensity_weights(h_cls: Tensor, h_kd: Tensor, clip: float, normalize: bool) -> Tensor:
    """IPWD sample weights ``w = 1 + H(y^cls, y) / H(y^kd, y)`` (Niu et al. 2022, public summary).

    Inputs are per-sample (or per-sample class-level) cross-entropies; the result is detached, capped at
    ``clip`` and, if ``normalize``, divided by its mean.
    """
    w = 1.0 + h_cls.detach().float() / h_kd.detach().float().clamp_min(_EPS)
    w = w.clamp(max=clip)
    if normalize:
        w = w / w.mean()
    return w


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` per sample (Hinton et al. 2015), shape (B,), float32."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


@register_method
class IPWD(Method):
    name = "ipwd"
    summary = "Niu et al. NeurIPS 2022: KD weighted per sample by inverse propensity from an extra CE head"
    needs_teacher = True
    needs_student_features = True
    hparams = {
        "T": HParam(4.0, "softmax temperature of the KD term", float, 0.0, None, low_open=True),
        "w_ce": HParam(0.1, "weight of the cross-entropy of the student's own head", float, 0.0, None),
        "w_kd": HParam(
            0.9, "weight of the inverse-propensity-weighted KD term (carries T^2)", float, 0.0, None
        ),
        "w_cls": HParam(
            1.0,
            "weight of the cross-entropy of the extra head that estimates y^cls",
            float,
            0.0,
            None,
            low_open=True,
        ),
        "weighting": HParam(
            "sample",
            "propensity per sample, or per label class via moving averages",
            str,
            choices=("sample", "class"),
        ),
        "momentum": HParam(
            0.9,
            "momentum of the per-class moving averages (weighting=class)",
            float,
            0.0,
            1.0,
            high_open=True,
        ),
        "clip": HParam(10.0, "cap on the raw weight 1 + H_cls/H_kd before normalisation", float, 1.0, None),
        "normalize": HParam(True, "divide the weights by their batch mean (mean weight 1)", bool),
        "detach_features": HParam(
            False, "the extra head reads detached features (its CE trains the head only); default off: the "
            "backbone is shared by both heads, as in the paper's IPWD (measured better, see the docstring)", bool
        ),
    }

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        if not ctx.student_feat_dim:
            raise ConfigError(
                "ipwd needs the student's feature size (student_feat_dim); use a student model with feat_dim"
            )
        self.cls_head = nn.Linear(int(ctx.student_feat_dim), ctx.num_classes)
        self.ema_cls: Tensor | None = None
        self.ema_kd: Tensor | None = None
        self.seen: Tensor | None = None
        self.last_weights: Tensor | None = None  # diagnostics: the weights of the latest step

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"cls_head": self.cls_head}

    def _class_stats(self, y: Tensor, h_cls: Tensor, h_kd: Tensor) -> tuple[Tensor, Tensor]:
        """Update the per-class moving averages with this batch and return them gathered at ``y``."""
        c = self.ctx.num_classes
        device = h_cls.device
        if self.ema_cls is None:
            self.ema_cls = torch.zeros(c, device=device)
            self.ema_kd = torch.zeros(c, device=device)
            self.seen = torch.zeros(c, dtype=torch.bool, device=device)
        elif self.ema_cls.device != device:
            self.ema_cls, self.ema_kd, self.seen = (
                t.to(device) for t in (self.ema_cls, self.ema_kd, self.seen)
            )
        onehot = F.one_hot(y, c).float()  # (B, C): per-class sums as a matmul, deterministic on every device
        counts = onehot.sum(dim=0)
        present = counts > 0
        m = self.hp["momentum"]
        updated = []
        for ema, h in ((self.ema_cls, h_cls), (self.ema_kd, h_kd)):
            mean = (onehot.t() @ h.float()) / counts.clamp_min(1.0)
            new = torch.where(self.seen, m * ema + (1.0 - m) * mean, mean)
            updated.append(torch.where(present, new, ema))
        self.ema_cls, self.ema_kd = updated
        self.seen = self.seen | present
        return self.ema_cls[y], self.ema_kd[y]

    def losses(self, out: StepOutputs):
        hp = self.hp
        if out.student_features is None:
            raise ConfigError("ipwd needs the student's features; the engine must pass student_features")
        s = out.student_logits.float()
        y = out.targets.long()
        feats = out.student_features.float()
        if hp["detach_features"]:
            feats = feats.detach()
        cls_logits = self.cls_head(feats).float()

        # the weights are constants of the step, computed in float32 even if called under autocast
        with torch.no_grad(), torch.autocast(device_type=s.device.type, enabled=False):
            h_kd = F.cross_entropy(s, y, reduction="none")
            h_cls = F.cross_entropy(cls_logits, y, reduction="none")
            if hp["weighting"] == "class":
                h_cls, h_kd = self._class_stats(y, h_cls, h_kd)
            w = inverse_propensity_weights(h_cls, h_kd, hp["clip"], hp["normalize"])
        self.last_weights = w

        terms = {
            "kd": hp["w_kd"] * (w * kd_per_sample(s, out.teacher_logits, hp["T"])).mean(),
            "cls": hp["w_cls"] * F.cross_entropy(cls_logits, y),
        }
        if hp["w_ce"] > 0:
            terms["ce"] = hp["w_ce"] * F.cross_entropy(s, y)
        return terms

    def state_dict(self) -> dict[str, Any]:
        if self.ema_cls is None:
            return {}
        return {k: getattr(self, k).detach().cpu().clone() for k in ("ema_cls", "ema_kd", "seen")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.ema_cls = self.ema_kd = self.seen = None
            return
        device = self.ctx.device
        self.ema_cls = state["ema_cls"].to(device=device, dtype=torch.float32)
        self.ema_kd = state["ema_kd"].to(device=device, dtype=torch.float32)
        self.seen = state["seen"].to(device=device, dtype=torch.bool)
