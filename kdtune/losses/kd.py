"""Vanilla knowledge distillation (Hinton, Vinyals & Dean 2015), optionally on standardised logits
(Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdtune.losses.base import HParam, Method, StepOutputs, logit_standardize, register_method

# Sun et al. 2024, official code (sunshangquan/logit-standardization-KD, tools/train.py with --logit-stand):
# KD's weight becomes 9 and its temperature the "base temperature" 2 (3 for some CIFAR-100 pairs in its logs).
LS_T = 2.0
LS_W_KD = 9.0


def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float, logit_std: bool = False) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", section 2.

    ``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes and averaged over the batch. The T^2
    factor keeps the gradient scale independent of T. ``logit_std=True`` z-scores each sample's logits of
    teacher and student first (Sun et al. CVPR 2024, :func:`~kdtune.losses.base.logit_standardize`), so ``T``
    is then a base temperature relative to each sample's logit std. Computed in float32 whatever the input
    dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = student_logits.float(), teacher_logits.float()
    if logit_std:
        s, t = logit_standardize(s), logit_standardize(t)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2


@register_method
class KD(Method):
    name = "kd"
    summary = "Hinton et al. 2015: w_ce*CE + w_kd*T^2*KL(teacher_T || student_T)"
    needs_teacher = True
    hparams = {
        "T": HParam(4.0, "softmax temperature of teacher and student", float, 0.0, None, low_open=True),
        "w_ce": HParam(0.1, "weight of the cross-entropy with the labels", float, 0.0, None),
        "w_kd": HParam(0.9, "weight of the distillation term (which carries T^2)", float, 0.0, None),
        "logit_std": HParam(False, "z-score each sample's logits before the tempered softmax (Sun et al. CVPR "
                            "2024; official code: T = 2, w_kd = 9)", bool),
    }  # fmt: skip

    def losses(self, out: StepOutputs):
        terms = {"kd": self.hp["w_kd"] * kd(out.student_logits, out.teacher_logits, self.hp["T"], self.hp["logit_std"])}
        if self.hp["w_ce"] > 0:
            terms["ce"] = self.hp["w_ce"] * F.cross_entropy(out.student_logits, out.targets)
        return terms
