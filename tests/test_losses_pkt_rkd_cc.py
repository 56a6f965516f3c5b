"""PKT, RKD and CC: golden values, extremes, the Method contract, end-to-end runs, the teacher store and a fused
CC bundle.

Every reference below is an independent float64 derivation of what RepDistiller's ``distiller_zoo/{PKT,RKD,CC}.py``
compute, written with Python loops (``math``) from the formulas in the losses' docstrings, not a copy of the
vectorised code under test. The one-off cross-check against the official modules themselves (same tensors, max
abs / relative differences) is in the report of the change that added these methods; no test here needs them.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdtune
from kdtune.config import TrainConfig
from kdtune.data import load_data
from kdtune.data.base import Split
from kdtune.engine import Bundle, Trainer
from kdtune.losses import METHODS, MethodContext, StepOutputs
from kdtune.losses.cc import cc
from kdtune.losses.pkt import pkt, pkt_probabilities
from kdtune.losses.rkd import angles, pairwise_distances, rkd, rkd_angle, rkd_distance


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.double().tolist()


# ----------------------------------------------------------------------------- float64 references
def pkt_ref(s_rows, t_rows, eps=1e-7):
    def probs(xs):
        us = []
        for x in xs:
            n = math.sqrt(sum(v * v for v in x))
            u = [v / (n + eps) for v in x]
            us.append([0.0 if math.isnan(v) else v for v in u])
        b = len(us)
        k = [[(sum(a * c for a, c in zip(us[i], us[j])) + 1.0) / 2.0 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(s_rows), probs(t_rows)
    b = len(ps)
    return (
        sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b))
        / b**2
    )


def huber(x):  # smooth_l1 with beta = 1
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def dist_ref(xs, eps=1e-12):
    b = len(xs)
    d = [[0.0 if i == j else math.sqrt(max(sum((p - q) ** 2 for p, q in zip(xs[i], xs[j])), eps))
          for j in range(b)] for i in range(b)]  # fmt: skip
    pos = [v for row in d for v in row if v > 0]
    mu = sum(pos) / len(pos)
    return [[v / mu for v in row] for row in d]


def rkd_dist_ref(s_rows, t_rows):
    ds, dt = dist_ref(s_rows), dist_ref(t_rows)
    b = len(ds)
    return sum(huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2


def angle_ref(xs):
    b = len(xs)

    def unit(i, j):
        v = [q - p for p, q in zip(xs[i], xs[j])]
        n = math.sqrt(sum(c * c for c in v))
        return [c / max(n, 1e-12) for c in v]

    return [
        [[sum(a * c for a, c in zip(unit(i, j), unit(i, k))) for k in range(b)] for j in range(b)]
        for i in range(b)
    ]


def rkd_angle_ref(s_rows, t_rows):
    a_s, a_t = angle_ref(s_rows), angle_ref(t_rows)
    b = len(a_s)
    r = range(b)
    return sum(huber(a_s[i][j][k] - a_t[i][j][k]) for i in r for j in r for k in r) / b**3


def cc_ref(es_rows, et_rows):
    delta = [[abs(a - c) for a, c in zip(es, et)] for es, et in zip(es_rows, et_rows)]
    return sum(sum(p * q for p, q in zip(delta[i], delta[i + 1])) for i in range(len(delta) - 1)) / (
        len(delta) - 1
    )


def feats(b, d_s, d_t, seed, relu=False):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, d_s, generator=g), torch.randn(b, d_t, generator=g)
    return (s.relu(), t.relu()) if relu else (s, t)


# ----------------------------------------------------------------------------- PKT
@pytest.mark.parametrize(
    "b,seed,relu", [(8, 0, False), (8, 1, True), (8, 2, False), (64, 1, True), (64, 1, False)]
)
def test_pkt_golden(b, seed, relu):
    """Ordinary inputs of different widths, at the published batch size too; the weight 30000 multiplies fp32
    rounding: the weighted term agrees with the float64 derivation to 1e-5 relative. Measured: <= 2e-7 at B = 8,
    2e-6 at B = 64 with post-ReLU vectors (near-equal distributions: the log ratios cancel), up to 1.4e-5 at
    B = 64 with 2048-wide ones -- the official code's fp32 error too (it computes the same bits)."""
    s, t = feats(b, 32 if b == 64 else 5, 48 if b == 64 else 7, seed, relu)
    assert 30000 * pkt(s, t).item() == pytest.approx(30000 * pkt_ref(rows(s), rows(t)), rel=1e-5)


