"""HSAKD, hierarchical self-supervised augmented knowledge distillation (Yang, Xu, An & Xu, "Hierarchical
Self-supervised Augmented Knowledge Distillation", IJCAI 2021), the frozen-teacher variant, as its official code
computes it (winycg/HSAKD @ 28c8dc2: ``train_teacher_cifar.py --freezed``, ``train_student_cifar.py``,
``models/*.py``; the fact sheet ``FEATURE_METHODS.md`` §11).

Every image of a batch is shown in its four rotations (``rot90(x, k)``, ``k = 0..3``: 4B images a step) and
both networks carry **auxiliary branches** (:mod:`kdtune.models.aux_heads`) that classify the joint label
``4 y + k`` (class and rotation, 4 C classes) from intermediate stages. Two steps, two methods:

More: docs/methods.md §HSAKD.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses._features import stage_maps, stage_shapes
from kdtune.losses.base import HParam, Method, MethodContext, StepOutputs, fp32, register_method
from kdtune.models.aux_heads import ROTATIONS, build_aux_heads, has_aux_heads, no_heads_error

HSAKD_T = 3.0  # train_student_cifar.py --kd_T 3


def rotations(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The official batch expansion: ``x4[4 i + k] = rot90(x[i], k, dims=(2, 3))`` (``torch.stack([...], 1)
    .view(-1, ...)``) and joint labels ``y4[4 i + k] = 4 y[i] + k``, for ``k = 0..3``. Square images only (a
    quarter turn of a non-square image has another shape). The layout of ``x`` (channels-last) is kept."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ConfigError(f"hsakd rotates images by quarter turns and needs square (B, C, H, H) batches; got "
                          f"{tuple(x.shape)}")  # fmt: skip
    x4 = torch.stack([torch.rot90(x, k, (2, 3)) for k in range(ROTATIONS)], 1).reshape(-1, *x.shape[1:])
    if x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        x4 = x4.contiguous(memory_format=torch.channels_last)
    y4 = (y.unsqueeze(1) * ROTATIONS + torch.arange(ROTATIONS, device=y.device, dtype=y.dtype)).reshape(-1)
    return x4, y4


def original_labels(joint: Tensor) -> Tensor:
    """The class labels of the unrotated copies (rows ``0::4``) from the joint labels ``4 y + k``."""
    return torch.div(joint[0::ROTATIONS], ROTATIONS, rounding_mode="floor")


def kl_t(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """The official ``DistillKL``: ``T^2 * kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean")``,
    i.e. ``T^2 / N sum_n sum_c p_t (log p_t - log p_s)`` over the N rows, in float32."""
    s, t = student_logits.float(), teacher_logits.float()
    log_p_s = F.log_softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


def hsakd_loss(student_logits: Tensor, teacher_logits: Tensor, student_aux: list[Tensor], teacher_aux: list[Tensor],
               labels: Tensor, temperature: float = HSAKD_T) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The three unweighted terms of ``train_student_cifar.py``'s loss, ``(ce, aux, main)``:

    - ``ce = CE(z_s[0::4], y)`` on the unrotated copies (``labels`` = y, B of them);
    - ``aux = sum_l KL_T(p_t^l || p_s^l)`` over the branches (paired by position), all 4B rows;
    - ``main = KL_T(p_t || p_s)`` of the main heads, all 4B rows.

    Logits may be bf16 (autocast); everything is computed in float32 with autocast off.
    """
    if len(teacher_aux) < len(student_aux):
        raise ValueError(f"{len(student_aux)} student branches but {len(teacher_aux)} teacher branches")
    with fp32():
        ce = F.cross_entropy(student_logits[0::ROTATIONS].float(), labels)
        aux = torch.zeros((), device=student_logits.device)
        for s, t in zip(student_aux, teacher_aux):
            aux = aux + kl_t(s, t.detach(), temperature)
        main = kl_t(student_logits, teacher_logits.detach(), temperature)
    return ce, aux, main


def _autocast_like(maps) -> Any:
    """The autocast the networks ran under, read off their stage maps (bf16 maps: the engine's bf16 autocast), so
    that the branches run as the backbones do (bf16 on a GPU); the losses themselves are fp32."""
    x = maps.post[0] if maps.post else maps.stem
    if x.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(x.device.type, dtype=x.dtype)
    return nullcontext()


class _Rotations:
    """What both HSAKD methods share: the four-rotation batch, and per-branch joint accuracy on the training
    batches as the method's epoch statistics (the official ``ss_accuracy``)."""

    views_per_image = ROTATIONS  # the engine counts source images, not rotated copies, in its images/s

    def transform_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return rotations(x, y)

    def _count(self, logits: list[Tensor], joint: Tensor) -> None:
        with torch.no_grad():
            hits = torch.stack([(z.argmax(1) == joint).sum() for z in logits]).float()
        self._hits = hits if getattr(self, "_hits", None) is None else self._hits + hits
        self._rows = getattr(self, "_rows", 0) + joint.shape[0]

    def _reset(self) -> None:
        self._hits, self._rows = None, 0

    def epoch_metrics(self) -> dict[str, float]:
        if getattr(self, "_hits", None) is None or not self._rows:
            return {}
        acc = (100.0 * self._hits / self._rows).tolist()
        self._reset()
        return {f"aux{i}_acc": a for i, a in enumerate(acc, start=1)}


