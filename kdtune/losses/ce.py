"""Teacher objectives: cross-entropy, label smoothing, and MSE between softmax and one-hot."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdtune.losses.base import HParam, Method, StepOutputs, register_method

MSE_REDUCTIONS = ("sum", "mean")


def mse_probs(logits: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
    """MSE between the softmax output and the one-hot label, summed (or averaged) over classes, batch mean.

    Hamidi et al., "How to Train the Teacher Model for Effective Knowledge Distillation" (ECCV 2024):
    ``L = mean_i || softmax(z_i) - onehot(y_i) ||^2`` (``reduction="sum"``, the paper's risk, supplement eq. 1).
    ``reduction="mean"`` averages over the C classes instead (``L / C``), as the authors' synthetic-experiment
    code does (``F.mse_loss(softmax(z), onehot)``, a mean over all elements). Applied to probabilities, not to raw
    logits (the released CIFAR code's ``-lf MSE`` trains with CE through a string-compare bug and would use raw
    logits).
    """
    if reduction not in MSE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {MSE_REDUCTIONS}, got {reduction!r}")
    p = F.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, p.shape[1]).to(p.dtype)
    sq = (p - onehot).pow(2)
    if reduction == "mean":
        return sq.mean(dim=1).mean()
    return sq.sum(dim=1).mean()


@register_method
class CE(Method):
    name = "ce"
    summary = "cross-entropy with the labels (teachers, and students trained from scratch)"

    def losses(self, out: StepOutputs):
        return {"ce": F.cross_entropy(out.student_logits, out.targets)}


@register_method
class LabelSmoothing(Method):
    name = "ls"
    summary = "cross-entropy with label smoothing (Szegedy et al. 2016)"
    hparams = {
        "smoothing": HParam(0.1, "mass spread uniformly over all classes", float, 0.0, 1.0, high_open=True)
    }

    def losses(self, out: StepOutputs):
        return {
            "ce_ls": F.cross_entropy(out.student_logits, out.targets, label_smoothing=self.hp["smoothing"])
        }


@register_method
class MSE(Method):
    name = "mse"
    summary = "MSE between softmax and one-hot label: the teacher objective of Hamidi et al. (ECCV 2024)"
    hparams = {
        "weight": HParam(1.0, "weight of the MSE term", float, 0.0, None, low_open=True),
        "reduction": HParam("sum", "over the classes: sum (the paper's risk) or mean (sum / C, the authors' "
                            "synthetic-experiment code)", str, choices=MSE_REDUCTIONS, added="2026-12-05"),
    }  # fmt: skip

    def losses(self, out: StepOutputs):
        return {"mse": self.hp["weight"] * mse_probs(out.student_logits, out.targets, self.hp["reduction"])}
