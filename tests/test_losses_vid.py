"""VID (Ahn et al., CVPR 2019, as RepDistiller computes it): golden values against an independent float64
derivation, the pooling of the larger map, the Method on synthetic stage maps (gradients reach the student's
maps, the regressors and the learnt variances), and end to end: a digits run and its bit-identical resume.

The float64 references below are written from the formula (block means for the pooling, channel sums for the
1x1 convolutions, ``log(1 + exp(alpha))`` per channel with ``math``), not from the code under test. The
cross-check against RepDistiller's own ``VIDLoss`` (same tensors, same weights) was run outside the test suite
(it needs RepDistiller's file); its figures are in the report of the change that added VID.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.errors import ConfigError
from kdtune.losses import METHODS, MethodContext, StepOutputs
from kdtune.losses.base import StageShapes
from kdtune.losses.vid import VIDRegressor, inverse_softplus, match_resolution, vid, vid_nll
from kdtune.models.common import Stages

EPS = 1e-5


# ----------------------------------------------------------------------------- float64 references
def block_mean64(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Average pooling of (B, C, H, W) to (h, w) by explicit k x l blocks (H, W multiples of h, w)."""
    b, c, hh, ww = x.shape
    assert hh % h == 0 and ww % w == 0
    return x.double().reshape(b, c, h, hh // h, w, ww // w).mean(dim=(3, 5))


def conv1x1_64(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mu[b, o, h, w] = sum_c W[o, c] x[b, c, h, w]."""
    return torch.einsum(
        "oc,bchw->bohw", weight.double().reshape(weight.shape[0], weight.shape[1]), x.double()
    )


def variance64(alpha) -> list[float]:
    return [math.log1p(math.exp(float(a))) + EPS for a in alpha]


def nll_loop64(mu: torch.Tensor, t: torch.Tensor, var: list[float]) -> float:
    """mean over b, c, h, w of 1/2 [(mu - t)^2 / var_c + log var_c], one element at a time."""
    total, n = 0.0, 0
    b, c, h, w = mu.shape
    for i in range(b):
        for j in range(c):
            for k in range(h):
                for m in range(w):
                    d = float(mu[i, j, k, m]) - float(t[i, j, k, m])
                    total += 0.5 * (d * d / var[j] + math.log(var[j]))
                    n += 1
    return total / n


def nll_vec64(mu: torch.Tensor, t: torch.Tensor, var: list[float]) -> float:
    v = torch.tensor(var, dtype=torch.float64).reshape(1, -1, 1, 1)
    return float((0.5 * ((mu.double() - t.double()) ** 2 / v + torch.log(v))).mean())


def stage_ref64(reg: VIDRegressor, s: torch.Tensor, t: torch.Tensor, loop: bool = False) -> float:
    """RepDistiller's per-stage VID in float64: pool the larger map, mu = W3 relu(W2 relu(W1 s)), the NLL."""
    (hs, ws), (ht, wt) = s.shape[-2:], t.shape[-2:]
    s64, t64 = s.detach().double(), t.detach().double()
    if hs > ht:
        s64 = block_mean64(s64, ht, wt)
    elif ht > hs:
        t64 = block_mean64(t64, hs, ws)
    w1, w2, w3 = (reg.regressor[i].weight.detach() for i in (0, 2, 4))
    mu = conv1x1_64(w3, conv1x1_64(w2, conv1x1_64(w1, s64).clamp_min(0)).clamp_min(0))
    var = variance64(reg.log_scale.detach())
    return (nll_loop64 if loop else nll_vec64)(mu, t64, var)


def make_regressor(c_s: int, c_t: int, seed: int, alpha=None) -> VIDRegressor:
    torch.manual_seed(seed)
    reg = VIDRegressor(c_s, c_t)
    if alpha is not None:
        with torch.no_grad():
            reg.log_scale.copy_(torch.as_tensor(alpha, dtype=torch.float32).expand(c_t))
    return reg


def maps(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


# ----------------------------------------------------------------------------- the formula
def test_nll_golden_elementwise():
    """vid_nll against a loop over every element (ordinary values, learnt per-channel variances)."""
    mu, t = maps((2, 3, 2, 2), 0), maps((2, 3, 2, 2), 1, 2.0)
    alpha = torch.tensor([-1.5, 0.3, 4.0])
    var = variance64(alpha)
    got = vid_nll(mu, t, F.softplus(alpha) + EPS)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(nll_loop64(mu, t, var), rel=1e-6, abs=0)


def test_initial_variance_and_inverse_softplus():
    reg = VIDRegressor(4, 6)
    assert reg.log_scale.shape == (6,) and reg.log_scale.requires_grad
    assert torch.allclose(
        reg.variance().double(), torch.full((6,), 5.0, dtype=torch.float64), rtol=1e-7, atol=0
    )
    assert variance64(reg.log_scale.detach())[0] == pytest.approx(5.0, rel=1e-7)  # RepDistiller's init
    for v in (1e-6, 1e-3, 0.5, 5.0 - EPS, 30.0, 700.0, 1e4):  # neither overflows nor loses small values
        a = inverse_softplus(v)
        back = a + math.log1p(math.exp(-a)) if a > 0 else math.log1p(math.exp(a))  # softplus, stable form
        assert back == pytest.approx(v, rel=1e-12)
    with pytest.raises(ValueError):
        inverse_softplus(0.0)
    # the regressor is RepDistiller's: three bias-free 1x1 convs C_s -> C_t -> C_t -> C_t with ReLUs between
    convs = [m for m in reg.regressor if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(6, 4, 1, 1), (6, 6, 1, 1), (6, 6, 1, 1)]
    assert all(c.bias is None for c in convs)
    assert sorted(reg.state_dict()) == [
        "log_scale",
        "regressor.0.weight",
        "regressor.2.weight",
        "regressor.4.weight",
    ]


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [
        ((2, 3, 4, 4), (2, 5, 4, 4)),  # same resolution
        ((2, 3, 8, 8), (2, 5, 4, 4)),  # student larger: pooled before the regressor
        ((2, 3, 2, 2), (2, 5, 8, 8)),  # teacher larger: the target is pooled
    ],
)
def test_stage_golden_small_against_loop(s_shape, t_shape):
    reg = make_regressor(s_shape[1], t_shape[1], seed=4, alpha=torch.linspace(-3.0, 3.0, t_shape[1]))
    s, t = maps(s_shape, 5), maps(t_shape, 6, 1.5)
    got = reg(s, t)
    # abs: fp32 rounding of O(1) summands (the teacher-larger case sums terms of +-0.3 to 0.009)
    assert got.item() == pytest.approx(stage_ref64(reg, s, t, loop=True), rel=1e-6, abs=1e-6)


def test_stage_golden_large_maps_and_values():
    """32 channels at 64x64 against 48 channels at 32x32, activations up to ~100: fp32 stays within 1e-6."""
    reg = make_regressor(32, 48, seed=7)
    s = maps((4, 32, 64, 64), 8, 30.0).clamp_min(0)
    t = maps((4, 48, 32, 32), 9, 30.0).clamp_min(0)
    assert reg(s, t).item() == pytest.approx(stage_ref64(reg, s, t), rel=1e-6, abs=0)


@pytest.mark.parametrize("alpha", [-30.0, -12.0, 30.0])
def test_stage_golden_extreme_variances(alpha):
    """sigma^2 at its floor (softplus(-30) ~ 1e-13, sigma^2 = eps: terms of 1e5 and more) and a large one."""
    reg = make_regressor(8, 12, seed=10, alpha=alpha)
    s, t = maps((3, 8, 8, 8), 11, 3.0), maps((3, 12, 4, 4), 12, 3.0)
    ref = stage_ref64(reg, s, t)
    if alpha < 0:
        assert ref > 1e4  # the regime the test is about
    assert reg(s, t).item() == pytest.approx(ref, rel=2e-6, abs=0)


def test_pooling_of_the_larger_map():
    s, t = maps((2, 3, 8, 8), 13), maps((2, 5, 4, 4), 14)
    ps, pt = match_resolution(s, t)
    assert pt is t and torch.allclose(ps.double(), block_mean64(s, 4, 4), rtol=0, atol=1e-6)
    ps, pt = match_resolution(t, s)  # teacher larger
    assert ps is t and torch.allclose(pt.double(), block_mean64(s, 4, 4), rtol=0, atol=1e-6)
    ps, pt = match_resolution(s, s)
    assert ps is s and pt is s
    # non-square maps keep their width (RepDistiller would pool to a square: identical for square maps)
    ps, _ = match_resolution(maps((1, 2, 8, 4), 15), maps((1, 2, 4, 2), 16))
    assert ps.shape == (1, 2, 4, 2)


def test_sum_over_stages_and_truncation():
    regs = [make_regressor(3, 4, seed=20), make_regressor(5, 6, seed=21)]
    sm = [maps((2, 3, 8, 8), 22), maps((2, 5, 4, 4), 23), maps((2, 7, 2, 2), 24)]  # one more than pairs
    tm = [maps((2, 4, 8, 8), 25), maps((2, 6, 8, 8), 26)]
    ref = stage_ref64(regs[0], sm[0], tm[0]) + stage_ref64(regs[1], sm[1], tm[1])
    assert vid(sm, tm, regs).item() == pytest.approx(ref, rel=2e-6, abs=0)
    with pytest.raises(ValueError, match="2 regressors"):
        vid(sm[:1], tm, regs)


def test_bf16_maps_under_autocast_give_fp32_loss():
    reg = make_regressor(8, 12, seed=30)
    s, t = maps((2, 8, 8, 8), 31, 5.0), maps((2, 12, 8, 8), 32, 5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vid([s.bfloat16()], [t.bfloat16()], [reg])
    assert got.dtype == torch.float32
    ref = stage_ref64(reg, s.bfloat16().float(), t.bfloat16().float())
    assert got.item() == pytest.approx(ref, rel=1e-6, abs=0)  # the regressor ran in fp32, not bf16


# ----------------------------------------------------------------------------- the Method
STUDENT = StageShapes(stem=(16, 8, 8), post=((16, 8, 8), (32, 4, 4), (64, 2, 2)),
                      pre=((16, 8, 8), (32, 4, 4), (64, 2, 2)), pooled=64)  # fmt: skip
TEACHER = StageShapes(stem=(32, 16, 16), post=((32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)),
                      pre=((32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)), pooled=256)  # fmt: skip
B, K = 4, 10


def make_method(**overrides):
    cls = METHODS.get("vid")
    ctx = MethodContext(num_classes=K, epochs=2, steps_per_epoch=3, device=torch.device("cpu"),
                        student=torch.nn.Identity(), teacher=torch.nn.Identity(), student_stages=STUDENT,
                        teacher_stages=TEACHER)  # fmt: skip
    torch.manual_seed(40)
    return cls(cls.resolve(overrides), ctx)


def stages_of(shapes: StageShapes, seed: int, grad: bool) -> Stages:
    post = [maps((B, *s), seed + i, 2.0).clamp_min(0).requires_grad_(grad) for i, s in enumerate(shapes.post)]
    return Stages(stem=maps((B, *shapes.stem), seed + 9).requires_grad_(grad), post=post, pre=post,
                  pooled=maps((B, shapes.pooled), seed + 10).requires_grad_(grad))  # fmt: skip


def step(method, seed: int = 50):
    s_st, t_st = stages_of(STUDENT, seed, True), stages_of(TEACHER, seed + 20, False)
    logits = maps((B, K), seed + 40).requires_grad_()
    y = torch.arange(B) % K
    t_logits = maps((B, K), seed + 41)
    out = StepOutputs(student_logits=logits, targets=y, epoch=0, step=0, teacher_logits=t_logits,
                      student_stages=s_st, teacher_stages=t_st)  # fmt: skip
    return method.losses(out), s_st, t_st, logits, y


def test_method_declares_and_defaults():
    cls = METHODS.get("vid")
    assert cls.needs_teacher and cls.needs_student_stages and cls.needs_teacher_stages
    assert not cls.needs_student_features and not cls.needs_indices
    assert cls.unfusable  # stage maps: no fused bundle
    assert cls.resolve() == {"beta": 1.0, "w_ce": 1.0, "init_var": 5.0, "eps": 1e-5}
    with pytest.raises(ConfigError, match="init_var"):
        cls.resolve({"init_var": 1e-6})
    with pytest.raises(ConfigError, match="eps"):
        cls.resolve({"eps": 0.0})
    ctx = MethodContext(num_classes=K, epochs=1, steps_per_epoch=1, device=torch.device("cpu"),
                        student=torch.nn.Identity())  # fmt: skip
    with pytest.raises(ConfigError, match="stage shapes"):
        cls(cls.resolve(), ctx)


def test_method_builds_one_regressor_per_paired_stage():
    m = make_method(init_var=2.0)
    mods = m.trainable_modules()
    assert list(mods) == ["vid"]
    regs = list(mods["vid"])
    assert len(regs) == 3  # zip truncates to the student's three stages
    for reg, s, t in zip(regs, STUDENT.post, TEACHER.post):
        assert reg.regressor[0].weight.shape == (t[0], s[0], 1, 1)
        assert torch.allclose(reg.variance(), torch.full((t[0],), 2.0), rtol=1e-6, atol=0)
    names = dict(
        mods["vid"].named_parameters()
    )  # alpha is a parameter: learnt (RepDistiller, not mdistiller)
    assert {"0.log_scale", "1.log_scale", "2.log_scale"} <= set(names)


def test_method_losses_terms_and_gradients():
    m = make_method(beta=2.5, w_ce=0.7)
    terms, s_st, t_st, logits, y = step(m)
    assert set(terms) == {"vid", "ce"}
    regs = list(m.trainable_modules()["vid"])
    ref = sum(stage_ref64(r, s, t) for r, s, t in zip(regs, s_st.post, t_st.post))
    assert terms["vid"].item() == pytest.approx(2.5 * ref, rel=2e-6, abs=0)
    assert terms["ce"].item() == pytest.approx(0.7 * F.cross_entropy(logits, y).item(), rel=1e-6)
    sum(terms.values()).backward()
    for f in s_st.post:
        assert f.grad is not None and f.grad.abs().sum() > 0
    assert s_st.stem.grad is None and s_st.pooled.grad is None  # VID reads the post-activation stage outputs
    assert all(f.grad is None for f in t_st.post)  # teacher maps are targets
    for name, p in m.trainable_modules()["vid"].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_method_weights_and_ce_off():
    a, _, _, _, _ = step(make_method())
    b, _, _, _, _ = step(make_method(beta=3.0, w_ce=0.0))
    assert set(b) == {"vid"}
    assert b["vid"].item() == pytest.approx(3.0 * a["vid"].item(), rel=1e-6)


# ----------------------------------------------------------------------------- end to end (CPU)
RUN = dict(data="digits", model="resnet8", method="vid", device="cpu", batch_size=128, seed=3)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from kdtune import train

    out = tmp_path_factory.mktemp("vid_teacher") / "resnet20"
    train(
        dict(
            data="digits", model="resnet20", method="ce", epochs=1, device="cpu", batch_size=128, out=str(out)
        )
    )
    return out


def test_vid_trains_end_to_end(tmp_path, teacher_dir):
    from kdtune import train
    from kdtune.models import create_model

    assert create_model("resnet8", 10, 1).has_stages
    out = tmp_path / "vid"
    result = train(dict(RUN, teacher=str(teacher_dir), epochs=1, out=str(out)))
    assert result["epochs"] == 1 and 0 <= result["test_acc"] <= 100
    line = (out / "train.log").read_text().splitlines()[0]
    assert "vid " in line and "ce " in line  # both terms logged under their names
    state = torch.load(out / "state.pt", weights_only=True)
    mods = state["method_modules"]
    assert {f"vid.{i}.log_scale" for i in range(3)} <= set(mods)  # resnet8 and resnet20: three pairs
    init = torch.full_like(mods["vid.0.log_scale"], inverse_softplus(5.0 - EPS))
    assert not torch.equal(mods["vid.0.log_scale"], init)  # sigma^2 was learnt


def test_vid_resume_is_bit_identical(tmp_path, teacher_dir):
    """Stopped after epoch 1 and resumed: student weights AND VID's alpha and regressors equal a lone run."""
    from tests.resume_check import stopped_and_resumed

    ma, mb, logs = stopped_and_resumed(dict(RUN, teacher=str(teacher_dir), epochs=2), tmp_path)
    assert ma.keys() == mb.keys() and any(k.endswith("log_scale") for k in ma)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert logs[0] == logs[1]
