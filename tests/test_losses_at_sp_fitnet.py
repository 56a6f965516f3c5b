"""AT, SP and FitNet: golden values, the regressor per pair, the methods as the engine drives them, end to end.

Every reference below is an independent float64 derivation written from the official code's formulas (fact sheet
``FEATURE_METHODS.md`` sections 2-4): Python loops over plain floats for small inputs, and for large inputs float64
tensor formulas spelled differently from the code under test (a channel sum instead of a mean, pooling by
reshaping into blocks, norms as square roots of sums of squares, convolutions as loops). None calls kdtune's
functions. The tensors given to kdtune are float32; the references read the same float32 values.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kdtune.errors import ConfigError
from kdtune.losses import METHODS, MethodContext, StepOutputs
from kdtune.losses.at import at_loss, at_pair, attention_map
from kdtune.losses.base import StageShapes, probe_stage_shapes
from kdtune.losses.fitnet import ConvReg, hint_loss, regressor_kind
from kdtune.losses.sp import similarity_matrix, sp_loss
from kdtune.models import create_model

CPU = torch.device("cpu")


def rand(*shape, seed=0, signed=False, scale=1.0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return x if signed else x.abs()


# ----------------------------------------------------------------------------- float64 references (loops)
def pool_ref(sample, out_h, out_w):
    """adaptive average pooling of one [C][H][W] sample: window [floor(i H / o), ceil((i + 1) H / o))."""
    c_n, h_n, w_n = len(sample), len(sample[0]), len(sample[0][0])
    out = []
    for c in range(c_n):
        rows = []
        for i in range(out_h):
            h0, h1 = (i * h_n) // out_h, -((-(i + 1) * h_n) // out_h)
            row = []
            for j in range(out_w):
                w0, w1 = (j * w_n) // out_w, -((-(j + 1) * w_n) // out_w)
                vals = [sample[c][h][w] for h in range(h0, h1) for w in range(w0, w1)]
                row.append(sum(vals) / len(vals))
            rows.append(row)
        out.append(rows)
    return out


def attention_ref(sample, p):
    c_n, h_n, w_n = len(sample), len(sample[0]), len(sample[0][0])
    q = [sum(abs(sample[c][h][w]) ** p for c in range(c_n)) / c_n for h in range(h_n) for w in range(w_n)]
    norm = math.sqrt(sum(v * v for v in q))
    return [v / max(norm, 1e-12) for v in q]


def at_pair_ref(s, t, p=2.0):
    """RepDistiller Attention.at_loss: the larger map pooled to the smaller, then mean (Q_s - Q_t)^2."""
    s, t = s.tolist(), t.tolist()
    hs, ws, ht, wt = len(s[0][0]), len(s[0][0][0]), len(t[0][0]), len(t[0][0][0])
    if hs > ht:
        s = [pool_ref(x, ht, wt) for x in s]
    elif hs < ht:
        t = [pool_ref(x, hs, ws) for x in t]
    total, n = 0.0, 0
    for xs, xt in zip(s, t):
        for a, b in zip(attention_ref(xs, p), attention_ref(xt, p)):
            total += (a - b) ** 2
            n += 1
    return total / n


def sp_ref(s, t):
    """Tung & Mori eq. 2-4: row-normalised Gram matrices, squared Frobenius distance over B^2."""
    b = s.shape[0]

    def gram(f):
        rows = [r for r in f.reshape(b, -1).tolist()]
        g = [[sum(x * y for x, y in zip(ri, rj)) for rj in rows] for ri in rows]
        out = []
        for r in g:
            norm = math.sqrt(sum(v * v for v in r))
            out.append([v / max(norm, 1e-12) for v in r])
        return out

    gs, gt = gram(s), gram(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def conv_ref(x, weight, bias, stride, pad):
    """Cross-correlation of [B][C][H][W] with weight [O][C][kh][kw], zero padding."""
    b_n, c_n, h_n, w_n = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    o_n, kh, kw = len(weight), len(weight[0][0]), len(weight[0][0][0])
    oh, ow = (h_n + 2 * pad - kh) // stride + 1, (w_n + 2 * pad - kw) // stride + 1
    out = [[[[bias[o] for _ in range(ow)] for _ in range(oh)] for o in range(o_n)] for _ in range(b_n)]
    for b in range(b_n):
        for o in range(o_n):
            for i in range(oh):
                for j in range(ow):
                    acc = 0.0
                    for c in range(c_n):
                        for u in range(kh):
                            for v in range(kw):
                                h, w = i * stride - pad + u, j * stride - pad + v
                                if 0 <= h < h_n and 0 <= w < w_n:
                                    acc += x[b][c][h][w] * weight[o][c][u][v]
                    out[b][o][i][j] += acc
    return out


def tconv_ref(x, weight, bias, stride, pad):
    """Transposed convolution: input (i, j) scatters weight [C][O][kh][kw] to (i s - pad + u, j s - pad + v)."""
    b_n, c_n, h_n, w_n = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    o_n, kh, kw = len(weight[0]), len(weight[0][0]), len(weight[0][0][0])
    oh, ow = (h_n - 1) * stride - 2 * pad + kh, (w_n - 1) * stride - 2 * pad + kw
    out = [[[[bias[o] for _ in range(ow)] for _ in range(oh)] for o in range(o_n)] for _ in range(b_n)]
    for b in range(b_n):
        for c in range(c_n):
            for i in range(h_n):
                for j in range(w_n):
                    for o in range(o_n):
                        for u in range(kh):
                            for v in range(kw):
                                h, w = i * stride - pad + u, j * stride - pad + v
                                if 0 <= h < oh and 0 <= w < ow:
                                    out[b][o][h][w] += x[b][c][i][j] * weight[c][o][u][v]
    return out


def bn_relu_ref(y, gamma, beta, eps=1e-5):
    """BatchNorm2d in training mode (batch statistics, biased variance), then ReLU."""
    b_n, o_n, h_n, w_n = len(y), len(y[0]), len(y[0][0]), len(y[0][0][0])
    out = copy.deepcopy(y)
    for o in range(o_n):
        vals = [y[b][o][h][w] for b in range(b_n) for h in range(h_n) for w in range(w_n)]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)
        for b in range(b_n):
            for h in range(h_n):
                for w in range(w_n):
                    z = (y[b][o][h][w] - mean) / math.sqrt(var + eps) * gamma[o] + beta[o]
                    out[b][o][h][w] = max(z, 0.0)
    return out


def hint_ref(reg: ConvReg, s, t):
    """mean (ReLU(BN(conv(f_s))) - f_t)^2 with the regressor's own parameters, all in float64 loops."""
    conv = reg.conv
    w, bias = conv.weight.tolist(), conv.bias.tolist()
    if isinstance(conv, torch.nn.ConvTranspose2d):
        y = tconv_ref(s.tolist(), w, bias, conv.stride[0], conv.padding[0])
    else:
        y = conv_ref(s.tolist(), w, bias, conv.stride[0], conv.padding[0])
    r = bn_relu_ref(y, reg.bn.weight.tolist(), reg.bn.bias.tolist(), reg.bn.eps)
    tl = t.tolist()
    diffs = [
        (r[b][o][h][w] - tl[b][o][h][w]) ** 2
        for b in range(len(r))
        for o in range(len(r[0]))
        for h in range(len(r[0][0]))
        for w in range(len(r[0][0][0]))
    ]
    return sum(diffs) / len(diffs)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ----------------------------------------------------------------------------- float64 references (tensors)
