"""SP, similarity-preserving knowledge distillation (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
ICCV 2019, arXiv:1907.09682), as the CRD benchmark code computes it (HobbitLong/RepDistiller @ b84f547
``distiller_zoo/SP.py``, "verified by original author"; mdistiller identical; fact sheet ``FEATURE_METHODS.md``
section 4).

The student is asked to reproduce the teacher's pairwise similarities between the samples of a batch: each
network's last stage output (RepDistiller ``feat[-2]``, kdtune ``Stages.post[-1]``) is flattened per sample,
``G = F F^T`` is its ``B x B`` Gram matrix, each row is L2-normalised, and the loss is the squared Frobenius
distance of the two normalised matrices over ``B^2``. The two networks' maps may have any shapes (only B must
agree). No trainable module, no state.

Paper and code agree (the paper's eq. 2-4, summed over the chosen layer pairs; the benchmark uses the last one).
The term depends on the batch's composition and, through the row normalisation and the 1/B^2, on B itself:
the published weight beta = 3000 is tied to B = 64.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kdtune.errors import ConfigError
from kdtune.losses._features import W_CE, stage_maps, with_ce
from kdtune.losses.base import HParam, Method, MethodContext, StepOutputs, fp32, register_method


def similarity_matrix(f: Tensor) -> Tensor:
    """``normalize(F F^T)`` of a ``(B, ...)`` map, ``F = f.reshape(B, -1)``: the ``B x B`` Gram matrix with each
    row scaled to unit L2 norm (``F.normalize``, ``x / max(||x||_2, 1e-12)``). ``reshape``, never ``view`` (the
    official code's ``view`` fails on channels-last maps). Float32, autocast and TF32 off."""
    flat = f.float().reshape(f.shape[0], -1)
    with fp32():  # TF32 off too: a Gram of 64 x 32768 entries in TF32 is ~1e-3 off, times beta = 3000
        return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """``L_SP = || normalize(G_t) - normalize(G_s) ||_F^2 / B^2``, ``G = F F^T`` of the flattened maps.

    Tung & Mori 2019, eq. 2-4 (one layer pair): the paper's ``1/b^2 ||G_T - G_S||_F^2`` with row-normalised
    Gram matrices, exactly as the official code computes it. The teacher's map is a target (detached).
    Unweighted: the method multiplies by beta."""
    b = student_map.shape[0]
    if teacher_map.shape[0] != b:
        raise ValueError(f"sp_loss: student batch {b} and teacher batch {teacher_map.shape[0]} differ")
    g_s = similarity_matrix(student_map)
    g_t = similarity_matrix(teacher_map.detach())
    with fp32():
        return (g_t - g_s).pow(2).sum() / (b * b)


@register_method
class SP(Method):
    """SP as RepDistiller trains it (``--distill similarity -r 1 -a 0 -b 3000``): ``w_ce CE + beta L_SP`` on the
    last post-activation stage output of each network, no KD term."""

    name = "sp"
    summary = "Tung & Mori 2019: w_ce*CE + beta*||normalize(G_t) - normalize(G_s)||_F^2/B^2, G = Gram of the last stage"
    needs_teacher = True
    needs_student_stages = True
    needs_teacher_stages = True
    hparams = {
        "beta": HParam(3000.0, "weight of the similarity term (RepDistiller -b 3000 at batch 64, Hamidi et al. "
                       "gamma)", float, 0.0, None),
        "w_ce": W_CE,
    }  # fmt: skip

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        s, t = ctx.student_stages, ctx.teacher_stages
        if s is not None and t is not None and not (s.post and t.post):
            raise ConfigError("sp: student or teacher has no stage outputs")

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        s, t = stage_maps(out, "sp")
        return with_ce({"sp": self.hp["beta"] * sp_loss(s.post[-1], t.post[-1])}, out, self.hp["w_ce"])
