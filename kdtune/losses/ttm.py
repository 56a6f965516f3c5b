"""Transformed teacher matching, TTM and WTTM (Zheng & Yang, "Knowledge distillation based on transformed
teacher matching", ICLR 2024, arXiv:2402.11148).

- Power transform (eq. 7): ``p_hat_i = p_i^gamma / U_gamma(p)`` with ``U_gamma(p) = sum_j p_j^gamma`` and
  ``p = softmax(v)`` the untempered teacher; eq. 9: ``p_hat = softmax(gamma * v)``, i.e. temperature
  ``T = 1 / gamma``.
- TTM (eq. 2): ``L = H(y, q) + beta * KL(p_hat^t || q)`` with the student *untempered*, ``q = softmax(z)``.
- WTTM (eq. 22): ``L = H(y, q) + beta * U_gamma(p^t) * KL(p_hat^t || q)``, the sample-adaptive weight being
  the unnormalised power sum, ``1 <= U <= C^(1 - gamma)`` (section 4); the batch mean is
  ``mean_b(U * KL)`` as in the paper's Algorithm 1.
- Eq. 15 (the Renyi-entropy decomposition, tested in ``tests/test_losses.py``):
  ``KL(p_T^t || q) = T * KL(p_T^t || q_T) - (T - 1) * H_{1/T}(q) + (T - 1) * H(p_T^t)``.

No ``T^2`` factor (the published ``beta`` values absorb the scale). ``p^gamma`` is computed in log space,
``gamma * log_softmax(v)`` and ``log U = logsumexp(gamma * log_softmax(v))``, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.losses.base import HParam, Method, StepOutputs, register_method


def power_transform(teacher_logits: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Zheng & Yang 2024, eq. 7: ``(log p_hat, U)`` of ``p = softmax(teacher_logits)``, float32.

    ``log p_hat = gamma * log p - log U`` (B, C) and ``U = sum_c p_c^gamma`` (B,).
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    g = gamma * F.log_softmax(teacher_logits.float(), dim=1)
    log_u = torch.logsumexp(g, dim=1)
    return g - log_u.unsqueeze(1), log_u.exp()


def _ttm_per_sample(student_logits: Tensor, teacher_logits: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-sample ``KL(p_hat^t || q)`` and ``U``, both (B,)."""
    log_p_hat, u = power_transform(teacher_logits, gamma)
    log_q = F.log_softmax(student_logits.float(), dim=1)
    kl = (log_p_hat.exp() * (log_p_hat - log_q)).sum(dim=1)
    return kl, u


def ttm(student_logits: Tensor, teacher_logits: Tensor, gamma: float) -> Tensor:
    """TTM distillation term, Zheng & Yang ICLR 2024 eq. 2: ``mean_b KL(p_hat^t || softmax(s))``.

    ``p_hat^t = softmax(t)^gamma / U`` (eq. 7), the student untempered; no ``T^2``. At ``gamma = 1`` this is
    KD at ``T = 1``.
    """
    kl, _ = _ttm_per_sample(student_logits, teacher_logits, gamma)
    return kl.mean()


def wttm(student_logits: Tensor, teacher_logits: Tensor, gamma: float) -> Tensor:
    """WTTM distillation term, Zheng & Yang ICLR 2024 eq. 22: ``mean_b U_gamma(p^t) * KL(p_hat^t || q)``.

    ``U = sum_c softmax(t)_c^gamma`` unnormalised (in ``[1, C^(1-gamma)]``); it depends on the teacher only,
    so it weighs the student's gradient without carrying one.
    """
    kl, u = _ttm_per_sample(student_logits, teacher_logits, gamma)
    return (u * kl).mean()


_GAMMA_DOC = "power-transform exponent gamma = 1/T applied to the teacher's probabilities, in (0, 1]"


@register_method
class TTM(Method):
    name = "ttm"
    summary = "Zheng & Yang ICLR 2024: w_ce*CE + beta*KL(teacher^gamma normalised || untempered student)"
    needs_teacher = True
    hparams = {
        "gamma": HParam(
            0.1,
            _GAMMA_DOC + " (paper's table 8, resnet32x4->resnet8x4: 0.1; resnet56->resnet20: 0.3)",
            float,
            0.0,
            1.0,
            low_open=True,
        ),
        "beta": HParam(
            100.0,
            "weight of the TTM term (paper's table 8, resnet32x4->resnet8x4: 100; wrn_40_2->wrn_16_2: 101; "
            "resnet56->resnet20: 7)",
            float,
            0.0,
            None,
        ),
        "w_ce": HParam(1.0, "weight of the cross-entropy with the labels", float, 0.0, None),
    }

    def losses(self, out: StepOutputs):
        hp = self.hp
        terms = {"ttm": hp["beta"] * ttm(out.student_logits, out.teacher_logits, hp["gamma"])}
        if hp["w_ce"] > 0:
            terms["ce"] = hp["w_ce"] * F.cross_entropy(out.student_logits.float(), out.targets)
        return terms


@register_method
class WTTM(Method):
    name = "wttm"
    summary = "Zheng & Yang ICLR 2024: w_ce*CE + beta*U(teacher)*KL(teacher^gamma normalised || student)"
    needs_teacher = True
    hparams = {
        "gamma": HParam(
            0.1,
            _GAMMA_DOC + " (paper's table 8, resnet32x4->resnet8x4: 0.1; ImageNet R34->R18: 0.8)",
            float,
            0.0,
            1.0,
            low_open=True,
        ),
        "beta": HParam(
            3.0,
            "weight of the WTTM term (paper's table 8, resnet32x4->resnet8x4: 3; wrn_40_2->wrn_16_2: 4; "
            "ImageNet R34->R18: 1.6)",
            float,
            0.0,
            None,
        ),
        "w_ce": HParam(1.0, "weight of the cross-entropy with the labels", float, 0.0, None),
    }

    def losses(self, out: StepOutputs):
        hp = self.hp
        terms = {"wttm": hp["beta"] * wttm(out.student_logits, out.teacher_logits, hp["gamma"])}
        if hp["w_ce"] > 0:
            terms["ce"] = hp["w_ce"] * F.cross_entropy(out.student_logits.float(), out.targets)
        return terms
