"""FitNet, hint-based training (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015, arXiv:1412.6550), as the CRD benchmark code trains it (HobbitLong/RepDistiller @ b84f547
``distiller_zoo/FitNet.py``, ``models/util.py::ConvReg``, ``train_student.py``, ``helper/loops.py``; mdistiller
identical; fact sheet ``FEATURE_METHODS.md`` section 2).

A convolutional regressor ``R`` (trainable, :class:`ConvReg`) maps the student's guided layer to the shape of the
teacher's hint layer, and the loss is the mean squared error between them (:func:`hint_loss`). Both layers
are the same index of RepDistiller's feature list, ``hint_layer``: 0 is the stem output f0 (kdtune
``Stages.stem``), 1..L the post-activation stage outputs f1..fL (``Stages.post[l - 1]``); default 2
(``--hint_layer 2``).

One stage, ``CE + 100 * MSE`` from the first epoch (the code, not the paper's two stages). The regressor is
built in ``__init__`` from the probed stage shapes, trained by the student's optimiser and carried by every
checkpoint (``method_modules``). More: docs/methods.md §FitNet (paper vs code, the regressor).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses._features import W_CE, stage_maps, stage_shapes, with_ce
from kdtune.losses.base import HParam, Method, MethodContext, StageShapes, StepOutputs, fp32, register_method


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _tconv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size - 1) * stride - 2 * pad + kernel


def regressor_kind(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> str:
    """Which convolution ``ConvReg`` uses for per-sample shapes ``(C_s, H_s, W_s) -> (C_t, H_t, W_t)``, in
    RepDistiller's order: ``"stride2"`` (``H_s == 2 H_t``: 3x3 stride 2 pad 1), ``"transpose"`` (``2 H_s == H_t``:
    ConvTranspose 4x4 stride 2 pad 1), ``"kxk"`` (``H_s >= H_t``: kernel ``(1 + H_s - H_t, 1 + W_s - W_t)``,
    1x1 when equal). Raises ConfigError naming both shapes when the pair admits none (the student's map smaller
    but not half, or a width the chosen convolution does not bring to the teacher's); RepDistiller raises
    ``NotImplemented(...)`` there, itself an error."""
    (_, hs, ws), (_, ht, wt) = s_shape, t_shape
    if hs == 2 * ht:
        kind, out = "stride2", (_conv_out(hs, 3, 2, 1), _conv_out(ws, 3, 2, 1))
    elif 2 * hs == ht:
        kind, out = "transpose", (_tconv_out(hs, 4, 2, 1), _tconv_out(ws, 4, 2, 1))
    elif hs >= ht and ws >= wt:
        kind, out = "kxk", (ht, wt)
    else:
        kind, out = "", ()
    if out != (ht, wt):
        raise ConfigError(
            f"fitnet: no regressor maps the student's hint map {'x'.join(map(str, s_shape))} to the teacher's "
            f"{'x'.join(map(str, t_shape))} (ConvReg needs H_s = 2 H_t, 2 H_s = H_t or H_s >= H_t with the widths "
            "alike); choose another hint_layer or pair"
        )
    return kind


class ConvReg(nn.Module):
    """RepDistiller's ``ConvReg(s_shape, t_shape, use_relu=True)``: one convolution (see :func:`regressor_kind`,
    with bias, PyTorch's default init), ``BatchNorm2d(C_t)``, ReLU. Attribute names (``conv``, ``bn``) are
    RepDistiller's, so a state dict of one loads into the other unchanged."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]):
        super().__init__()
        (c_s, hs, ws), (c_t, ht, wt) = (tuple(int(v) for v in s_shape), tuple(int(v) for v in t_shape))
        self.kind = regressor_kind((c_s, hs, ws), (c_t, ht, wt))
        if self.kind == "stride2":
            self.conv: nn.Module = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif self.kind == "transpose":
            self.conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + hs - ht, 1 + ws - wt))
        self.bn = nn.BatchNorm2d(c_t)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def hint_loss(regressed_student: Tensor, teacher_map: Tensor) -> Tensor:
    """``L_hint = mean_{b,c,h,w} (R(f_s) - f_t)^2`` (``nn.MSELoss``), on the student's map already passed through
    the regressor. Romero et al. 2015, eq. 3 (``1/2 ||u_h(x) - r(v_g(x))||^2`` summed per sample); the
    official benchmark code averages over every element and drops the 1/2. Float32, autocast off; the teacher's
    map is a target (detached). Unweighted: the method multiplies by beta."""
    if regressed_student.shape != teacher_map.shape:
        raise ValueError(f"hint_loss: regressed student {tuple(regressed_student.shape)} and teacher "
                         f"{tuple(teacher_map.shape)} differ")  # fmt: skip
    with fp32():
        return F.mse_loss(regressed_student.float(), teacher_map.detach().float())


def hint_shape(shapes: StageShapes, layer: int, who: str) -> tuple[int, ...]:
    """The per-sample shape of RepDistiller's ``feat[layer]`` (0 = stem, 1..L = post stages)."""
    maps = (shapes.stem, *shapes.post)
    if layer >= len(maps):
        raise ConfigError(f"fitnet.hint_layer={layer}: the {who} has only {len(maps)} feature maps (0 = stem, "
                          f"1..{len(maps) - 1} = stages)")  # fmt: skip
    shape = tuple(maps[layer])
    if len(shape) != 3:
        raise ConfigError(
            f"fitnet.hint_layer={layer}: the {who}'s map there has shape {shape}, not (C, H, W)"
        )
    return shape


def hint_map(stages: Any, layer: int) -> Tensor:
    return stages.stem if layer == 0 else stages.post[layer - 1]


@register_method
class FitNet(Method):
    """FitNet as RepDistiller trains it (``--distill hint -r 1 -a 0 -b 100 --hint_layer 2``): ``w_ce CE +
    beta MSE(ConvReg(f_s^h), f_t^h)`` in one stage, no KD term."""

    name = "fitnet"
    summary = "Romero et al. 2015 (CRD code, one stage): w_ce*CE + beta*mean (ConvReg(f_s^h) - f_t^h)^2"
    needs_teacher = True
    needs_student_stages = True
    needs_teacher_stages = True
    hparams = {
        "beta": HParam(100.0, "weight of the hint term (RepDistiller -b 100)", float, 0.0, None),
        "hint_layer": HParam(2, "feature map the hint uses, in both networks: 0 = stem, 1..L = stage outputs "
                             "(RepDistiller --hint_layer 2)", int, 0, 4),
        "w_ce": W_CE,
    }  # fmt: skip

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        stage_shapes(ctx, "fitnet")
        layer = hp["hint_layer"]
        s_shape = hint_shape(ctx.student_stages, layer, "student")
        t_shape = hint_shape(ctx.teacher_stages, layer, "teacher")
        self.regressor = ConvReg(s_shape, t_shape)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"regressor": self.regressor}

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        s, t = stage_maps(out, "fitnet")
        layer = self.hp["hint_layer"]
        with fp32():
            regressed = self.regressor(hint_map(s, layer).float())
        return with_ce({"hint": self.hp["beta"] * hint_loss(regressed, hint_map(t, layer))}, out, self.hp["w_ce"])