def block_pool64(x, h):
    """Average over k x k blocks (k = H / h): the adaptive pool of a divisible size, spelled as a reshape."""
    b, c, hh, ww = x.shape
    k = hh // h
    return x.double().reshape(b, c, h, k, ww // k, k).mean(dim=(3, 5))


def at_ref64(s_maps, t_maps):
    total = 0.0
    for s, t in zip(s_maps, t_maps):
        s, t = s.double(), t.double()
        if s.shape[2] > t.shape[2]:
            s = block_pool64(s, t.shape[2])
        elif s.shape[2] < t.shape[2]:
            t = block_pool64(t, s.shape[2])
        qs, qt = (x.pow(2).sum(dim=1).flatten(1) for x in (s, t))  # channel sum: same after normalisation
        qs = qs / qs.pow(2).sum(dim=1, keepdim=True).sqrt()
        qt = qt / qt.pow(2).sum(dim=1, keepdim=True).sqrt()
        total += ((qs - qt) ** 2).sum().item() / qs.numel()
    return total


def sp_ref64(s, t):
    b = s.shape[0]

    def g(f):
        f = f.double().flatten(1)
        m = torch.einsum("ik,jk->ij", f, f)
        return m / m.pow(2).sum(dim=1, keepdim=True).sqrt()

    return (g(t) - g(s)).pow(2).sum().item() / (b * b)


# ============================================================================= AT
@pytest.mark.parametrize(
    "s_shape,t_shape,signed",
    [
        ((3, 4, 4), (2, 4, 4), False),  # equal resolution
        ((3, 4, 4), (5, 2, 2), True),  # student larger: student pooled (signed maps, |f|^2)
        ((2, 2, 2), (4, 4, 4), False),  # teacher larger: teacher pooled
        ((2, 5, 5), (3, 3, 3), True),  # non-divisible adaptive windows (overlapping)
    ],
)
def test_at_pair_golden_small(s_shape, t_shape, signed):
    s, t = rand(3, *s_shape, seed=1, signed=signed), rand(3, *t_shape, seed=2, signed=signed)
    ref = at_pair_ref(s, t)
    assert rel(at_pair(s, t).item(), ref) < 1e-6
    assert rel(1000.0 * at_pair(s, t).item(), 1000.0 * ref) < 1e-6


def test_at_sum_over_stages_truncates_to_the_shorter_list_and_p():
    s = [rand(2, 3, 4, 4, seed=3), rand(2, 4, 2, 2, seed=4), rand(2, 5, 2, 2, seed=5)]
    t = [rand(2, 2, 8, 8, seed=6), rand(2, 6, 2, 2, seed=7)]
    ref = at_pair_ref(s[0], t[0]) + at_pair_ref(s[1], t[1])
    assert rel(at_loss(s, t).item(), ref) < 1e-6
    assert (
        rel(at_loss(s, t, p=4.0).item(), at_pair_ref(s[0], t[0], 4.0) + at_pair_ref(s[1], t[1], 4.0)) < 1e-6
    )
    assert (
        rel(at_loss(s, t, p=1.0).item(), at_pair_ref(s[0], t[0], 1.0) + at_pair_ref(s[1], t[1], 1.0)) < 1e-6
    )
    with pytest.raises(ValueError):
        at_loss([], t)


def test_attention_map_rows_have_unit_norm_and_zero_maps_stay_finite():
    q = attention_map(torch.cat([rand(2, 8, 4, 4), torch.zeros(1, 8, 4, 4)]))
    assert q.shape == (3, 16) and q.dtype == torch.float32
    assert torch.allclose(q[:2].norm(dim=1), torch.ones(2), atol=1e-6)
    assert torch.equal(q[2], torch.zeros(16))  # normalize clamps the norm at 1e-12: no NaN for a dead map


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e-3])
def test_at_golden_large_maps_weighted(scale):
    """resnet50 -> mobilenetv2 at 32x32 (four pairs, the teacher pooled 32->16, 16->8, 8->4, 4->2) and an equal
    pair of full 32x32 maps, B = 64: beta = 1000 times the loss within 1e-5 relative of float64."""
    s = [
        rand(64, c, h, h, seed=10 + i, scale=scale)
        for i, (c, h) in enumerate([(12, 16), (16, 8), (48, 4), (160, 2)])
    ]
    t = [
        rand(64, c, h, h, seed=20 + i, scale=scale)
        for i, (c, h) in enumerate([(256, 32), (512, 16), (1024, 8), (2048, 4)])
    ]
    s.insert(0, rand(64, 16, 32, 32, seed=30, scale=scale))
    t.insert(0, rand(64, 64, 32, 32, seed=31, scale=scale))
    assert rel(1000.0 * at_loss(s, t).item(), 1000.0 * at_ref64(s, t)) < 1e-5


