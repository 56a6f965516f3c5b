"""ReviewKD (Chen et al., CVPR 2021, as its official CIFAR-100 code computes it): golden values of the HCL and of
the ABF review against an independent float64 derivation, the configuration derived from stage shapes against the
official ``build_review_kd`` table, the warm-up, gradients, one-line refusals (a pair that cannot be fused, through
``kdtune train``; a fused bundle), and end to end: a digits run, its bit-identical resume, one short epoch on the
generated CIFAR-100.

The float64 references below are written from the formulas (explicit adaptive-pooling windows, channel sums for
the convolutions, shifted sums for the 3x3 one, batch statistics for the BatchNorms, ``floor(i * in / out)`` for
nearest interpolation), not from the code under test. The cross-check against the official ``ABF``/``ReviewKD``/
``hcl`` (same tensors, same ABF weights) was run outside the test suite (it needs the official file); its figures
are in the report of the change that added ReviewKD.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.errors import ConfigError
from kdtune.losses import METHODS, MethodContext, StepOutputs
from kdtune.losses.base import StageShapes, probe_stage_shapes
from kdtune.losses.reviewkd import ABF, build_abfs, hcl, review, review_config, warmup_factor
from kdtune.models import create_model

CPU = torch.device("cpu")


@pytest.fixture
def reviewkd_name(monkeypatch):
    """``kdtune.names`` lists the registered methods so that configs are checked before torch is imported; until it
    lists reviewkd, add it for the duration of a test (tests/test_names.py guards the list itself)."""
    import kdtune.names as names

    if "reviewkd" not in names.METHOD_NAMES:
        monkeypatch.setitem(names._KINDS, "method", (names.METHOD_NAMES + ("reviewkd",), "kdtune methods"))


def maps(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


# ----------------------------------------------------------------------------- float64 references
def adaptive_pool64(x: torch.Tensor, s: int) -> torch.Tensor:
    """Adaptive average pooling to s x s by its windows: rows floor(i H / s) .. ceil((i + 1) H / s) - 1."""
    x = x.double()
    h, w = x.shape[-2:]
    out = torch.empty(*x.shape[:2], s, s, dtype=torch.float64)
    for i in range(s):
        r0, r1 = (i * h) // s, -((-(i + 1) * h) // s)
        for j in range(s):
            c0, c1 = (j * w) // s, -((-(j + 1) * w) // s)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def hcl_level64(y: torch.Tensor, t: torch.Tensor) -> float:
    """[MSE + sum_{s in 4,2,1; s < H} w MSE(pool_s)] / (1 + sum w), w halving from 1/2 at the first size used."""
    y, t = y.double(), t.double()
    num, den, w = float(((y - t) ** 2).mean()), 1.0, 1.0
    for s in (4, 2, 1):
        if s < y.shape[2]:
            w = w / 2
            num += w * float(((adaptive_pool64(y, s) - adaptive_pool64(t, s)) ** 2).mean())
            den += w
    return num / den


def conv1x1_64(x, weight, bias=None):
    y = torch.einsum("oc,bchw->bohw", weight.double().reshape(weight.shape[0], -1), x.double())
    return y if bias is None else y + bias.double().reshape(1, -1, 1, 1)


def conv3x3_64(x, weight):
    """y[b,o,i,j] = sum_{c,di,dj} W[o,c,di,dj] x[b,c,i+di-1,j+dj-1] with zeros outside."""
    x = x.double()
    b, c, h, w = x.shape
    xp = torch.zeros(b, c, h + 2, w + 2, dtype=torch.float64)
    xp[:, :, 1:-1, 1:-1] = x
    y = torch.zeros(b, weight.shape[0], h, w, dtype=torch.float64)
    for di in range(3):
        for dj in range(3):
            y += torch.einsum("oc,bchw->bohw", weight[:, :, di, dj].double(), xp[:, :, di : di + h, dj : dj + w])
    return y


def bn_train64(x, bn):
    """Training-mode BatchNorm: batch mean and biased variance over (b, h, w), then the affine map."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    g, b = bn.weight.detach().double().reshape(1, -1, 1, 1), bn.bias.detach().double().reshape(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * g + b


