"""CC, correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019),
**as the CRD benchmark code computes it** (RepDistiller ``distiller_zoo/CC.py`` "Correlation", with
``LinearEmbed`` heads built in ``train_student.py`` and applied in ``helper/loops.py``; mdistiller has no CC):
``CE + beta * L_CC`` with ``beta = 0.02`` (``-b 0.02``, CE weight 1, no KD term) on 128-d linear embeddings of
both networks' pooled penultimate vectors; the term is :func:`cc`. The paper's kernel form is not offered.

Both embeddings (``embed_s``: student width -> 128, ``embed_t``: teacher width -> 128; one ``nn.Linear`` each,
PyTorch's default init, no normalisation, created in that order as RepDistiller does) are trainable modules:
the student's optimiser trains them with its lr, momentum and weight decay (RepDistiller's ``trainable_list``).
The teacher's vector comes detached; only ``embed_t`` gets its gradient.

More: docs/methods.md §CC (paper vs code, why CC acts as a weak regulariser).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses._features import W_CE, feature_sizes, with_ce
from kdtune.losses.base import HParam, Method, MethodContext, StepOutputs, fp32, register_method


def cc(student_embed: Tensor, teacher_embed: Tensor) -> Tensor:
    """The official CC term on embeddings (B, D): ``Delta = |e_s - e_t|``,
    ``L = mean_{i=0..B-2} sum_d Delta_{i,d} Delta_{i+1,d}`` -- products of **consecutive** samples' residuals in
    batch order (RepDistiller ``Correlation.forward``), not the paper's kernel correlation matrices (see the
    module docstring). A batch of one sample gives 0 (the official mean over no pair is NaN). Float32, autocast
    off."""
    with fp32():
        delta = (student_embed.float() - teacher_embed.float()).abs()
        prod = (delta[:-1] * delta[1:]).sum(dim=1)
        return prod.mean() if prod.numel() else delta.sum() * 0.0


@register_method
class CC(Method):
    name = "cc"
    summary = (
        "Peng et al. ICCV 2019 as RepDistiller codes it: w_ce*CE + beta*CC on two trainable linear embeddings"
    )
    needs_teacher = True
    needs_student_features = True
    needs_teacher_features = True
    hparams = {
        "beta": HParam(0.02, "weight of the CC term (RepDistiller's -b 0.02)", float, 0.0, None),
        "embed_dim": HParam(128, "width of the two trainable linear embeddings (RepDistiller's --feat_dim 128)",
                            int, 1, None),
        "w_ce": W_CE,
    }  # fmt: skip

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        d_s, d_t = feature_sizes(ctx, "cc")
        d = int(hp["embed_dim"])
        self.embed_s = nn.Linear(d_s, d)
        self.embed_t = nn.Linear(d_t, d)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"embed_s": self.embed_s, "embed_t": self.embed_t}

    def losses(self, out: StepOutputs):
        if out.student_features is None or out.teacher_features is None:
            raise ConfigError("cc needs the student's and the teacher's features; the engine must pass them")
        with fp32():
            e_s = self.embed_s(out.student_features.float())
            e_t = self.embed_t(out.teacher_features.float())
        terms = {"cc": self.hp["beta"] * cc(e_s, e_t)}
        return with_ce(terms, out, self.hp["w_ce"])