def test_at_near_identical_maps_keep_the_weighted_term_exact_in_absolute_terms():
    """Cancellation: student = teacher + 1e-3 noise. fp32 rounding of the normalised maps then dominates the
    relative error (measured ~4e-6), but the weighted term is off by far less than anything CE could notice."""
    t = rand(64, 64, 16, 16, seed=40)
    s = t + 1e-3 * torch.randn(64, 64, 16, 16, generator=torch.Generator().manual_seed(41))
    ref = at_ref64([s], [t])
    assert abs(1000.0 * at_loss([s], [t]).item() - 1000.0 * ref) < 1e-9
    assert rel(at_loss([s], [t]).item(), ref) < 1e-4


def test_at_bf16_inputs_are_computed_in_float32():
    s, t = rand(4, 8, 4, 4, seed=50), rand(4, 8, 2, 2, seed=51)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = at_loss([s.bfloat16()], [t.bfloat16()])
    assert v.dtype == torch.float32
    assert rel(v.item(), at_pair_ref(s.bfloat16().float(), t.bfloat16().float())) < 1e-6


# ============================================================================= SP
@pytest.mark.parametrize(
    "s_shape,t_shape,signed", [((2, 2, 2), (3, 2, 2), False), ((4, 3, 3), (2, 1, 1), True)]
)
def test_sp_golden_small(s_shape, t_shape, signed):
    s, t = rand(5, *s_shape, seed=60, signed=signed), rand(5, *t_shape, seed=61, signed=signed)
    ref = sp_ref(s, t)
    assert rel(sp_loss(s, t).item(), ref) < 1e-6
    g = similarity_matrix(s)
    assert g.shape == (5, 5) and torch.allclose(g.norm(dim=1), torch.ones(5), atol=1e-6)


