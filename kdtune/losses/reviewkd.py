"""ReviewKD, knowledge review (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021,
arXiv:2104.09044), as its official CIFAR-100 code computes it (dvlab-research/ReviewKD @ cede6ea,
``CIFAR-100/model/reviewkd.py`` -- ``ABF``, ``ReviewKD``, ``build_review_kd``, ``hcl`` -- and
``CIFAR-100/train.py``; fact sheet ``FEATURE_METHODS.md`` section 10).

**Levels.** The student's levels, fine to coarse, are its post-activation stage outputs f1..fL
(``Stages.post``) and its pooled vector h as a ``(B, C, 1, 1)`` map; the teacher's are its *pre-activation*
stage maps (``Stages.pre``: the official ``teacher(x, is_feat=True, preact=True)[0][1:]``) and its pooled h.
Level l of the student is paired with level l of the teacher.

More: docs/methods.md §ReviewKD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses._features import W_CE, stage_maps, stage_shapes, with_ce
from kdtune.losses.base import HParam, Method, MethodContext, StageShapes, StepOutputs, fp32, register_method

MID_CHANNELS_MAX = 512  # official: mid_channel = min(512, in_channels[-1])
HCL_SIZES = (4, 2, 1)  # official hcl: for l in [4, 2, 1], skipped unless l < h


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ReviewConfig:
    """The official ``build_review_kd`` lists, derived from a pair's stage shapes.

    ``in_channels`` / ``out_channels``: student / teacher channels per level, fine to coarse (pooled h last);
    ``shapes`` / ``out_shapes``: student / teacher ``(H, W)`` per level, coarse to fine (``(1, 1)`` first);
    ``mid_channels``: the ABFs' width; ``skipped``: the student's finest stages left out (it has more levels
    than its teacher)."""

    in_channels: tuple[int, ...]
    out_channels: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    out_shapes: tuple[tuple[int, int], ...]
    mid_channels: int
    skipped: int = 0

    @property
    def levels(self) -> int:
        return len(self.in_channels)


def _whole_factor(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Nearest interpolation from ``a`` to ``b`` replicates (b a multiple of a) or subsamples regularly (a a
    multiple of b) in both dimensions."""
    return all(x % y == 0 or y % x == 0 for x, y in zip(a, b))


def _levels(shapes: StageShapes, maps: Sequence[tuple[int, ...]], who: str, pair: str) -> list[tuple[int, int, int]]:
    out = []
    for i, s in enumerate(maps):
        if len(s) != 3:
            raise ConfigError(f"reviewkd cannot pair {pair}: the {who}'s stage {i + 1} has shape {tuple(s)}, not "
                              "(C, H, W)")  # fmt: skip
        out.append((int(s[0]), int(s[1]), int(s[2])))
    return out + [(int(shapes.pooled), 1, 1)]


def review_config(student: StageShapes, teacher: StageShapes, pair: str = "student with teacher") -> ReviewConfig:
    """The ABF configuration of a pair (``pair`` names it in errors, e.g. ``"student resnet8 with teacher
    resnet20"``): student levels = post stages + pooled h, teacher levels = pre stages + pooled h, paired from
    the coarse end. Raises a one-line ConfigError saying why a pair cannot be fused."""
    s_lv = _levels(student, student.post, "student", pair)
    t_lv = _levels(teacher, teacher.pre, "teacher", pair)
    if len(s_lv) < len(t_lv):
        raise ConfigError(
            f"reviewkd cannot pair {pair}: the student has {len(s_lv)} levels ({len(s_lv) - 1} stages + pooled h) "
            f"and the teacher {len(t_lv)}; ReviewKD fuses one student level into each teacher level, so the "
            "student needs at least as many; choose another pair"
        )
    skipped = len(s_lv) - len(t_lv)
    s_lv = s_lv[skipped:]
    shapes = tuple((h, w) for _, h, w in reversed(s_lv))
    out_shapes = tuple((h, w) for _, h, w in reversed(t_lv))
    prev = out_shapes[0]
    for k in range(1, len(shapes)):  # coarse to fine: residual prev -> shapes[k], result shapes[k] -> out_shapes[k]
        for a, b, what in ((prev, shapes[k], "the coarser level's fused map"),
                           (shapes[k], out_shapes[k], "the fused map")):  # fmt: skip
            if not _whole_factor(a, b):
                raise ConfigError(
                    f"reviewkd cannot pair {pair}: at level {len(shapes) - k} (fine to coarse) {what} would be "
                    f"resized from {a[0]}x{a[1]} to {b[0]}x{b[1]}, not by a whole factor, so nearest interpolation "
                    f"samples it irregularly (student sizes {[s[0] for s in shapes]}, teacher "
                    f"{[s[0] for s in out_shapes]}, coarse to fine); choose another pair"
                )
        prev = out_shapes[k]
    return ReviewConfig(
        in_channels=tuple(c for c, _, _ in s_lv),
        out_channels=tuple(c for c, _, _ in t_lv),
        shapes=shapes,
        out_shapes=out_shapes,
        mid_channels=min(MID_CHANNELS_MAX, s_lv[-1][0]),
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------- modules
class ABF(nn.Module):
    """Attention-based fusion of one level. Attribute names and layout are the official ``ABF``'s (``conv1``,
    ``conv2``, ``att_conv`` as ``Sequential``s), so a state dict of one loads into the other unchanged."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None = None, out_size: tuple[int, int] | None = None
                ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """``(y, x')``: the level's result and its fused map (the residual of the next finer level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("an ABF with attention needs the coarser level's residual")
            r = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, r], dim=1))
            x = x * z[:, 0:1] + r * z[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def build_abfs(cfg: ReviewConfig) -> nn.ModuleList:
    """One ABF per level, built fine to coarse as the official ``ReviewKD.__init__`` (so the global RNG is drawn
    in its order) and returned coarse to fine (its ``abfs[::-1]``)."""
    n = cfg.levels
    abfs = [ABF(c_in, cfg.mid_channels, cfg.out_channels[i], i < n - 1) for i, c_in in enumerate(cfg.in_channels)]
    return nn.ModuleList(abfs[::-1])


def review(student_levels: Sequence[Tensor], abfs: Sequence[ABF], out_shapes: Sequence[tuple[int, int]]
           ) -> list[Tensor]:  # fmt: skip
    """The review path: ``student_levels`` fine to coarse (the coarsest a ``(B, C, 1, 1)`` map), ``abfs`` and
    ``out_shapes`` coarse to fine; returns the results fine to coarse (the teacher's order)."""
    if not len(student_levels) == len(abfs) == len(out_shapes):
        raise ValueError(f"review: {len(student_levels)} student levels, {len(abfs)} ABFs, {len(out_shapes)} "
                         "teacher sizes; they must be equal")  # fmt: skip
    xs = list(student_levels)[::-1]
    y, res = abfs[0](xs[0], out_size=out_shapes[0])
    results = [y]
    for x, abf, size in zip(xs[1:], abfs[1:], out_shapes[1:]):
        y, res = abf(x, res, size)
        results.insert(0, y)
    return results


def hcl(student_results: Sequence[Tensor], teacher_levels: Sequence[Tensor]) -> Tensor:
    """The hierarchical context loss summed over levels (see the module docstring), float32 with autocast off;
    the teacher's maps are targets (detached)."""
    if len(student_results) != len(teacher_levels):
        raise ValueError(f"hcl: {len(student_results)} student results and {len(teacher_levels)} teacher levels")
    with fp32():
        total = None
        for fs, ft in zip(student_results, teacher_levels):
            fs, ft = fs.float(), ft.detach().float()
            if fs.shape != ft.shape:
                raise ValueError(f"hcl: student result {tuple(fs.shape)} and teacher {tuple(ft.shape)} differ")
            loss, w, tot = F.mse_loss(fs, ft), 1.0, 1.0
            for s in HCL_SIZES:
                if s >= fs.shape[2]:
                    continue
                w /= 2.0
                loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, (s, s)), F.adaptive_avg_pool2d(ft, (s, s)))
                tot += w
            total = loss / tot if total is None else total + loss / tot
    if total is None:
        raise ValueError("hcl: no levels")
    return total


