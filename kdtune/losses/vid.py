"""VID, variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information
Distillation for Knowledge Transfer", CVPR 2019), as the CRD benchmark code computes it
(HobbitLong/RepDistiller @ b84f547, ``distiller_zoo/VID.py`` and ``train_student.py``; the fact sheet
``FEATURE_METHODS.md`` section 6).

VID maximises a variational lower bound of the mutual information between teacher and student stage maps:
a Gaussian ``q(t | s)`` whose mean is a small network of the student's map and whose variance is one learnt
value per teacher channel. Its negative log-likelihood, summed over the paired stages, is the loss
(:func:`vid_nll`, :func:`vid`).

Trainable state (per paired stage a :class:`VIDRegressor`: the mean regressor and the variance parameters
``alpha``) is returned by ``trainable_modules()`` and carried by every checkpoint. The regressors grow with
the square of the teacher's widths. More: docs/methods.md §VID (the regressor, the size warning).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses._features import W_CE, match_resolution, stage_maps, stage_shapes, with_ce
from kdtune.losses.base import HParam, Method, MethodContext, StepOutputs, fp32, register_method

VID_EPS = 1e-5  # RepDistiller VIDLoss(eps=1e-5)
VID_INIT_VAR = 5.0  # RepDistiller VIDLoss(init_pred_var=5.0)


def inverse_softplus(v: float) -> float:
    """The ``alpha`` with ``softplus(alpha) = v`` (v > 0): ``log(exp(v) - 1)``, written
    ``v + log(1 - exp(-v))`` so that it neither overflows for large ``v`` nor loses digits for small ones.
    RepDistiller initialises ``log_scale = log(exp(init_pred_var - eps) - 1)``: this of ``init_var - eps``."""
    if not v > 0:
        raise ValueError(f"softplus takes only positive values, got {v}")
    return v + math.log(-math.expm1(-v))


def vid_nll(mean: Tensor, target: Tensor, variance: Tensor) -> Tensor:
    """One stage's VID loss: ``mean_{b,c,h,w} 1/2 [ (mu_bchw - t_bchw)^2 / sigma2_c + log sigma2_c ]``.

    ``mean`` (mu) and ``target`` (t) are ``(B, C, H, W)``, ``variance`` (sigma^2) is ``(C,)``, positive.

    Paper (Ahn et al. 2019, section 3, the Gaussian ``-log q(t | s)`` with a per-channel variance,
    ``sigma_c^2 = softplus(alpha_c) + eps``): ``sum_{c,h,w} [ log sigma_c + (t - mu)^2 / (2 sigma_c^2) ]``
    plus a constant. Official code (RepDistiller ``VIDLoss.forward``): the same summand without the constant
    ``1/2 log 2 pi``, **averaged** over batch, channels and positions instead of summed, so VID's weight
    (beta = 1 in the benchmark) is relative to that mean. This function is the official one.
    """
    var = variance.reshape(1, -1, 1, 1)
    return (0.5 * ((mean - target) ** 2 / var + torch.log(var))).mean()


class VIDRegressor(nn.Module):
    """One paired stage of VID: the mean regressor and the per-channel variance parameters ``alpha``.

    Attribute names are RepDistiller's ``VIDLoss`` (``regressor``, ``log_scale``), so a state dict of one
    loads into the other unchanged (the cross-check of the tests uses that).
    """

    def __init__(self, student_channels: int, teacher_channels: int, init_var: float = VID_INIT_VAR,
                 eps: float = VID_EPS):  # fmt: skip
        super().__init__()
        c_s, c_t = int(student_channels), int(teacher_channels)
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, c_t, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_t, c_t, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_t, c_t, kernel_size=1, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((c_t,), inverse_softplus(init_var - eps)))
        self.eps = float(eps)

    def variance(self) -> Tensor:
        """``sigma^2_c = softplus(alpha_c) + eps``, shape ``(C_t,)``.

        RepDistiller writes the softplus ``log(1 + exp(alpha))``: the same function, but in float32
        ``1 + exp(alpha)`` rounds away most of ``exp(alpha)`` once ``alpha`` is below about -5 (sigma^2 near
        its floor ``eps``: the loss is then off by up to 1e-3 relative) and overflows above 88. ``F.softplus``
        is exact there; elsewhere the two agree to float32 rounding (the cross-check against RepDistiller's
        ``VIDLoss``).
        """
        return F.softplus(self.log_scale.float()) + self.eps

    def forward(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        s, t = match_resolution(student_map, teacher_map)
        return vid_nll(self.regressor(s), t, self.variance())


def vid(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], regressors: Sequence[VIDRegressor]
        ) -> Tensor:  # fmt: skip
    """``L_VID = sum_l vid_nll(R_l(pool(f_s^l)), pool(f_t^l), sigma2_l)`` over the paired stages (position by
    position; ``len(regressors)`` pairs, which both lists must have at least). Computed in float32 with
    autocast off whatever the dtype of the maps; the teacher's maps are targets (detached)."""
    if len(student_maps) < len(regressors) or len(teacher_maps) < len(regressors):
        raise ValueError(f"VID has {len(regressors)} regressors but got {len(student_maps)} student and "
                         f"{len(teacher_maps)} teacher maps")  # fmt: skip
    with fp32():
        total = None
        for reg, s, t in zip(regressors, student_maps, teacher_maps):
            term = reg(s.float(), t.detach().float())
            total = term if total is None else total + term
    assert total is not None
    return total