@pytest.mark.parametrize(
    "b,s_shape,t_shape,signed",
    [
        (64, (64, 8, 8), (64, 8, 8), False),  # resnet56 -> resnet20
        (64, (160, 2, 2), (2048, 4, 4), False),  # resnet50 -> mobilenetv2 (32768 features)
        (128, (256, 8, 8), (256, 8, 8), True),  # resnet32x4 -> resnet8x4, larger batch, signed
    ],
)
def test_sp_golden_large_weighted(b, s_shape, t_shape, signed):
    s, t = rand(b, *s_shape, seed=62, signed=signed), rand(b, *t_shape, seed=63, signed=signed)
    assert rel(3000.0 * sp_loss(s, t).item(), 3000.0 * sp_ref64(s, t)) < 1e-5
    # beta up to 30000 amplifies nothing relative; the absolute error of the weighted term stays tiny
    assert abs(30000.0 * sp_loss(s, t).item() - 30000.0 * sp_ref64(s, t)) < 1e-5


def test_sp_near_identical_maps_absolute_error():
    t = rand(64, 128, 8, 8, seed=64)
    s = t + 1e-3 * torch.randn(64, 128, 8, 8, generator=torch.Generator().manual_seed(65))
    ref = sp_ref64(s, t)  # ~5e-11: fp32 keeps ~1.6e-4 of it relative (measured), i.e. ~1e-14 absolute
    assert abs(3000.0 * sp_loss(s, t).item() - 3000.0 * ref) < 1e-9
    assert rel(sp_loss(s, t).item(), ref) < 1e-3