@register_method
class HSAKDHeads(_Rotations, Method):
    """HSAKD's teacher stage (frozen variant): the auxiliary branches of the teacher, trained on its frozen stage
    maps with the joint-label cross-entropy. ``model=`` is the teacher's architecture, ``teacher=`` its checkpoint:
    the engine trains the branches on that network itself (``extends_teacher``), frozen, and saves the teacher
    with its branches in ``final.pt`` (``method=hsakd`` reads them from there)."""

    name = "hsakd_heads"
    summary = ("Yang et al. 2021 (HSAKD), teacher stage: rotation heads on the frozen teacher, "
               "sum_l CE(aux_l(rot_k x), 4y+k)")  # fmt: skip
    needs_teacher = True  # the network the branches extend (teacher=<checkpoint>)
    needs_student_stages = True  # the engine runs that network, frozen, as this run's model
    # the engine makes the teacher this run's model, frozen (eval mode, no gradient, not optimised)
    extends_teacher = True
    hparams: dict[str, HParam] = {}

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        stage_shapes(ctx, "hsakd_heads", teacher=False)
        self.heads = build_aux_heads(ctx.student, ctx.num_classes)
        if ctx.extra.get("channels_last"):
            self.heads = self.heads.to(memory_format=torch.channels_last)
        self._reset()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"aux": self.heads}

    def export_heads(self) -> nn.Module:
        """The branches the run's checkpoints carry beside the (unchanged) network."""
        return self.heads

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self._reset()

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        st = out.student_stages
        if st is None:
            raise ConfigError("hsakd_heads needs the network's stage maps; the engine must pass them")
        with _autocast_like(st):
            logits = self.heads(st)  # the frozen network's maps carry no graph: only the branches learn
        with fp32():
            aux = sum(F.cross_entropy(z.float(), out.targets) for z in logits)
            ce = F.cross_entropy(out.student_logits[0::ROTATIONS].float(), original_labels(out.targets))
        self._count(logits, out.targets)
        return {"aux_ce": aux, "ce": ce}


@register_method
class HSAKD(_Rotations, Method):
    """HSAKD's student as ``train_student_cifar.py`` trains it (see the module docstring). The teacher must carry
    its branches (a checkpoint written by ``method=hsakd_heads``, or an official HSAKD ``*_aux`` checkpoint); a
    plain teacher is refused in one line that gives the command making them."""

    name = "hsakd"
    summary = ("Yang et al. 2021 (HSAKD): 4 rotations, w_ce*CE(z_s[0::4],y) + w_aux*sum_l T^2 KL(aux_t^l||aux_s^l) "
               "+ w_main*T^2 KL(z_t||z_s)")  # fmt: skip
    needs_teacher = True
    needs_student_stages = True
    needs_teacher_stages = True
    needs_teacher_heads = True  # the engine loads the teacher's branches (ctx.extra["teacher_heads"])
    hparams = {
        "T": HParam(HSAKD_T, "temperature of both KL terms (official --kd_T 3)", float, 0.0, None, low_open=True),
        "w_ce": HParam(1.0, "weight of the CE of the main head on the unrotated copies", float, 0.0, None),
        "w_aux": HParam(1.0, "weight of the KL between teacher and student branches (sum over branches)", float,
                        0.0, None),
        "w_main": HParam(1.0, "weight of the KL between the main heads over all four rotations", float, 0.0, None),
    }  # fmt: skip

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        stage_shapes(ctx, "hsakd", teacher=False)
        t_heads = ctx.extra.get("teacher_heads")
        if t_heads is None:
            if ctx.teacher is not None and not has_aux_heads(ctx.teacher):
                raise no_heads_error(ctx.teacher)
            raise ConfigError("hsakd needs the teacher's HSAKD branches (a teacher checkpoint written by "
                              "`kdtune train method=hsakd_heads ...`); the engine passes them in ctx.extra")  # fmt: skip
        t_heads.eval()
        for p in t_heads.parameters():
            p.requires_grad_(False)
        self.teacher_heads = t_heads
        # paired by position: the official loop runs over the student's branches (a teacher with more keeps its
        # first ones; a student with more keeps as many as the teacher has)
        self.student_heads = build_aux_heads(ctx.student, ctx.num_classes, branches=len(t_heads))
        if ctx.extra.get("channels_last"):
            self.student_heads = self.student_heads.to(memory_format=torch.channels_last)
        self._reset()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"aux": self.student_heads}

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self._reset()

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        s_st, t_st = stage_maps(out, "hsakd")
        n = len(self.student_heads)
        with _autocast_like(s_st):
            s_aux = self.student_heads(s_st)  # keeps the graph into the student's backbone (grad=True)
            with torch.no_grad():
                self.teacher_heads.eval()
                t_aux = [
                    self.teacher_heads.branch(i, x)
                    for i, x in enumerate(self.teacher_heads.inputs(t_st)[:n], 1)
                ]
        ce, aux, main = hsakd_loss(out.student_logits, out.teacher_logits, s_aux, t_aux,
                                   original_labels(out.targets), self.hp["T"])  # fmt: skip
        self._count(s_aux, out.targets)
        terms = {}
        if self.hp["w_ce"] > 0:
            terms["ce"] = self.hp["w_ce"] * ce
        if self.hp["w_aux"] > 0:
            terms["aux_kd"] = self.hp["w_aux"] * aux
        if self.hp["w_main"] > 0:
            terms["kd"] = self.hp["w_main"] * main
        if not terms:
            terms["kd"] = 0.0 * main
        return terms