@register_method
class VID(Method):
    """VID as RepDistiller trains it: ``w_ce CE + beta sum_l VID_l`` over the paired post-activation stage
    outputs (``feat[1:-1]``, paired by position and truncated to the shorter list), no KD term.

    **sigma^2 is learnt**, as in RepDistiller (``log_scale`` is an ``nn.Parameter`` of each ``VIDLoss``, all
    of them in ``trainable_list``). mdistiller (``distillers/VID.py``) keeps its ``log_scales`` in a plain
    Python list, so they are never optimised (sigma^2 stays ``init_var`` for the whole run) nor checkpointed;
    kdtune follows RepDistiller, whose numbers the CRD and Hamidi tables report.
    """

    name = "vid"
    summary = "Ahn et al. 2019: w_ce*CE + beta*sum_stages mean 1/2[(R(f_s)-f_t)^2/s2_c + log s2_c], s2 learnt"
    needs_teacher = True
    needs_student_stages = True
    needs_teacher_stages = True
    hparams = {
        "beta": HParam(1.0, "weight of the VID term (sum over stages; RepDistiller -b 1)", float, 0.0, None),
        "w_ce": W_CE,
        "init_var": HParam(VID_INIT_VAR, "initial variance sigma^2 of each teacher channel (then learnt)",
                           float, 0.0, None, low_open=True),
        "eps": HParam(VID_EPS, "floor added to the softplus variance", float, 0.0, 1.0, low_open=True),
    }  # fmt: skip

    @classmethod
    def check_combination(cls, hp: dict[str, Any]) -> None:
        if not hp["init_var"] > hp["eps"]:
            raise ConfigError(f"vid.init_var={hp['init_var']} must exceed vid.eps={hp['eps']} "
                              "(sigma^2 = softplus(alpha) + eps > eps)")  # fmt: skip

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        stage_shapes(ctx, "vid")
        pairs = list(zip(ctx.student_stages.post, ctx.teacher_stages.post))
        if not pairs:
            raise ConfigError("vid: student or teacher has no stage outputs to pair")
        self.regressors = nn.ModuleList(VIDRegressor(s[0], t[0], hp["init_var"], hp["eps"]) for s, t in pairs)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"vid": self.regressors}

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        s, t = stage_maps(out, "vid")
        return with_ce({"vid": self.hp["beta"] * vid(s.post, t.post, self.regressors)}, out, self.hp["w_ce"])