def test_sp_channels_last_and_batch_checks():
    s, t = rand(8, 16, 4, 4, seed=66, signed=True), rand(8, 32, 2, 2, seed=67, signed=True)
    a = sp_loss(s, t)
    b = sp_loss(s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last))
    assert torch.allclose(a, b, rtol=1e-6, atol=0)  # reshape, not view: channels-last maps work
    with pytest.raises(ValueError, match="batch"):
        sp_loss(s, t[:4])


# ============================================================================= FitNet
@pytest.mark.parametrize(
    "s_shape,t_shape,kind,conv",
    [
        # resnet56 -> resnet20, wrn_40_2 -> wrn_40_1: 1x1
        ((32, 16, 16), (32, 16, 16), "kxk", (torch.nn.Conv2d, (1, 1), (1, 1), (0, 0))),
        ((32, 16, 16), (64, 16, 16), "kxk", (torch.nn.Conv2d, (1, 1), (1, 1), (0, 0))),
        ((64, 16, 16), (32, 8, 8), "stride2", (torch.nn.Conv2d, (3, 3), (2, 2), (1, 1))),  # s_H = 2 t_H
        # resnet50 -> mobilenetv2: 2 s_H = t_H
        ((16, 8, 8), (512, 16, 16), "transpose", (torch.nn.ConvTranspose2d, (4, 4), (2, 2), (1, 1))),
        ((8, 6, 6), (4, 4, 4), "kxk", (torch.nn.Conv2d, (3, 3), (1, 1), (0, 0))),  # s_H >= t_H: (1+2)x(1+2)
        ((8, 2, 2), (4, 1, 1), "stride2", (torch.nn.Conv2d, (3, 3), (2, 2), (1, 1))),
    ],
)
def test_conv_reg_per_pair(s_shape, t_shape, kind, conv):
    reg = ConvReg(s_shape, t_shape)
    assert reg.kind == kind == regressor_kind(s_shape, t_shape)
    cls, k, stride, pad = conv
    assert type(reg.conv) is cls and reg.conv.kernel_size == k and reg.conv.stride == stride
    assert reg.conv.padding == pad and reg.conv.bias is not None
    assert reg.conv.in_channels == s_shape[0] and reg.conv.out_channels == t_shape[0]
    assert isinstance(reg.bn, torch.nn.BatchNorm2d) and reg.bn.num_features == t_shape[0]
    y = reg(torch.randn(2, *s_shape))
    assert tuple(y.shape[1:]) == t_shape and (y >= 0).all()  # final ReLU


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((16, 4, 4), (32, 12, 12)), ((16, 2, 2), (32, 8, 8)), ((16, 4, 2), (32, 4, 4)), ((16, 3, 3), (8, 6, 5))],
)
def test_conv_reg_refuses_a_pair_without_regressor_in_one_line(s_shape, t_shape):
    with pytest.raises(ConfigError) as e:
        ConvReg(s_shape, t_shape)
    msg = str(e.value)
    assert "\n" not in msg and "x".join(map(str, s_shape)) in msg and "x".join(map(str, t_shape)) in msg


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((2, 2, 2), (3, 2, 2)), ((2, 4, 4), (3, 2, 2)), ((2, 2, 2), (3, 4, 4)), ((2, 5, 5), (3, 3, 3))],
)
def test_hint_golden_small_every_regressor_kind(s_shape, t_shape):
    torch.manual_seed(70)
    reg = ConvReg(s_shape, t_shape)
    with torch.no_grad():  # non-trivial BN affine parameters
        reg.bn.weight.copy_(torch.rand(t_shape[0]) + 0.5)
        reg.bn.bias.copy_(torch.randn(t_shape[0]) * 0.1)
    s, t = rand(3, *s_shape, seed=71, signed=True), rand(3, *t_shape, seed=72)
    ref = hint_ref(reg, s, t)
    got = hint_loss(reg(s), t).item()
    assert rel(got, ref) < 1e-6 and rel(100.0 * got, 100.0 * ref) < 1e-6


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_hint_golden_large_weighted(scale):
    """resnet50 -> mobilenetv2 (16@8 -> 512@16 by ConvTranspose), B = 64, beta = 100: within 1e-5 of float64
    (the regressor copied to float64; the MSE spelled as a sum over the count)."""
    torch.manual_seed(73)
    reg = ConvReg((16, 8, 8), (512, 16, 16))
    s, t = rand(64, 16, 8, 8, seed=74, signed=True, scale=scale), rand(64, 512, 16, 16, seed=75, scale=scale)
    ref_reg = copy.deepcopy(reg).double()
    d = ref_reg(s.double()) - t.double()
    ref = (d * d).sum().item() / d.numel()
    assert rel(100.0 * hint_loss(reg(s), t).item(), 100.0 * ref) < 1e-5