def warmup_factor(epoch: int, warmup: float) -> float:
    """``min(1, epoch / warmup)`` for 0-based ``epoch`` (official: 0 in the first epoch); 1 if 0."""
    if warmup <= 0:
        return 1.0
    return min(1.0, epoch / warmup)


def as_map(pooled: Tensor) -> Tensor:
    """The pooled vector ``(B, C)`` as the official ``(B, C, 1, 1)`` map."""
    return pooled.reshape(pooled.shape[0], -1, 1, 1)


# ---------------------------------------------------------------------------------------------- the method
@register_method
class ReviewKD(Method):
    """ReviewKD as its official CIFAR-100 code trains it: ``w_ce CE + beta min(1, epoch/warmup) sum_l
    HCL(ABF-review(student post stages, h), teacher pre stages, h)``, no KD term; teacher in eval mode (the
    module docstring says what that changes)."""

    name = "reviewkd"
    summary = ("Chen et al. 2021: w_ce*CE + beta*min(1, epoch/warmup)*sum_l HCL(ABF review of student stages, "
               "teacher pre-activation stages)")  # fmt: skip
    needs_teacher = True
    needs_student_stages = True
    needs_teacher_stages = True
    hparams = {
        "beta": HParam(5.0, "weight of the review (HCL) term; official --kd-loss-weight per pair: 0.6 "
                       "resnet56->resnet20, 1 resnet110->resnet32, 5 wrn_40_2/resnet32x4 pairs, 8 "
                       "resnet32x4->shufflev2", float, 0.0, None),
        "warmup": HParam(20.0, "epochs of linear ramp of the review term, min(1, epoch/warmup) with 0-based "
                         "epochs (0 in the first epoch; 0: no ramp); official --kd-warm-up 20", float, 0.0, None),
        "w_ce": W_CE,
    }  # fmt: skip

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        stage_shapes(ctx, "reviewkd")
        s = getattr(ctx.student, "kdtune_arch", None) or type(ctx.student).__name__
        t = getattr(ctx.teacher, "kdtune_arch", None) or type(ctx.teacher).__name__
        self.config = review_config(ctx.student_stages, ctx.teacher_stages, f"student {s} with teacher {t}")
        self.abfs = build_abfs(self.config)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"abfs": self.abfs}

    def review_loss(self, out: StepOutputs) -> Tensor:
        """The unweighted ``sum_l HCL_l`` of a step."""
        s, t = stage_maps(out, "reviewkd")
        s_levels = [*s.post[self.config.skipped :], as_map(s.pooled)]
        t_levels = [*t.pre, as_map(t.pooled)]
        with fp32():
            results = review([f.float() for f in s_levels], self.abfs, self.config.out_shapes)
        return hcl(results, t_levels)

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        factor = warmup_factor(out.epoch, self.hp["warmup"])
        terms = {"reviewkd": (self.hp["beta"] * factor) * self.review_loss(out)}
        return with_ce(terms, out, self.hp["w_ce"])