def test_pkt_probabilities_are_the_cosine_kernel_rows():
    s, _ = feats(6, 4, 4, 3)
    p = pkt_probabilities(s).double()
    u = F.normalize(s.double(), dim=1)
    k = (u @ u.t() + 1) / 2
    torch.testing.assert_close(p, k / k.sum(1, keepdim=True), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.sum(1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-6)


def test_pkt_zero_and_nan_rows():
    """An all-zero row is the zero vector after ``x / (||x|| + eps)`` (no NaN: 0 / 1e-7), so its P row is uniform;
    a NaN row is set to 0 (the official NaN-to-0), i.e. the same. Gradients stay finite where the official
    autograd gives NaN (sqrt's backward at 0)."""
    s, t = feats(6, 5, 3, 4)
    s[2] = 0.0
    t[4] = 0.0
    ref = pkt_ref(rows(s), rows(t))
    x = s.clone().requires_grad_(True)
    loss = 30000 * pkt(x, t)
    assert loss.item() == pytest.approx(30000 * ref, rel=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(pkt_probabilities(s)[2], torch.full((6,), 1 / 6))
    s_nan = s.clone()
    s_nan[2, 1] = float("nan")  # the whole row becomes NaN in the normalisation, then 0
    assert pkt(s_nan, t).item() == pytest.approx(pkt(s, t).item(), rel=1e-6)


def test_pkt_identities():
    s, t = feats(8, 6, 6, 5)
    assert pkt(s, s).item() == 0.0  # log(1) on every entry
    # cosine kernel: invariant to a positive rescaling of each row (up to the eps of 1e-7 / ||x||)
    scale = torch.linspace(0.5, 20.0, 8).unsqueeze(1)
    assert pkt(s * scale, t).item() == pytest.approx(pkt(s, t).item(), rel=1e-5)
    assert pkt(s, t).item() > 0


# ----------------------------------------------------------------------------- RKD
@pytest.mark.parametrize("seed,relu", [(0, False), (1, True)])
def test_rkd_golden(seed, relu):
    s, t = feats(7, 5, 9, seed, relu)
    d_ref, a_ref = rkd_dist_ref(rows(s), rows(t)), rkd_angle_ref(rows(s), rows(t))
    assert rkd_distance(s, t).item() == pytest.approx(d_ref, rel=1e-5)
    assert rkd_angle(s, t).item() == pytest.approx(a_ref, rel=1e-5)
    assert rkd(s, t).item() == pytest.approx(25 * d_ref + 50 * a_ref, rel=1e-5)
    ref_angles = angle_ref(rows(s))
    torch.testing.assert_close(
        angles(s).double(), torch.tensor(ref_angles, dtype=torch.float64), rtol=0, atol=1e-6
    )


def test_rkd_exact_duplicates_hit_the_clamp():
    """Integer-valued vectors make the Gram expansion exact in fp32: a duplicated row has squared distance 0,
    clamped to 1e-12, distance 1e-6 -- positive, so it counts in the mean, as in the official code. Duplicate
    rows are degenerate triplets for the angles (zero differences stay zero)."""
    g = torch.Generator().manual_seed(6)
    s = torch.randint(-3, 4, (6, 4), generator=g).float()
    t = torch.randint(-3, 4, (6, 5), generator=g).float()
    s[3] = s[1]
    t[5] = t[0]
    d = pairwise_distances(s)
    assert d[1, 3].item() == pytest.approx(1e-6, rel=1e-6) and d[3, 1].item() == pytest.approx(1e-6, rel=1e-6)
    assert (d.diagonal() == 0).all()
    assert rkd_distance(s, t).item() == pytest.approx(rkd_dist_ref(rows(s), rows(t)), rel=1e-6)
    assert rkd_angle(s, t).item() == pytest.approx(rkd_angle_ref(rows(s), rows(t)), rel=1e-6)
    x = s.clone().requires_grad_(True)
    rkd(x, t).backward()
    assert torch.isfinite(x.grad).all()


def test_rkd_near_duplicates_stay_finite():
    """Rows 1e-4 apart at norms ~3: below what fp32's Gram expansion resolves (the official code's trap), so their
    distance is the clamp's 1e-6 or rounding noise (the exact one is 2.4e-4); one entry of B^2 after the mean
    normalisation, so the term still agrees with the exact float64 value to 3e-4 and its gradient is finite."""
    s, t = feats(8, 6, 6, 7)
    s[5] = s[2] + 1e-4
    d = pairwise_distances(s)
    assert 1e-6 * 0.999 <= d[2, 5].item() < 1e-2
    # measured 4.5e-5
    assert rkd_distance(s, t).item() == pytest.approx(rkd_dist_ref(rows(s), rows(t)), rel=3e-4)
    x = s.clone().requires_grad_(True)
    (25 * rkd_distance(x, t) + 50 * rkd_angle(x, t)).backward()
    assert torch.isfinite(x.grad).all()


def test_rkd_invariances_and_tiny_batches():
    s, t = feats(6, 4, 8, 8)
    # distances are normalised by their mean, angles are cosines of differences: scale and shift do nothing
    assert rkd_distance(3.7 * s, t).item() == pytest.approx(rkd_distance(s, t).item(), rel=1e-5)
    assert rkd_angle(3.7 * s + 2.0, t).item() == pytest.approx(rkd_angle(s, t).item(), rel=1e-4, abs=1e-7)
    assert rkd_distance(s[:1], t[:1]).item() == 0.0  # one sample: no pair (the official mean of none is NaN)
    assert rkd_angle(s[:1], t[:1]).item() == 0.0


# ----------------------------------------------------------------------------- CC
@pytest.mark.parametrize("seed", [0, 1])
def test_cc_golden(seed):
    e_s, e_t = feats(9, 6, 6, seed)
    e_t = 3.0 * e_t  # residuals of both signs and sizes
    assert cc(e_s, e_t).item() == pytest.approx(cc_ref(rows(e_s), rows(e_t)), rel=1e-6)
    assert 0.02 * cc(e_s, e_t).item() == pytest.approx(0.02 * cc_ref(rows(e_s), rows(e_t)), rel=1e-6)
    assert cc(e_s, e_s).item() == 0.0
    assert cc(e_s[:1], e_t[:1]).item() == 0.0  # one sample: no consecutive pair (official: NaN)
    # order matters: the code pairs consecutive samples, not all pairs
    perm = torch.tensor([0, 2, 1, 3, 4, 5, 6, 7, 8])
    assert cc(e_s[perm], e_t[perm]).item() != pytest.approx(cc(e_s, e_t).item(), rel=1e-3)


# ----------------------------------------------------------------------------- the methods
def method_outputs(name, hp=None, b=16, d_s=64, d_t=256, dtype=torch.float32, seed=0):
    cls = METHODS.get(name)
    ctx = MethodContext(num_classes=10, epochs=2, steps_per_epoch=4, device=torch.device("cpu"), student=nn.Identity(),
                        teacher=nn.Identity(), student_feat_dim=d_s, teacher_feat_dim=d_t)  # fmt: skip
    torch.manual_seed(seed)
    method = cls(cls.resolve(hp or {}), ctx)
    g = torch.Generator().manual_seed(seed + 1)
    body = nn.Linear(12, d_s)
    head = nn.Linear(d_s, 10)
    x = torch.randn(b, 12, generator=g)
    h_s = body(x).relu().to(dtype)
    h_t = torch.randn(b, d_t, generator=g).relu().to(dtype)  # detached, as the engine passes it
    out = StepOutputs(student_logits=head(h_s.float()).float(), targets=torch.randint(0, 10, (b,), generator=g),
                      epoch=0, step=0, teacher_logits=torch.randn(b, 10, generator=g), student_features=h_s,
                      teacher_features=h_t)  # fmt: skip
    return method, out, body, h_s, h_t


@pytest.mark.parametrize(
    "name,keys",
    [("pkt", {"pkt", "ce"}), ("rkd", {"rkd_dist", "rkd_angle", "ce"}), ("cc", {"cc", "ce"})],
)
def test_method_terms_keys_finiteness_and_gradients(name, keys):
    cls = METHODS.get(name)
    assert cls.needs_teacher and cls.needs_student_features and cls.needs_teacher_features
    assert not cls.needs_student_stages and not cls.needs_teacher_stages and not cls.needs_indices
    # reads only logits and pooled vectors: fused bundles and the teacher store serve it
    assert cls.unfusable == ""
    method, out, body, h_s, h_t = method_outputs(name)
    terms = method.losses(out)
    assert set(terms) == keys
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(out.student_logits, out.targets).item())
    sum(terms.values()).backward()
    assert (
        body.weight.grad is not None
        and torch.isfinite(body.weight.grad).all()
        and body.weight.grad.abs().sum() > 0
    )
    assert h_t.grad is None
    modules = method.trainable_modules()
    if name == "cc":
        assert set(modules) == {"embed_s", "embed_t"}
        assert modules["embed_s"].weight.shape == (128, 64) and modules["embed_t"].weight.shape == (128, 256)
        for m in modules.values():  # both embeddings are trained by the student's optimiser
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0 and m.bias.grad.abs().sum() > 0
    else:
        assert modules == {}


def test_method_terms_are_the_weighted_functions():
    m, out, *_ = method_outputs("pkt", {"beta": 1000.0, "w_ce": 0.0})
    terms = m.losses(out)
    assert set(terms) == {"pkt"}
    assert terms["pkt"].item() == pytest.approx(
        1000.0 * pkt(out.student_features, out.teacher_features).item()
    )
    m, out, *_ = method_outputs("rkd", {"beta": 2.0, "w_dist": 3.0, "w_angle": 0.0})
    terms = m.losses(out)
    assert set(terms) == {"rkd_dist", "ce"}
    assert terms["rkd_dist"].item() == pytest.approx(
        6.0 * rkd_distance(out.student_features, out.teacher_features).item()
    )
    m, out, *_ = method_outputs("cc", {"beta": 0.5, "embed_dim": 16})
    e_s, e_t = m.embed_s(out.student_features), m.embed_t(out.teacher_features)
    assert m.embed_s.out_features == 16
    assert m.losses(out)["cc"].item() == pytest.approx(0.5 * cc(e_s, e_t).item(), rel=1e-6)
    assert METHODS.get("pkt").resolve({})["beta"] == 30000.0 and METHODS.get("cc").resolve({})["beta"] == 0.02
    assert {k: v for k, v in METHODS.get("rkd").resolve({}).items()} == {
        "beta": 1.0,
        "w_dist": 25.0,
        "w_angle": 50.0,
        "w_ce": 1.0,
    }


@pytest.mark.parametrize("name", ["pkt", "rkd", "cc"])
def test_bf16_features_are_computed_in_fp32(name):
    """Under bf16 autocast the engine hands bf16 features: the terms are fp32, computed on the upcast values."""
    m32, out32, *_ = method_outputs(name)
    m16, out16, *_ = method_outputs(name, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t16 = m16.losses(out16)
    up = dataclasses.replace(out16, student_features=out16.student_features.float(),
                             teacher_features=out16.teacher_features.float())  # fmt: skip
    t32 = m16.losses(up)
    for k in t16:
        assert t16[k].dtype == torch.float32
        assert t16[k].item() == pytest.approx(t32[k].item(), rel=1e-6), k


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A resnet20 teacher trained one epoch on digits by kdtune itself."""
    out = tmp_path_factory.mktemp("teacher") / "resnet20"
    kdtune.train(dict(data="digits", model="resnet20", method="ce", epochs=1, device="cpu", out=str(out)))
    return str(out)


@pytest.mark.parametrize("name,keys", [("pkt", ["pkt"]), ("rkd", ["rkd_dist", "rkd_angle"]), ("cc", ["cc"])])
def test_train_end_to_end(name, keys, teacher):
    r = kdtune.train(
        dict(data="digits", model="resnet8", teacher=teacher, method=name, epochs=1, device="cpu")
    )
    last = r["history"][-1]
    for k in keys + ["ce"]:
        assert math.isfinite(last[f"loss_{k}"]) and last[f"loss_{k}"] > 0
    assert math.isfinite(r["test_acc"]) and r["config"]["method"] == name
    assert r["teacher"]["arch"] == "resnet20"


def _first_320():
    """The first 320 training images of digits: 5 batches of 64 an epoch."""
    full = load_data("digits", val_fraction=0.1, seed=0)
    return dataclasses.replace(full, train=Split(full.train.x[:320].clone(), full.train.y[:320].clone()))


def test_cc_bundle_members_equal_lone_runs_bit_for_bit(teacher):
    """Two CC members with their own embeddings (per-member trainable modules, as IPWD's head) over 2 epochs of
    5 batches in mode "loop": student and both embeddings end bit for bit at their lone Trainer runs."""
    data = _first_320()
    base = dict(data="digits", model="resnet8", batch_size=64, eval_batch_size=512, epochs=2, method="cc",
                teacher=teacher, device="cpu")  # fmt: skip
    cfgs = [
        TrainConfig.from_dict(dict(base, seed=1, lr=0.01, hp={"beta": 0.02})),
        TrainConfig.from_dict(dict(base, seed=2, lr=0.005, momentum=0.8, weight_decay=1e-3,
                                   hp={"beta": 0.2, "embed_dim": 32})),
    ]  # fmt: skip
    bundle = Bundle(cfgs, data=data, mode="loop")
    assert bundle.exact
    list(bundle.run())
    for k, cfg in enumerate(cfgs):
        lone = Trainer(cfg, data=data)
        hist = list(lone.run())
        m = bundle.sync_member(k)
        for key, v in lone.student.state_dict().items():
            assert torch.equal(m.student.state_dict()[key], v), key
        lone_mods, member_mods = lone.method_modules.state_dict(), m.method_modules.state_dict()
        assert set(lone_mods) == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
        for key, v in lone_mods.items():
            assert torch.equal(member_mods[key], v), key
        assert m.history[-1]["loss_cc"] == hist[-1]["loss_cc"]
        assert m.history[-1]["test_acc"] == hist[-1]["test_acc"]


@pytest.mark.parametrize("name", ["pkt", "rkd"])
def test_teacher_store_serves_the_features_bit_for_bit(name, teacher, tmp_path):
    """The teacher store keeps the teacher's pooled vectors: a run that reads them (2 epochs of 5 batches) ends
    with the online run's very weights, and its teacher never runs."""
    data = _first_320()
    base = dict(data="digits", model="resnet8", teacher=teacher, method=name, epochs=2, batch_size=64,
                eval_batch_size=512, device="cpu", lr=0.05, seed=3)  # fmt: skip
    runs = []
    for kw in ({"teacher_store": "off"}, {"teacher_store": "on", "teacher_store_dir": str(tmp_path)},
               {"teacher_store": "on", "teacher_store_dir": str(tmp_path)}):  # fmt: skip
        t = Trainer(TrainConfig.from_dict({**base, **kw}), data=data)
        if len(runs) == 2:
            t.teacher.register_forward_hook(
                lambda *a: pytest.fail("the teacher ran although the store has the epoch")
            )
        list(t.run())
        runs.append(t)
    online, _, reader = runs
    assert reader.result()["teacher_store"]["epochs_read"] == 2
    so, sr = online.student.state_dict(), reader.student.state_dict()
    assert all(torch.equal(so[k], sr[k]) for k in so)
    key = {"pkt": "loss_pkt", "rkd": "loss_rkd_angle"}[name]
    assert [h[key] for h in online.history] == [h[key] for h in reader.history]