def test_hint_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        hint_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


# ============================================================================= the methods
def test_registration_defaults_and_ranges():
    at, sp, fit = METHODS.get("at"), METHODS.get("sp"), METHODS.get("fitnet")
    assert at.resolve() == {"beta": 1000.0, "p": 2.0, "w_ce": 1.0}
    assert sp.resolve() == {"beta": 3000.0, "w_ce": 1.0}
    assert fit.resolve() == {"beta": 100.0, "hint_layer": 2, "w_ce": 1.0}
    for cls in (at, sp, fit):
        assert cls.needs_teacher and cls.needs_student_stages and cls.needs_teacher_stages
        assert cls.unfusable and cls.summary
        with pytest.raises(ConfigError, match="beta"):
            cls.resolve({"beta": -1.0})
    with pytest.raises(ConfigError, match="p"):
        at.resolve({"p": 0.0})
    with pytest.raises(ConfigError, match="hint_layer"):
        fit.resolve({"hint_layer": 5})
    with pytest.raises(ConfigError, match="hint_layer"):
        fit.resolve({"hint_layer": 1.5})


def _pair(student: str, teacher: str, size: int, batch: int = 8, channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    s_model, t_model = create_model(student, 10, channels), create_model(teacher, 10, channels)
    t_model.eval()
    ctx = MethodContext(
        num_classes=10, epochs=1, steps_per_epoch=1, device=CPU, student=s_model, teacher=t_model,
        student_stages=probe_stage_shapes(s_model, channels, size, CPU),
        teacher_stages=probe_stage_shapes(t_model, channels, size, CPU),
    )  # fmt: skip
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed + 1))
    y = torch.arange(batch) % 10
    return s_model, t_model, ctx, x, y


def _step(s_model, t_model, x, y, autocast=False):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        with torch.no_grad():
            t_logits, t_st = t_model.forward_stages(x)
        s_logits, s_st = s_model.forward_stages(x)
    for m in [s_st.stem, *s_st.post]:
        m.retain_grad()
    out = StepOutputs(student_logits=s_logits.float(), targets=y, epoch=0, step=0, teacher_logits=t_logits.float(),
                      student_features=s_st.pooled.float(), teacher_features=t_st.pooled.float(), images=x,
                      student_stages=s_st, teacher_stages=t_st)  # fmt: skip
    return out, s_st


