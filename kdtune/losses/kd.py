"""Vanilla knowledge distillation (Hinton, Vinyals & Dean 2015)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdtune.losses.base import HParam, Method, StepOutputs, register_method


def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", section 2.

    ``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes and averaged over the batch. The T^2
    factor keeps the gradient scale independent of T. Computed in float32 whatever the input dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
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
    }

    def losses(self, out: StepOutputs):
        terms = {"kd": self.hp["w_kd"] * kd(out.student_logits, out.teacher_logits, self.hp["T"])}
        if self.hp["w_ce"] > 0:
            terms["ce"] = self.hp["w_ce"] * F.cross_entropy(out.student_logits, out.targets)
        return terms
