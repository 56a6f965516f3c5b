"""AT, attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance
of Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928), as the official code and
the CRD benchmark code compute it (szagoruyko/attention-transfer @ 893df54 ``utils.py::at, at_loss``;
HobbitLong/RepDistiller @ b84f547 ``distiller_zoo/AT.py``; mdistiller identical; fact sheet
``FEATURE_METHODS.md`` section 3).

Each paired stage's map becomes a spatial attention map ``Q = mean_c |f_c|^p`` (one value per position),
flattened and L2-normalised per sample; the loss is the mean squared difference of the student's and the
teacher's normalised maps, summed over the paired stages (the post-activation stage outputs f1..fL, RepDistiller's
``feat[1:-1]``, paired by position and truncated to the shorter list). No trainable module, no state.

kdtune follows the code (weight beta = 1000), not the paper's eq. 2 (both in :func:`at_loss`); a larger map is
pooled to the smaller size before the attention (:func:`at_pair`). More: docs/methods.md §AT (paper vs code).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kdtune.errors import ConfigError
from kdtune.losses._features import W_CE, match_resolution, stage_maps, with_ce
from kdtune.losses.base import HParam, Method, MethodContext, StepOutputs, fp32, register_method


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """``normalize(mean_c |f|^p)`` of a ``(B, C, H, W)`` map: ``(B, H*W)``, each row of unit L2 norm
    (``F.normalize``: ``x / max(||x||_2, 1e-12)``).

    The official code writes ``f.pow(p)`` without the absolute value, correct only for even p (the paper's
    ``|A|^p``); kdtune takes ``|f|^p``, bit for bit the same for p = 2 (``|x|^2 == x^2`` in floating point), and
    defined for every p (signed maps such as WRN's raw residual sums would otherwise give NaN for non-integer p).
    ``reshape``, never ``view``: channels-last maps. Float32 whatever the input dtype."""
    f = f.float()
    return F.normalize(f.abs().pow(p).mean(dim=1).reshape(f.shape[0], -1), dim=1)


def at_pair(student_map: Tensor, teacher_map: Tensor, p: float = 2.0) -> Tensor:
    """One stage's term: ``mean_{b, hw} (Q_s - Q_t)^2`` with ``Q = attention_map(pooled map, p)`` (RepDistiller
    ``Attention.at_loss``), the larger map pooled to the smaller size first. Float32, autocast off."""
    with fp32():
        s, t = match_resolution(student_map.float(), teacher_map.detach().float())
        return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def at_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """``L_AT = sum_j mean_{b, hw} ( normalize(mean_c |f_s^j|^p) - normalize(mean_c |f_t^j|^p) )^2``.

    Zagoruyko & Komodakis 2017, eq. 2 (the official code's form: no 1/2, squared, averaged over batch and
    positions; see the module docstring). Stages are paired by position and truncated to the shorter list
    (RepDistiller's ``zip``); the teacher's maps are targets (detached). Unweighted: the method multiplies by
    beta.

    The paper's eq. 2 is ``beta/2 sum_j || Q_S^j/||Q_S^j||_2 - Q_T^j/||Q_T^j||_2 ||_p``; the official code has
    **no /2**, **squares** the difference and **averages** it over the batch and the H*W positions (so each
    stage's term carries a factor 1/(H*W)), and takes the mean over channels where the paper sums (the same
    after the L2 normalisation)."""
    pairs = list(zip(student_maps, teacher_maps))
    if not pairs:
        raise ValueError("at_loss needs at least one pair of stage maps")
    total = at_pair(*pairs[0], p)
    for s, t in pairs[1:]:
        total = total + at_pair(s, t, p)
    return total


@register_method
class AT(Method):
    """AT as RepDistiller trains it (``--distill attention -r 1 -a 0 -b 1000``): ``w_ce CE + beta L_AT`` over the
    paired post-activation stage outputs, no KD term."""

    name = "at"
    summary = "Zagoruyko & Komodakis 2017: w_ce*CE + beta*sum_stages mean (normalize(mean_c |f_s|^p) - normalize(mean_c |f_t|^p))^2"
    needs_teacher = True
    needs_student_stages = True
    needs_teacher_stages = True
    hparams = {
        "beta": HParam(1000.0, "weight of the attention term (sum over stages; RepDistiller -b 1000, Hamidi et al. "
                       "gamma)", float, 0.0, None),
        "p": HParam(2.0, "exponent of the attention map mean_c |f|^p (official 2)", float, 0.0, None, low_open=True),
        "w_ce": W_CE,
    }  # fmt: skip

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        s, t = ctx.student_stages, ctx.teacher_stages
        if s is not None and t is not None and not (s.post and t.post):
            raise ConfigError("at: student or teacher has no stage outputs to pair")

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        s, t = stage_maps(out, "at")
        return with_ce({"at": self.hp["beta"] * at_loss(s.post, t.post, self.hp["p"])}, out, self.hp["w_ce"])