@pytest.mark.parametrize(
    "student,teacher,size",
    # digits-like (8x8, grey); cross-architecture at 32x32 (AT pools the teacher, FitNet's ConvTranspose)
    [("resnet8", "resnet20", 8), ("vgg8", "resnet8x4", 32)],
)
@pytest.mark.parametrize("name,term", [("at", "at"), ("sp", "sp"), ("fitnet", "hint")])
def test_method_terms_and_gradients(student, teacher, size, name, term):
    s_model, t_model, ctx, x, y = _pair(student, teacher, size, channels=1 if size == 8 else 3)
    cls = METHODS.get(name)
    method = cls(cls.resolve(), ctx)
    modules = method.trainable_modules()
    out, _ = _step(s_model, t_model, x, y)
    terms = method.losses(out)
    assert set(terms) == {"ce", term}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    assert terms[term].item() > 0
    sum(terms.values()).backward()
    assert all(p.grad is None for p in t_model.parameters())  # the teacher's maps arrive detached
    if name == "fitnet":
        assert set(modules) == {"regressor"}
        assert method.regressor.kind == ("kxk" if size == 8 else "transpose")  # 32@4 both; 256@8 -> 128@16
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in modules["regressor"].parameters())
    else:
        assert modules == {}
    # the method term alone reaches exactly the maps it reads (and what lies before them), nothing after them
    s_model.zero_grad()
    out, s_st = _step(s_model, t_model, x, y)
    method.losses(out)[term].backward()
    n_pairs = min(len(ctx.student_stages.post), len(ctx.teacher_stages.post))
    last_used = {"at": n_pairs - 1, "sp": len(s_st.post) - 1, "fitnet": 1}[name]  # hint_layer 2 = post[1]
    for i, m in enumerate(s_st.post):
        if i <= last_used:
            assert m.grad is not None and m.grad.abs().sum() > 0, i
        else:  # AT truncated to the shorter list (vgg8 has 4 stages, resnet8x4 3); FitNet's hint is stage 2
            assert m.grad is None, i
    assert s_st.stem.grad is not None and s_st.stem.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["at", "sp", "fitnet"])
