"""RKD, relational knowledge distillation (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019),
as the CRD benchmark code computes it (RepDistiller ``distiller_zoo/RKD.py``; mdistiller's ``distillers/RKD.py``
is the same, ``PDIST.EPSILON 1e-12``, ``SQUARED False``): ``CE + beta * (w_dist * L_D + w_angle * L_A)`` on the
pooled penultimate vectors, with ``beta = 1``, ``w_dist = 25``, ``w_angle = 50`` (RepDistiller ``-b 1`` and
``RKDLoss(w_d=25, w_a=50)``; CE weight 1, no KD term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.losses._features import W_CE
from kdtune.losses.base import HParam, Method, StepOutputs, fp32, register_method

RKD_EPS = 1e-12  # the clamp of the squared distances (RepDistiller's pdist eps)


def pairwise_distances(e: Tensor, eps: float = RKD_EPS) -> Tensor:
    """(B, B) Euclidean distances by the Gram expansion, as the official ``pdist(e, squared=False)``:
    ``sqrt(max(||e_i||^2 + ||e_j||^2 - 2 e_i.e_j, eps))``, then the diagonal set to 0. The expansion cancels
    catastrophically in low precision (call it on float32 with autocast off); near-duplicate rows end at
    ``sqrt(eps) = 1e-6``, with no gradient (the clamp's)."""
    e = e.reshape(e.shape[0], -1)
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _normalised_distances(e: Tensor, eps: float) -> Tensor:
    """:func:`pairwise_distances` divided by their mean over the positive (off-diagonal) entries, the paper's
    ``mu``. The mean is a masked sum over a count (no host sync); a batch of one sample (no positive entry) gives
    zeros where the official ``d[d > 0].mean()`` gives NaN."""
    d = pairwise_distances(e, eps)
    pos = d > 0
    mean = (d * pos).sum() / pos.sum().clamp_min(1)
    return d / torch.where(mean > 0, mean, torch.ones_like(mean))


def rkd_distance(student_features: Tensor, teacher_features: Tensor, eps: float = RKD_EPS) -> Tensor:
    """Park et al. 2019, section 3.2, distance-wise loss: ``psi_D(t_i, t_j) = ||t_i - t_j|| / mu`` with ``mu`` the
    mean distance over the batch's pairs, ``L_D = sum l_delta(psi_D(s), psi_D(t))``, ``l_delta`` the Huber loss
    (``delta = 1``).

    As the official code: distances by the Gram expansion clamped at ``eps = 1e-12`` (:func:`pairwise_distances`),
    ``mu`` the mean of the **positive** entries, and the Huber loss is ``F.smooth_l1_loss`` (``beta = 1``)
    **averaged over all ``B^2`` entries**, the zero diagonal included (the paper sums over pairs). The teacher side
    is computed without gradient. Float32, autocast off.
    """
    with fp32():
        s, t = student_features.float(), teacher_features.float()
        with torch.no_grad():
            d_t = _normalised_distances(t, eps)
        d_s = _normalised_distances(s, eps)
        return F.smooth_l1_loss(d_s, d_t)


def angles(e: Tensor) -> Tensor:
    """(B, B, B) cosines ``A_ijk = u_ij . u_ik`` with ``u_ij = normalize(e_j - e_i)`` (``F.normalize``: eps
    1e-12, a zero difference stays zero, so degenerate triplets are 0 or 1), as the official code's ``bmm``."""
    e = e.reshape(e.shape[0], -1)
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(u, u.transpose(1, 2))


def rkd_angle(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Park et al. 2019, section 3.2, angle-wise loss: ``psi_A(t_i, t_j, t_k) = cos angle t_i t_j t_k =
    <e_ij, e_kj>`` with ``e_ij = (t_i - t_j) / ||t_i - t_j||``, ``L_A = sum l_delta(psi_A(s), psi_A(t))`` over the
    triplets.

    As the official code: all ``B^3`` ordered triplets (vertex first, :func:`angles`), degenerate ones included,
    ``F.smooth_l1_loss`` (``beta = 1``) **averaged over the ``B^3`` entries**; the teacher side without gradient.
    Float32, autocast off.
    """
    with fp32():
        s, t = student_features.float(), teacher_features.float()
        with torch.no_grad():
            a_t = angles(t)
        a_s = angles(s)
        return F.smooth_l1_loss(a_s.reshape(-1), a_t.reshape(-1))


def rkd(student_features: Tensor, teacher_features: Tensor, w_dist: float = 25.0, w_angle: float = 50.0,
        eps: float = RKD_EPS) -> Tensor:  # fmt: skip
    """The paper's combination ``lambda_D * L_D + lambda_A * L_A`` (section 3.2, RKD-DA), with the official
    weights 25 and 50 (RepDistiller ``RKDLoss``); see :func:`rkd_distance` and :func:`rkd_angle` for the
    conventions."""
    out = student_features.new_zeros((), dtype=torch.float32)
    if w_dist:
        out = out + w_dist * rkd_distance(student_features, teacher_features, eps)
    if w_angle:
        out = out + w_angle * rkd_angle(student_features, teacher_features)
    return out


@register_method
class RKD(Method):
    name = "rkd"
    summary = (
        "Park et al. CVPR 2019: w_ce*CE + beta*(w_dist*L_distance + w_angle*L_angle) on penultimate vectors"
    )
    needs_teacher = True
    needs_student_features = True
    needs_teacher_features = True
    hparams = {
        "beta": HParam(1.0, "overall weight of the RKD terms (RepDistiller's -b 1)", float, 0.0, None),
        "w_dist": HParam(25.0, "weight of the distance-wise term (Huber on mean-normalised pairwise distances)",
                         float, 0.0, None),
        "w_angle": HParam(50.0, "weight of the angle-wise term (Huber on the cosines of all B^3 triplets)",
                          float, 0.0, None),
        "w_ce": W_CE,
    }  # fmt: skip

    def losses(self, out: StepOutputs):
        hp = self.hp
        s, t = out.student_features, out.teacher_features
        terms = {}
        if hp["w_dist"] > 0:
            terms["rkd_dist"] = hp["beta"] * hp["w_dist"] * rkd_distance(s, t)
        if hp["w_angle"] > 0:
            terms["rkd_angle"] = hp["beta"] * hp["w_angle"] * rkd_angle(s, t)
        if hp["w_ce"] > 0 or not terms:
            terms["ce"] = hp["w_ce"] * F.cross_entropy(out.student_logits, out.targets)
        return terms