def nearest64(x, size):
    """Nearest interpolation: output (i, j) takes input (floor(i H_in / H_out), floor(j W_in / W_out))."""
    h, w = x.shape[-2:]
    rows = [min(h - 1, (i * h) // size[0]) for i in range(size[0])]
    cols = [min(w - 1, (j * w) // size[1]) for j in range(size[1])]
    return x.double()[:, :, rows][:, :, :, cols]


def sigmoid64(z):
    return 1.0 / (1.0 + torch.exp(-z))


def abf64(abf: ABF, x, residual, out_size):
    a = bn_train64(conv1x1_64(x, abf.conv1[0].weight.detach()), abf.conv1[1])
    if abf.att_conv is not None:
        r = nearest64(residual, tuple(a.shape[-2:]))
        z = sigmoid64(conv1x1_64(torch.cat([a, r], 1), abf.att_conv[0].weight.detach(), abf.att_conv[0].bias.detach()))
        a = a * z[:, 0:1] + r * z[:, 1:2]
    if tuple(a.shape[-2:]) != tuple(out_size):
        a = nearest64(a, out_size)
    return bn_train64(conv3x3_64(a, abf.conv2[0].weight.detach()), abf.conv2[1]), a


def review64(levels_fine_to_coarse, abfs, out_shapes):
    xs = levels_fine_to_coarse[::-1]
    y, res = abf64(abfs[0], xs[0], None, out_shapes[0])
    out = [y]
    for x, abf, size in zip(xs[1:], abfs[1:], out_shapes[1:]):
        y, res = abf64(abf, x, res, size)
        out.insert(0, y)
    return out


def randomise_affine(abfs, seed: int):
    """Non-default BN affine parameters and attention biases, so the reference checks that they are used."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in abfs.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.3)
            if isinstance(mod, torch.nn.Conv2d) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))


# ----------------------------------------------------------------------------- HCL
def test_hcl_golden_against_float64():
    shapes = [(4, 6, 8, 8), (4, 5, 16, 16), (3, 4, 5, 5), (4, 7, 4, 4), (4, 3, 2, 2), (4, 9, 1, 1)]
    ys = [maps(s, i, 2.0) for i, s in enumerate(shapes)]
    ts = [maps(s, 10 + i, 3.0) for i, s in enumerate(shapes)]
    for y, t in zip(ys, ts):  # one level at a time, then summed
        assert hcl([y], [t]).item() == pytest.approx(hcl_level64(y, t), rel=1e-6, abs=0)
    got = hcl(ys, ts)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(sum(hcl_level64(y, t) for y, t in zip(ys, ts)), rel=1e-6, abs=0)


@pytest.mark.parametrize("h,expected", [(8, 1 / 1.875), (4, 1 / 1.75), (2, 1 / 1.5), (1, 1.0)])
def test_hcl_weights_and_normaliser(h, expected):
    """A +-1 checkerboard difference: MSE 1, every pooled MSE 0, so HCL = 1 / (1 + sum of the weights used)."""
    t = maps((2, 3, h, h), 0)
    sign = (torch.arange(h).reshape(-1, 1) + torch.arange(h).reshape(1, -1)) % 2 * 2.0 - 1.0
    if h == 1:
        sign = torch.ones(1, 1)
    assert hcl([t + sign], [t]).item() == pytest.approx(expected, rel=1e-6)


def test_hcl_bf16_inputs_give_fp32_and_checks():
    y, t = maps((2, 4, 8, 8), 1, 4.0), maps((2, 4, 8, 8), 2, 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hcl([y.bfloat16()], [t.bfloat16()])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(hcl_level64(y.bfloat16().float(), t.bfloat16().float()), rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        hcl([y], [t[:, :2]])
    with pytest.raises(ValueError, match="1 student results and 2"):
        hcl([y], [t, t])


# ----------------------------------------------------------------------------- ABF and the review path
def test_abf_layout_and_init():
    abf = ABF(24, 16, 12, fuse=True)
    assert [tuple(p.shape) for p in abf.conv1.parameters()] == [(16, 24, 1, 1), (16,), (16,)]
    assert [tuple(p.shape) for p in abf.conv2.parameters()] == [(12, 16, 3, 3), (12,), (12,)]
    assert abf.conv1[0].bias is None and abf.conv2[0].bias is None
    assert tuple(abf.att_conv[0].weight.shape) == (2, 32, 1, 1) and abf.att_conv[0].bias is not None
    assert isinstance(abf.att_conv[1], torch.nn.Sigmoid)
    assert ABF(24, 16, 12, fuse=False).att_conv is None
    # kaiming_uniform_(a=1): U(-b, b) with b = sqrt(6 / ((1 + a^2) fan_in)) = sqrt(3 / fan_in)
    torch.manual_seed(0)
    big = ABF(256, 256, 256, fuse=True)
    for conv, fan_in in ((big.conv1[0], 256), (big.conv2[0], 256 * 9)):
        bound = math.sqrt(3.0 / fan_in)
        w = conv.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert sorted(big.state_dict()) == sorted([
        "conv1.0.weight", "conv1.1.weight", "conv1.1.bias", "conv1.1.running_mean", "conv1.1.running_var",
        "conv1.1.num_batches_tracked", "conv2.0.weight", "conv2.1.weight", "conv2.1.bias", "conv2.1.running_mean",
        "conv2.1.running_var", "conv2.1.num_batches_tracked", "att_conv.0.weight", "att_conv.0.bias",
    ])  # fmt: skip


@pytest.mark.parametrize(
    "student,teacher",
    [
        # student sizes 8, 4 (and h) into a teacher at 16, 8: every result resized up (shufflev1 <- resnet32x4)
        (((6, 8, 8), (10, 4, 4)), ((5, 16, 16), (7, 8, 8))),
        # same sizes, three stages (resnet8x4 <- resnet32x4), the residual upsampled by 2 at each level
        (((4, 8, 8), (6, 4, 4), (8, 2, 2)), ((5, 8, 8), (7, 4, 4), (3, 2, 2))),
        # a student larger than its teacher: the fused maps subsampled by nearest interpolation
        (((6, 8, 8), (10, 4, 4)), ((5, 4, 4), (7, 2, 2))),
    ],
)
def test_review_and_loss_golden_against_float64(student, teacher):
    pooled_s, pooled_t = 12, 9
    s_sh = StageShapes(stem=student[0], post=student, pre=student, pooled=pooled_s)
    t_sh = StageShapes(stem=teacher[0], post=teacher, pre=teacher, pooled=pooled_t)
    cfg = review_config(s_sh, t_sh)
    assert cfg.mid_channels == pooled_s
    torch.manual_seed(3)
    abfs = build_abfs(cfg)
    randomise_affine(abfs, 4)
    b = 4
    s_levels = [maps((b, *s), 20 + i, 2.0) for i, s in enumerate(student)] + [maps((b, pooled_s, 1, 1), 29)]
    t_levels = [maps((b, *t), 30 + i, 2.0) for i, t in enumerate(teacher)] + [maps((b, pooled_t, 1, 1), 39)]
    got = review(s_levels, abfs, cfg.out_shapes)
    ref = review64(s_levels, abfs, cfg.out_shapes)
    assert [tuple(g.shape) for g in got] == [tuple(t.shape) for t in t_levels]
    for g, r in zip(got, ref):
        assert ((g.double() - r).abs().max() / r.abs().max()).item() < 2e-6
    loss = hcl(got, t_levels).item()
    assert loss == pytest.approx(sum(hcl_level64(r, t) for r, t in zip(ref, t_levels)), rel=2e-6, abs=0)


# ----------------------------------------------------------------------------- configuration
# Official dvlab-research/ReviewKD CIFAR-100/model/build_review_kd: (teacher, student) -> in_channels,
# out_channels (fine to coarse), shapes, out_shapes (coarse to fine). The resnet20/32 branch lists a fifth shape
# (32, for f0) that its forward never reads (zip stops at the four ABFs); it is left out here.
OFFICIAL = {
    ("resnet32x4", "resnet8x4"): ([64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("wrn_40_2", "wrn_16_2"): ([32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("wrn_40_2", "wrn_40_1"): ([16, 32, 64, 64], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("resnet32x4", "shufflev1"): ([240, 480, 960, 960], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("wrn_40_2", "shufflev1"): ([240, 480, 960, 960], [32, 64, 128, 128], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("resnet32x4", "shufflev2"): ([116, 232, 464, 1024], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("resnet56", "resnet20"): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("resnet110", "resnet32"): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("vgg13", "vgg8"): ([128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16], [1, 4, 4, 8, 16]),
    ("resnet50", "vgg8"): ([128, 256, 512, 512, 512], [256, 512, 1024, 2048, 2048], [1, 4, 4, 8, 16],
                           [1, 4, 8, 16, 32]),
    ("vgg13", "mobilenetv2"): ([12, 16, 48, 160, 1280], [128, 256, 512, 512, 512], [1, 2, 4, 8, 16],
                               [1, 4, 4, 8, 16]),
    ("resnet50", "mobilenetv2"): ([12, 16, 48, 160, 1280], [256, 512, 1024, 2048, 2048], [1, 2, 4, 8, 16],
                                  [1, 4, 8, 16, 32]),
}  # fmt: skip


def test_configuration_from_stage_shapes_is_the_official_table():
    shapes = {}
    for arch in sorted({a for pair in OFFICIAL for a in pair}):
        shapes[arch] = probe_stage_shapes(create_model(arch, 100, 3), 3, 32, CPU)
    for (teacher, student), (c_in, c_out, sh, out_sh) in OFFICIAL.items():
        cfg = review_config(shapes[student], shapes[teacher], f"{student} with {teacher}")
        got = (list(cfg.in_channels), list(cfg.out_channels), [h for h, _ in cfg.shapes],
               [h for h, _ in cfg.out_shapes])  # fmt: skip
        assert got == (c_in, c_out, sh, out_sh), (teacher, student)
        assert all(h == w for h, w in cfg.shapes + cfg.out_shapes) and cfg.skipped == 0
        assert cfg.mid_channels == min(512, c_in[-1])


def test_refusals_at_construction_in_one_line():
    cls = METHODS.get("reviewkd")
    three = StageShapes(stem=(16, 8, 8), post=((16, 8, 8), (32, 4, 4), (64, 2, 2)),
                        pre=((16, 8, 8), (32, 4, 4), (64, 2, 2)), pooled=64)  # fmt: skip
    four = StageShapes(stem=(16, 8, 8), post=((16, 8, 8), (32, 4, 4), (64, 2, 2), (128, 1, 1)),
                       pre=((16, 8, 8), (32, 4, 4), (64, 2, 2), (128, 1, 1)), pooled=128)  # fmt: skip
    odd = StageShapes(stem=(16, 12, 12), post=((16, 12, 12), (32, 6, 6), (64, 3, 3)),
                      pre=((16, 12, 12), (32, 6, 6), (64, 3, 3)), pooled=64)  # fmt: skip

    def build(s, t, student=None, teacher=None):
        ctx = MethodContext(num_classes=10, epochs=1, steps_per_epoch=1, device=CPU,
                            student=student or torch.nn.Identity(), teacher=teacher or torch.nn.Identity(),
                            student_stages=s, teacher_stages=t)  # fmt: skip
        return cls(cls.resolve(), ctx)

    with pytest.raises(ConfigError) as e:
        build(three, four, create_model("resnet8", 10, 1), create_model("resnet18", 10, 1))
    msg = str(e.value)
    assert "\n" not in msg and "student resnet8 with teacher resnet18" in msg and "4 levels" in msg and "5" in msg
    with pytest.raises(ConfigError, match=r"the fused map would be resized from 2x2 to 3x3, not by a whole") as e:
        build(three, odd)  # the student's 2x2 stage into the teacher's 3x3 one
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="stage shapes"):
        cls(cls.resolve(), MethodContext(num_classes=10, epochs=1, steps_per_epoch=1, device=CPU,
                                         student=torch.nn.Identity()))  # fmt: skip
    # a student with more levels than its teacher leaves out its finest stages (as the official code leaves out f0)
    m = build(four, three)
    assert m.config.skipped == 1 and m.config.in_channels == (32, 64, 128, 128)
    assert m.config.shapes == ((1, 1), (1, 1), (2, 2), (4, 4))
    assert m.config.out_shapes == ((1, 1), (2, 2), (4, 4), (8, 8))


def test_hyperparameters_and_flags():
    cls = METHODS.get("reviewkd")
    assert cls.needs_teacher and cls.needs_student_stages and cls.needs_teacher_stages and cls.summary
    assert cls.resolve() == {"beta": 5.0, "warmup": 20.0, "w_ce": 1.0}
    for bad in ({"beta": -1.0}, {"warmup": -1}, {"w_ce": -0.5}, {"beta": "x"}):
        with pytest.raises(ConfigError):
            cls.resolve(bad)


def test_warmup_factor_is_zero_in_the_first_epoch():
    assert warmup_factor(0, 20) == 0.0  # official: min(1, epoch / 20) with epochs from 0
    assert warmup_factor(1, 20) == 0.05 and warmup_factor(10, 20) == 0.5
    assert warmup_factor(20, 20) == 1.0 and warmup_factor(239, 20) == 1.0
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(1, 2.5) == 0.4


# ----------------------------------------------------------------------------- the Method on zoo models
def _pair_step(epoch: int, **hp):
    """A resnet8 student and resnet20 teacher on 8x8 inputs: one step's outputs through the method."""
    torch.manual_seed(0)
    s_model, t_model = create_model("resnet8", 10, 1), create_model("resnet20", 10, 1).eval()
    ctx = MethodContext(num_classes=10, epochs=2, steps_per_epoch=1, device=CPU, student=s_model, teacher=t_model,
                        student_stages=probe_stage_shapes(s_model, 1, 8, CPU),
                        teacher_stages=probe_stage_shapes(t_model, 1, 8, CPU))  # fmt: skip
    cls = METHODS.get("reviewkd")
    m = cls(cls.resolve(hp), ctx)
    x, y = maps((8, 1, 8, 8), 1), torch.arange(8) % 10
    logits, st = s_model.forward_stages(x)
    for f in [*st.post, st.pooled]:
        f.retain_grad()
    with torch.no_grad():
        t_logits, tt = t_model.forward_stages(x)
    out = StepOutputs(student_logits=logits.float(), targets=y, epoch=epoch, step=0, teacher_logits=t_logits,
                      student_stages=st, teacher_stages=tt)  # fmt: skip
    return m, m.losses(out), st, tt, out


def test_gradients_reach_the_student_maps_and_the_abfs():
    m, terms, st, tt, out = _pair_step(epoch=3, beta=2.0, warmup=4, w_ce=0.5)
    assert set(terms) == {"reviewkd", "ce"}
    assert m.config.in_channels == (16, 32, 64, 64) and m.config.shapes == ((1, 1), (2, 2), (4, 4), (8, 8))
    assert terms["ce"].item() == pytest.approx(0.5 * F.cross_entropy(out.student_logits, out.targets).item())
    sum(terms.values()).backward()
    for f in [*st.post, st.pooled]:
        assert f.grad is not None and f.grad.abs().sum() > 0
    for name, p in m.trainable_modules()["abfs"].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(f.requires_grad for f in [*tt.pre, tt.pooled])  # the teacher's maps are targets
    # the value: beta * 3/4 * the unweighted HCL of the same step
    m2, terms2, _, _, _ = _pair_step(epoch=3, beta=1.0, warmup=0)
    assert terms["reviewkd"].item() == pytest.approx(2.0 * 0.75 * terms2["reviewkd"].item(), rel=1e-6)


def test_first_epoch_term_is_zero_but_the_abfs_still_run():
    m, terms, st, _, _ = _pair_step(epoch=0)
    assert terms["reviewkd"].item() == 0.0
    sum(terms.values()).backward()
    abfs = m.trainable_modules()["abfs"]
    grads = [p.grad for p in abfs.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)  # zero, not missing: weight decay still acts
    assert all(int(mod.num_batches_tracked) == 1 for mod in abfs.modules() if isinstance(mod, torch.nn.BatchNorm2d))


# ----------------------------------------------------------------------------- end to end: digits (CPU)
FAST = dict(data="digits", model="resnet8", method="reviewkd", device="cpu", batch_size=128, eval_batch_size=512,
            seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    import kdtune

    out = tmp_path_factory.mktemp("reviewkd_teacher") / "resnet20"
    kdtune.train(dict(FAST, model="resnet20", method="ce", epochs=1, lr=0.1, out=str(out)))
    return out


def test_reviewkd_trains_end_to_end(tmp_path, teacher_run, reviewkd_name):
    import kdtune

    out = tmp_path / "rkd"
    result = kdtune.train(dict(FAST, teacher=str(teacher_run), epochs=1, warmup=0, out=str(out)))
    assert result["epochs"] == 1 and math.isfinite(result["test_acc"])
    line = (out / "train.log").read_text().splitlines()[0]
    assert "reviewkd " in line and " ce " in line
    mods = torch.load(out / "state.pt", weights_only=True)["method_modules"]
    assert {f"abfs.{i}.conv2.0.weight" for i in range(4)} <= set(mods)  # resnet8 and resnet20: four levels
    assert "abfs.0.att_conv.0.weight" not in mods and "abfs.3.att_conv.0.weight" in mods  # h (coarsest) has none


def test_reviewkd_resume_is_bit_identical(tmp_path, teacher_run, reviewkd_name):
    """Stopped after epoch 1 and resumed: student, ABFs (BN statistics included) and logs equal a lone run."""
    from tests.resume_check import stopped_and_resumed

    cfg = dict(FAST, teacher=str(teacher_run), epochs=2, warmup=1)  # factor 0, then 1
    ma, mb, strip = stopped_and_resumed(cfg, tmp_path)
    assert "abfs.0.conv1.1.running_var" in ma and ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert strip[0] == strip[1] and len(strip[0]) == 2


def test_kdtune_train_refuses_an_unfusable_pair_in_one_line(tmp_path, teacher_run, reviewkd_name, capsys):
    """Through the CLI: a resnet18 teacher (four stages) for a resnet8 student (three), and a student without stage
    features; exit 2 and one line each."""
    from kdtune.cli import main
    from kdtune.models.checkpoint import save_model

    t18 = tmp_path / "resnet18.pt"
    save_model(t18, create_model("resnet18", 10, 1), "resnet18", 10, 1, {})
    args = ["data=digits", "device=cpu", "method=reviewkd", "epochs=1", "batch_size=128"]
    assert main(["train", *args, "model=resnet8", f"teacher={t18}", f"out={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reviewkd cannot pair student resnet8 with teacher resnet18" in err[0], err
    assert "at least as many" in err[0]
    assert main(["train", *args, "model=toy_mlp_student", f"teacher={teacher_run}", f"out={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model toy_mlp_student exposes no stage features" in err[0], err


def test_fusing_is_refused_in_one_line(teacher_run, reviewkd_name):
    from kdtune.config import TrainConfig
    from kdtune.engine.bundle import check_bundle
    from kdtune.tune.fused import resolve_fuse

    assert METHODS.get("reviewkd").unfusable
    assert resolve_fuse("auto", "reviewkd", 0.0, 8) == 1  # auto: one trial per slot
    with pytest.raises(ConfigError) as e:
        resolve_fuse(2, "reviewkd", 0.0, 8)
    assert "\n" not in str(e.value) and "cannot fuse method reviewkd: it reads stage maps" in str(e.value)
    cfg = TrainConfig.from_dict(dict(FAST, teacher=str(teacher_run), epochs=1))
    with pytest.raises(ConfigError) as e:
        check_bundle([cfg, cfg.replace(seed=4)])
    assert "\n" not in str(e.value) and "method=reviewkd cannot be fused into a bundle" in str(e.value)


def test_search_space(reviewkd_name):
    from kdtune.tune.spaces import SpaceContext, build_space

    def fn(teacher, student, epochs=240):
        return build_space("reviewkd", SpaceContext(method="reviewkd", data="cifar100", student=student,
                                                     teacher=teacher, epochs=epochs, num_classes=100))  # fmt: skip

    assert fn("resnet32x4", "resnet8x4").starts() == [{"beta": 5.0}]
    assert fn("resnet56", "resnet20").starts() == [{"beta": 0.6}]
    assert fn("resnet110", "resnet32").starts() == [{"beta": 1.0}]
    assert fn("resnet32x4", "shufflev2").starts() == [{"beta": 8.0}]
    assert fn("vgg13", "vgg8").starts() == [{"beta": 5.0}]  # not in the official script
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for epochs, warm in ((240, 20), (30, 2)):
        space = fn("resnet32x4", "resnet8x4", epochs)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        betas = set()
        for _ in range(16):
            trial = study.ask()
            consts = space(trial)
            betas.add(trial.params["beta"])
            assert consts["warmup"] == warm
            study.tell(trial, 0.0)
        assert betas <= {0.6, 1.0, 5.0, 8.0} and len(betas) > 1


# ----------------------------------------------------------------------------- generated CIFAR-100 (CPU)
@pytest.mark.parametrize("teacher_arch,student", [("wrn_40_2", "wrn_16_2"), ("resnet32x4", "shufflev1")])
def test_one_short_epoch_on_generated_cifar100(teacher_arch, student, tmp_path, reviewkd_name):
    from kdtune.config import TrainConfig
    from kdtune.data import load_data
    from kdtune.engine import Trainer
    from kdtune.models.checkpoint import save_model
    from tests.datagen import write_tiny_cifar100

    write_tiny_cifar100(tmp_path, n_train=32, n_test=16)
    data = load_data("cifar100", root=tmp_path, val_fraction=0.0)
    torch.manual_seed(0)
    path = tmp_path / f"{teacher_arch}.pt"
    save_model(path, create_model(teacher_arch, 100, 3), teacher_arch, 100, 3, {})
    cfg = TrainConfig.from_dict(dict(data="cifar100", model=student, teacher=str(path), method="reviewkd", epochs=1,
                                     batch_size=16, eval_batch_size=16, device="cpu", val_fraction=0.0, lr=0.01,
                                     warmup=0))  # fmt: skip
    t = Trainer(cfg, data=data, teacher_info={"arch": teacher_arch, "test_acc": 1.0})
    h = list(t.run())[-1]
    assert {"loss_ce", "loss_reviewkd"} <= set(h), h
    assert all(math.isfinite(h[k]) for k in ("loss_ce", "loss_reviewkd")) and h["loss_reviewkd"] > 0
    assert t.method.config.out_shapes == ((1, 1), (8, 8), (16, 16), (32, 32))