def test_method_under_bf16_autocast_is_finite_float32(name):
    s_model, t_model, ctx, x, y = _pair("resnet8", "resnet20", 8)
    cls = METHODS.get(name)
    method = cls(cls.resolve(), ctx)
    out, _ = _step(s_model, t_model, x, y, autocast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.losses(out)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()


def test_method_values_equal_the_pure_functions():
    s_model, t_model, ctx, x, y = _pair("resnet8", "resnet20", 8)
    out, s_st = _step(s_model, t_model, x, y)
    t_st = out.teacher_stages
    at = METHODS.get("at")(dict(beta=7.0, p=2.0, w_ce=0.0), ctx).losses(out)
    assert set(at) == {"at"} and torch.equal(at["at"], 7.0 * at_loss(s_st.post, t_st.post))
    sp = METHODS.get("sp")(dict(beta=5.0, w_ce=0.5), ctx).losses(out)
    assert torch.equal(sp["sp"], 5.0 * sp_loss(s_st.post[-1], t_st.post[-1]))
    assert torch.allclose(sp["ce"], 0.5 * torch.nn.functional.cross_entropy(out.student_logits, y))
    fit = METHODS.get("fitnet")(dict(beta=3.0, hint_layer=0, w_ce=1.0), ctx)  # the stem: 16@8 both
    assert fit.regressor.kind == "kxk" and fit.regressor.conv.kernel_size == (1, 1)
    v = fit.losses(out)["hint"]
    assert torch.equal(v, 3.0 * hint_loss(fit.regressor(s_st.stem), t_st.stem))


def test_fitnet_refusals_in_one_line():
    s_model, t_model, ctx, x, y = _pair("resnet8", "resnet20", 8)
    fit = METHODS.get("fitnet")
    with pytest.raises(ConfigError, match="hint_layer=4.*only 4 feature maps"):
        fit(fit.resolve({"hint_layer": 4}), ctx)
    no_shapes = MethodContext(num_classes=10, epochs=1, steps_per_epoch=1, device=CPU, student=s_model)
    with pytest.raises(ConfigError, match="stage shapes"):
        fit(fit.resolve(), no_shapes)
    # a pair whose hint maps admit no ConvReg: student 4x4 against a teacher 12x12
    ctx.teacher_stages = StageShapes(stem=(16, 12, 12), post=((16, 12, 12), (32, 12, 12)), pre=(), pooled=64)
    with pytest.raises(ConfigError, match="32x4x4.*32x12x12"):
        fit(fit.resolve(), ctx)
    for name in ("at", "sp"):
        cls = METHODS.get(name)
        m = cls(
            cls.resolve(),
            MethodContext(num_classes=10, epochs=1, steps_per_epoch=1, device=CPU, student=s_model),
        )
        out = StepOutputs(
            student_logits=torch.zeros(2, 10), targets=torch.zeros(2, dtype=torch.long), epoch=0, step=0
        )
        with pytest.raises(ConfigError, match="stage maps"):
            m.losses(out)


def test_fitnet_regressor_state_round_trips():
    s_model, t_model, ctx, x, y = _pair("resnet8", "resnet20", 8)
    fit = METHODS.get("fitnet")
    a = fit(fit.resolve(), ctx)
    out, _ = _step(s_model, t_model, x, y)
    a.losses(out)  # updates the BN running statistics
    state = a.trainable_modules()["regressor"].state_dict()
    keys = {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert keys <= set(state)
    torch.manual_seed(99)
    b = fit(fit.resolve(), ctx)
    b.trainable_modules()["regressor"].load_state_dict(state)
    for k, v in b.regressor.state_dict().items():
        assert torch.equal(v, state[k]), k


# ============================================================================= end to end (digits, CPU)
HAS_STAGES = getattr(create_model("resnet8", 10, 1), "has_stages", False)
FAST = dict(data="digits", model="resnet8", batch_size=128, eval_batch_size=512, device="cpu")


@pytest.fixture
def stage_method_names(monkeypatch):
    """``kdtune.names`` lists the registered methods so configs are checked before torch is imported; until it
    lists these three, add them for the duration of a test (tests/test_names.py guards the list itself)."""
    import kdtune.names as names

    missing = tuple(m for m in ("at", "sp", "fitnet") if m not in names.METHOD_NAMES)
    if missing:
        monkeypatch.setitem(names._KINDS, "method", (names.METHOD_NAMES + missing, "kdtune methods"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    import kdtune

    out = tmp_path_factory.mktemp("at_sp_fitnet_teacher") / "run"
    kdtune.train(dict(FAST, model="resnet20", method="ce", epochs=1, lr=0.1, out=str(out)))
    return out


@pytest.mark.skipif(not HAS_STAGES, reason="the zoo models have no forward_stages yet")
@pytest.mark.parametrize("name,term", [("at", "at"), ("sp", "sp"), ("fitnet", "hint")])
def test_end_to_end_one_epoch(tmp_path, teacher_run, stage_method_names, name, term):
    import kdtune

    out = tmp_path / name
    result = kdtune.train(dict(FAST, teacher=str(teacher_run), method=name, epochs=1, out=str(out)))
    assert result["epochs"] == 1 and math.isfinite(result["test_acc"])
    line = (out / "train.log").read_text().splitlines()[0]
    assert f"({term} " in line and " ce " in line
    assert json.loads((out / "result.json").read_text())["config"]["method"] == name
    state = torch.load(out / "state.pt", weights_only=True)
    if name == "fitnet":
        assert "regressor.conv.weight" in state["method_modules"]
    else:
        assert state["method_modules"] == {}


@pytest.mark.skipif(not HAS_STAGES, reason="the zoo models have no forward_stages yet")
def test_fitnet_resume_is_bit_identical(tmp_path, teacher_run, stage_method_names):
    """Stopped after epoch 1 (state.pt) and resumed: student, regressor (BN statistics included) and logs equal
    an uninterrupted 2-epoch run bit for bit on the CPU."""
    from tests.resume_check import stopped_and_resumed

    cfg = dict(FAST, teacher=str(teacher_run), method="fitnet", epochs=2, seed=3, schedule="cosine")
    ma, mb, strip = stopped_and_resumed(cfg, tmp_path)
    assert "regressor.bn.running_var" in ma and ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert strip[0] == strip[1] and len(strip[0]) == 2


def test_fp32_turns_tf32_off_and_restores_it():
    """kdtune.losses.base.fp32 (SP's Gram, every feature loss): TF32 off for matmuls and convolutions inside,
    the engine's settings back after (the flags flip without a GPU)."""
    from kdtune.losses.base import fp32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with fp32():
            assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
