"""Decoupled knowledge distillation, DKD (Zhao, Cui, Song, Qiu & Liang, CVPR 2022).

The classic KD loss split into a target-class term (TCKD) and a non-target-class term (NCKD), weighted
independently (eq. 5); the formulas are :func:`dkd_terms`' and :func:`dkd`'s. Unlike the official mdistiller
code, the target class is removed with a boolean mask, the two-bin log-probabilities are evaluated in log
space (finite for any finite logits, no clamp), and everything is computed in float32 whatever the input
dtype. ``logit_std=True`` z-scores each sample's logits of teacher and student first (Sun et al., CVPR 2024,
:func:`kdtune.losses.base.logit_standardize`).

More: docs/methods.md §DKD (the traps of the official code, the published logit-standardisation setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.errors import ConfigError
from kdtune.losses.base import HParam, Method, StepOutputs, logit_standardize, register_method

LS_T = 2.0  # official logit-standardisation code: base temperature
LS_WEIGHT = 9.0  # official logit-standardisation code: alpha and beta multiplied by this "kd weight"


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float, logit_std: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-sample ``(TCKD, NCKD)`` of Zhao et al. 2022, eq. 2-4, at temperature ``T``, without ``T^2``.

    With ``p = softmax(z / T)`` and the label ``y``, the paper splits the classic KD loss (its eq. 1-4):

    - binary target/non-target probabilities ``b = [p_y, 1 - p_y]``;
      **TCKD** ``= KL(b^t || b^s)`` (target-class knowledge distillation);
    - the distribution over the ``C - 1`` non-target classes, renormalised, ``p_hat_i = p_i / (1 - p_y)``;
      **NCKD** ``= KL(p_hat^t || p_hat^s)`` (non-target-class knowledge distillation);
    - eq. 4: ``KL(p^t || p^s) = TCKD + (1 - p^t_y) * NCKD`` per sample, with the *teacher's* target
      probability.

    Returns two float32 tensors of shape ``(B,)``. With ``C == 2`` the non-target distribution has one
    class and NCKD is exactly 0. ``logit_std=True`` standardises both logits per sample first (Sun et al.).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = student_logits.float(), teacher_logits.float()
    if logit_std:
        s, t = logit_standardize(s), logit_standardize(t)
    s = s / temperature
    t = t / temperature
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(f"logits must both be (B, C), got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[1] < 2:
        raise ValueError("DKD needs at least 2 classes (the non-target set is empty)")
    gt = F.one_hot(target.long(), s.shape[1]).bool()
    neg_inf = float("-inf")

    def two_bin_and_rest(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lse_all = torch.logsumexp(z, dim=1)
        z_rest = z.masked_fill(gt, neg_inf)
        log_b_target = z.gather(1, target.long().view(-1, 1)).squeeze(1) - lse_all
        log_b_rest = torch.logsumexp(z_rest, dim=1) - lse_all
        log_b = torch.stack([log_b_target, log_b_rest], dim=1)  # (B, 2): log [p_y, 1 - p_y]
        log_hat = F.log_softmax(z_rest, dim=1)  # -inf at the target class
        return log_b, log_hat.exp(), log_hat.masked_fill(gt, 0.0)

    log_b_s, _, log_hat_s = two_bin_and_rest(s)
    log_b_t, hat_t, log_hat_t = two_bin_and_rest(t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1)
    nckd = (hat_t * (log_hat_t - log_hat_s)).sum(dim=1)  # hat_t is exactly 0 at the target class
    return tckd, nckd


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
    logit_std: bool = False,
) -> Tensor:
    """DKD loss, Zhao et al. CVPR 2022, eq. 5 with the official ``T^2`` factor.

    Eq. 5 (DKD): ``alpha * TCKD + beta * NCKD``, which frees NCKD from the ``(1 - p^t_y)`` factor of eq. 4.

    ``T^2 * (alpha * mean_b TCKD + beta * mean_b NCKD)``: batch mean of the distillation term only (no
    cross-entropy, no warm-up factor). Float32 inside; see :func:`dkd_terms` and the module docstring for
    the masking and the log-space two-bin probabilities.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature, logit_std)
    return temperature**2 * (alpha * tckd.mean() + beta * nckd.mean())


def warmup_factor(epoch: int, warmup: int) -> float:
    """Linear ramp of the DKD term: ``min((epoch + 1) / warmup, 1)`` for 0-based ``epoch``; 1 if warmup is 0.

    mdistiller counts epochs from 1 and uses ``min(epoch / warmup, 1)``: the same factor, 1/warmup in the
    first epoch and 1 from epoch ``warmup`` (1-based) on.
    """
    if warmup <= 0:
        return 1.0
    return min((epoch + 1) / warmup, 1.0)


@register_method
class DKD(Method):
    name = "dkd"
    summary = "Zhao et al. CVPR 2022: w_ce*CE + ramp*T^2*(alpha*TCKD + beta*NCKD)"
    needs_teacher = True
    hparams = {
        "alpha": HParam(1.0, "weight of TCKD, the target-vs-rest binary KL", float, 0.0, None),
        "beta": HParam(
            8.0,
            "weight of NCKD, the KL over the non-target classes (official CIFAR-100: 8 for "
            "resnet32x4->resnet8x4, 6 for vgg13->vgg8 and wrn_40_2->wrn_16_2, 2 for resnet56->resnet20)",
            float,
            0.0,
            None,
        ),
        "T": HParam(4.0, "softmax temperature of teacher and student", float, 0.0, None, low_open=True),
        "warmup": HParam(
            20,
            "epochs of linear ramp of the DKD term only, factor min((epoch+1)/warmup, 1) with 0-based epochs "
            "(0: no ramp)",
            int,
            0,
            None,
        ),
        "w_ce": HParam(1.0, "weight of the cross-entropy with the labels", float, 0.0, None),
        "logit_std": HParam(
            False,
            "z-score each sample's logits before the tempered softmax (Sun et al. CVPR 2024; official code: "
            "T = 2, alpha = 9, beta = 72)",
            bool,
        ),
    }

    @classmethod
    def check_combination(cls, hp):
        if hp["alpha"] == 0 and hp["beta"] == 0:
            raise ConfigError(
                "dkd.alpha and dkd.beta are both 0, so DKD adds nothing; set one > 0 or use 'ce'"
            )

    def losses(self, out: StepOutputs):
        hp = self.hp
        ramp = warmup_factor(out.epoch, hp["warmup"])
        terms = {
            "dkd": ramp
            * dkd(out.student_logits, out.teacher_logits, out.targets, hp["alpha"], hp["beta"], hp["T"],
                   hp["logit_std"])
        }
        if hp["w_ce"] > 0:
            terms["ce"] = hp["w_ce"] * F.cross_entropy(out.student_logits.float(), out.targets)
        return terms
