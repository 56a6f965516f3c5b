"""PKT, probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with Probabilistic
Knowledge Transfer", ECCV 2018), as the CRD benchmark code computes it (RepDistiller
``distiller_zoo/PKT.py``, the authors' code; mdistiller's ``distillers/PKT.py`` is the same):
``CE + beta * L_PKT`` on the pooled penultimate vectors, with RepDistiller's ``beta = 30000`` (``-b 30000``,
CE weight 1, no KD term).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdtune.losses._features import W_CE, with_ce
from kdtune.losses.base import HParam, Method, StepOutputs, fp32, register_method

PKT_EPS = 1e-7  # the official code's eps: in the row normalisation and inside the log


def _unit_rows(x: Tensor, eps: float) -> Tensor:
    """``x_i / (||x_i|| + eps)`` per row, NaN entries set to 0, as the official code.

    The norm is ``sqrt(sum x^2)`` as the official code computes it (same forward bits); only its gradient at an
    all-zero row differs: there the official autograd gives NaN (``sqrt``'s backward at 0 is ``0 * inf``), here
    the formula's own derivative ``I / eps`` (the norm's contribution is 0 at ``x = 0``)."""
    sq = x.pow(2).sum(dim=1, keepdim=True)
    pos = sq > 0
    norm = torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    u = x / (norm + eps)
    return torch.where(torch.isnan(u), torch.zeros_like(u), u)


def pkt_probabilities(x: Tensor, eps: float = PKT_EPS) -> Tensor:
    """The (B, B) row-stochastic matrix of PKT: ``P_ij = (1 + cos(x_i, x_j)) / 2``, each row divided by its sum
    (the official code's form of the paper's kernel conditional probabilities: cosine kernel, rows normalised,
    diagonal included)."""
    u = _unit_rows(x.reshape(x.shape[0], -1), eps)
    k = (u @ u.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt(student_features: Tensor, teacher_features: Tensor, eps: float = PKT_EPS) -> Tensor:
    """Passalis & Tefas, ECCV 2018, section 3: the KL divergence between the teacher's and the student's
    conditional probabilities built from a kernel over the batch, with the cosine kernel ``(1 + cos) / 2`` (the
    paper's "cosine similarity metric"; its equation numbers were not checked against a copy of the paper),
    as the official code computes it: ``L = mean_{i,j} P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))`` over all
    ``B^2`` entries.

    ``P^s``, ``P^t``: :func:`pkt_probabilities` of the student's and the teacher's pooled vectors (any widths:
    only the within-network cosine similarities are compared). The paper's loss is the KL divergence
    ``sum_i sum_j P^t_ij log(P^t_ij / P^s_ij)``; the official code takes the **mean** over the ``B^2`` entries
    (i.e. the mean row KL divided by ``B``, which is why its weight is 30000 at ``B = 64``), adds ``eps = 1e-7``
    inside the log (numerator and denominator), normalises rows by ``||x|| + eps`` and sets NaN entries (only a
    NaN or infinite input makes them) to 0; an all-zero row is a zero vector after normalisation, so its ``P``
    row is uniform. The teacher side carries no gradient. Computed in float32 with autocast off.
    """
    with fp32():
        s, t = student_features.float(), teacher_features.float()
        with torch.no_grad():
            p_t = pkt_probabilities(t, eps)
        p_s = pkt_probabilities(s, eps)
        return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


@register_method
class PKT(Method):
    name = "pkt"
    summary = (
        "Passalis & Tefas ECCV 2018: w_ce*CE + beta*PKT (cosine-kernel KL of penultimate vectors, B^2 mean)"
    )
    needs_teacher = True
    needs_student_features = True
    needs_teacher_features = True
    hparams = {
        "beta": HParam(30000.0, "weight of the PKT term (RepDistiller's -b 30000 at batch 64: the term is a "
                       "mean over B^2 entries)", float, 0.0, None),
        "w_ce": W_CE,
    }  # fmt: skip

    def losses(self, out: StepOutputs):
        terms = {"pkt": self.hp["beta"] * pkt(out.student_features, out.teacher_features)}
        return with_ce(terms, out, self.hp["w_ce"])
