"""Helpers the feature methods share (not a method: modules starting with ``_`` are not registered): the pairing
of maps at one resolution (AT, VID), the stage shapes and feature sizes a method is built from, the stage
maps a step must carry, and the cross-entropy term every
feature method adds (``w_ce CE``: RepDistiller's ``-r 1`` beside ``-b gamma``, no KD term)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdtune.errors import ConfigError
from kdtune.losses.base import HParam, MethodContext, StepOutputs

# The CE weight of every feature method: RepDistiller's -r 1 (the CRD benchmark and the seed's gamma's).
W_CE = HParam(1.0, "weight of the cross-entropy with the labels (1 in the CRD benchmark)", float, 0.0, None)


def match_resolution(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """The pair at one resolution: the larger map ``adaptive_avg_pool2d``-ed to the smaller one's ``(H, W)``
    (before any regressor or attention: RepDistiller pools the feature map, not the result). RepDistiller
    compares the heights only and pools to a square ``(H, H)``; identical for the square maps of the zoo, kdtune
    keeps the width of non-square ones."""
    hs, ht = tuple(student_map.shape[-2:]), tuple(teacher_map.shape[-2:])
    if hs == ht:
        return student_map, teacher_map
    if hs[0] > ht[0] or (hs[0] == ht[0] and hs[1] > ht[1]):
        return F.adaptive_avg_pool2d(student_map, ht), teacher_map
    return student_map, F.adaptive_avg_pool2d(teacher_map, hs)


def stage_maps(out: StepOutputs, method: str):
    """``(student Stages, teacher Stages)`` of a step, or the one-line error when the engine passed none."""
    if out.student_stages is None or out.teacher_stages is None:
        raise ConfigError(f"{method} needs the stage maps of student and teacher; the engine must pass both")
    return out.student_stages, out.teacher_stages


def stage_shapes(ctx: MethodContext, method: str, teacher: bool = True):
    """``(student StageShapes, teacher StageShapes or None)`` a method builds its modules from, or the one-line
    error when the engine probed none (``teacher``: the teacher's are needed too)."""
    if ctx.student_stages is None or (teacher and ctx.teacher_stages is None):
        which = "student and teacher (MethodContext.student_stages and teacher_stages" if teacher else \
            "student (MethodContext.student_stages"
        raise ConfigError(f"{method} needs the stage shapes of {which}, probed by the engine); got none")
    return ctx.student_stages, ctx.teacher_stages


def feature_sizes(ctx: MethodContext, method: str) -> tuple[int, int]:
    """The student's and the teacher's pooled feature sizes a method's embeddings are built for, or the
    one-line error when a model has none."""
    if not ctx.student_feat_dim or not ctx.teacher_feat_dim:
        raise ConfigError(f"{method} needs the student's and the teacher's feature sizes (student_feat_dim, "
                          "teacher_feat_dim); use models with feat_dim")  # fmt: skip
    return int(ctx.student_feat_dim), int(ctx.teacher_feat_dim)


def with_ce(terms: dict[str, Tensor], out: StepOutputs, w_ce: float) -> dict[str, Tensor]:
    """``terms`` with ``ce = w_ce CE(student logits, labels)`` where ``w_ce > 0``."""
    if w_ce > 0:
        terms["ce"] = w_ce * F.cross_entropy(out.student_logits.float(), out.targets)
    return terms
