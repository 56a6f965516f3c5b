"""DIST, knowledge distillation from a stronger teacher (Huang, You, Wang, Qian & Xu, NeurIPS 2022).

arXiv:2205.14589, section 3: Pearson distances between the student's and the teacher's tempered
probabilities, per sample over the classes (inter-class) and per class over the batch (intra-class); the
formulas are :func:`dist`'s. kdtune follows the official code (hunto/DIST_KD, also used for the CIFAR-100
numbers): each relation term is multiplied by ``tau^2`` (``tau_sq=False`` drops it), and a constant row or
column counts as correlation 0, never NaN.

The intra term depends on the whole batch: it is computed on the batch the method is given (under
data-parallel training a per-shard mean unless the logits are gathered first). With fewer than 2 rows only the
inter term is returned; with fewer than 2 classes the loss is an exact 0.
More: docs/methods.md §DIST (the invariances, the degenerate shapes).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdtune.errors import ConfigError
from kdtune.losses.base import HParam, Method, StepOutputs, register_method

PEARSON_EPS = 1e-8  # added to the product of the norms, as in the official code


def pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (slides' ``rho_p``), shape (B,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(y_s: Tensor, y_t: Tensor) -> Tensor:
    """``L_inter`` (Huang et al. 2022, sec. 3): ``1 - mean over rows of rho_p(y_s[i, :], y_t[i, :])``."""
    return 1.0 - pearson_rows(y_s, y_t).mean()


def intra_class_relation(y_s: Tensor, y_t: Tensor) -> Tensor:
    """``L_intra`` (Huang et al. 2022, sec. 3): ``1 - mean over columns of rho_p(y_s[:, j], y_t[:, j])``."""
    return inter_class_relation(y_s.t(), y_t.t())


def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float,
    gamma: float,
    tau: float,
    *,
    tau_sq: bool = True,
) -> Tensor:
    """DIST distillation term, Huang et al. NeurIPS 2022 (``L_tr`` without the CE), official-code convention.

    arXiv:2205.14589, section 3 (the equations as on the authors' slides, ``papers/dist_*``). With
    ``Y = softmax(Z / tau)`` row-wise (``B x C``) and the Pearson distance ``d_p(u, v) = 1 - rho_p(u, v)``,
    ``rho_p`` the cosine of the mean-centred vectors:

    - inter-class relation: ``L_inter = 1/B sum_i d_p(Y^s[i, :], Y^t[i, :])`` (rows: one sample's
      distribution over the classes);
    - intra-class relation: ``L_intra = 1/C sum_j d_p(Y^s[:, j], Y^t[:, j])`` (columns: one class's
      probabilities over the batch);
    - training loss: ``L_tr = alpha * CE + beta * L_inter + gamma * L_intra``.

    The official code's ``rho = <u_c, v_c> / (|u_c| |v_c| + 1e-8)``, so a constant row or column counts as
    correlation 0, never NaN.

    ``tau^2 * (beta * L_inter + gamma * L_intra)`` on ``softmax(logits / tau)``, float32 inside;
    ``tau_sq=False`` gives the paper's ``beta * L_inter + gamma * L_intra``. With ``B < 2`` only the inter
    term is returned (the intra correlation is undefined); with ``C < 2`` the result is 0.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    s = student_logits.float()
    if s.dim() != 2 or s.shape != teacher_logits.shape:
        raise ValueError(
            f"logits must both be (B, C), got {tuple(s.shape)} and {tuple(teacher_logits.shape)}"
        )
    batch, classes = s.shape
    if classes < 2 or batch < 1:
        return s.sum() * 0.0
    y_s = F.softmax(s / tau, dim=1)
    y_t = F.softmax(teacher_logits.float() / tau, dim=1)
    loss = beta * inter_class_relation(y_s, y_t)
    if batch >= 2:
        loss = loss + gamma * intra_class_relation(y_s, y_t)
    return loss * tau**2 if tau_sq else loss


@register_method
class DIST(Method):
    name = "dist"
    summary = "Huang et al. NeurIPS 2022: w_ce*CE + w_kd*tau^2*(beta*inter + gamma*intra) Pearson relations"
    needs_teacher = True
    hparams = {
        "beta": HParam(1.0, "weight of the inter-class relation (Pearson over each row)", float, 0.0, None),
        "gamma": HParam(
            1.0, "weight of the intra-class relation (Pearson over each column)", float, 0.0, None
        ),
        "tau": HParam(4.0, "softmax temperature of teacher and student", float, 0.0, None, low_open=True),
        "w_kd": HParam(2.0, "weight of the whole DIST term", float, 0.0, None),
        "w_ce": HParam(1.0, "weight of the cross-entropy with the labels", float, 0.0, None),
        "tau_sq": HParam(True, "multiply the DIST term by tau^2 as the official code does", bool),
    }

    @classmethod
    def check_combination(cls, hp):
        if hp["beta"] == 0 and hp["gamma"] == 0:
            raise ConfigError(
                "dist.beta and dist.gamma are both 0, so DIST adds nothing; set one > 0 or use 'ce'"
            )

    def losses(self, out: StepOutputs):
        hp = self.hp
        term = dist(
            out.student_logits, out.teacher_logits, hp["beta"], hp["gamma"], hp["tau"], tau_sq=hp["tau_sq"]
        )
        terms = {"dist": hp["w_kd"] * term}
        if hp["w_ce"] > 0:
            terms["ce"] = hp["w_ce"] * F.cross_entropy(out.student_logits.float(), out.targets)
        return terms
