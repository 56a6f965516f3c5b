"""Golden values and identities of the logit distillation losses (DKD, DIST, TTM, WTTM, IPWD weights).

Every reference below is an independent float64 implementation written from the papers' equations with
Python loops (``math``), not a copy of the vectorised code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.errors import ConfigError
from kdtune.losses import METHODS, MethodContext, StepOutputs, dist, dkd, kd, ttm, wttm
from kdtune.losses.dist import inter_class_relation, intra_class_relation
from kdtune.losses.dkd import dkd_terms, warmup_factor
from kdtune.losses.ipwd import inverse_propensity_weights
from kdtune.losses.ttm import power_transform

S = [
    [2.0, -1.0, 0.5, 3.0, -2.0],
    [0.1, 0.2, -0.3, 1.5, 0.0],
    [-1.2, 2.2, 0.7, -0.4, 1.1],
    [3.3, 0.0, -2.5, 0.8, 1.9],
]
TL = [
    [1.0, 0.5, -0.5, 4.0, -1.0],
    [2.0, -1.0, 0.0, 1.0, 0.5],
    [-2.0, 3.0, 1.0, 0.0, 0.5],
    [4.0, 1.0, -3.0, 0.0, 2.0],
]
Y = [3, 0, 1, 4]


def tens(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


# ----------------------------------------------------------------------------- float64 references
def softmax_ref(row, temperature=1.0):
    z = [v / temperature for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    total = sum(e)
    return [x / total for x in e]


def kl_ref(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def entropy_ref(p):
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def renyi_ref(p, alpha):
    return math.log(sum(pi**alpha for pi in p)) / (1.0 - alpha)


def dkd_ref(s_rows, t_rows, ys, alpha, beta, temperature):
    """Zhao et al. 2022 eq. 2-5: b = [p_y, sum of the others]; p_hat over the non-target classes."""
    tckd_sum = nckd_sum = 0.0
    for s_row, t_row, y in zip(s_rows, t_rows, ys):
        ps, pt = softmax_ref(s_row, temperature), softmax_ref(t_row, temperature)
        rest_s = sum(p for j, p in enumerate(ps) if j != y)
        rest_t = sum(p for j, p in enumerate(pt) if j != y)
        tckd_sum += kl_ref([pt[y], rest_t], [ps[y], rest_s])
        hat_s = [p / rest_s for j, p in enumerate(ps) if j != y]
        hat_t = [p / rest_t for j, p in enumerate(pt) if j != y]
        nckd_sum += kl_ref(hat_t, hat_s)
    n = len(ys)
    return temperature**2 * (alpha * tckd_sum / n + beta * nckd_sum / n)


def pearson_ref(u, v, eps=1e-8):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    num = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    nu = math.sqrt(sum((a - mu) ** 2 for a in u))
    nv = math.sqrt(sum((b - mv) ** 2 for b in v))
    return num / (nu * nv + eps)


def dist_ref(s_rows, t_rows, beta, gamma, tau):
    ys = [softmax_ref(r, tau) for r in s_rows]
    yt = [softmax_ref(r, tau) for r in t_rows]
    inter = 1.0 - sum(pearson_ref(a, b) for a, b in zip(ys, yt)) / len(ys)
    n_cls = len(ys[0])
    cols = [([r[j] for r in ys], [r[j] for r in yt]) for j in range(n_cls)]
    intra = 1.0 - sum(pearson_ref(a, b) for a, b in cols) / n_cls
    return tau**2 * (beta * inter + gamma * intra)


def ttm_ref(s_rows, t_rows, gamma, weighted):
    """Zheng & Yang 2024 eq. 7 (power transform), eq. 2 (TTM) and eq. 22 (WTTM)."""
    total = 0.0
    for s_row, t_row in zip(s_rows, t_rows):
        pt = softmax_ref(t_row)
        powered = [p**gamma for p in pt]
        u = sum(powered)
        p_hat = [p / u for p in powered]
        kl = kl_ref(p_hat, softmax_ref(s_row))
        total += u * kl if weighted else kl
    return total / len(s_rows)


# ----------------------------------------------------------------------------- golden values
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.5)])
def test_dkd_golden(alpha, beta, temperature):
    got = dkd(tens(S), tens(TL), torch.tensor(Y), alpha, beta, temperature)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(dkd_ref(S, TL, Y, alpha, beta, temperature), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0)])
def test_dist_golden(beta, gamma, tau):
    got = dist(tens(S), tens(TL), beta, gamma, tau)
    assert got.item() == pytest.approx(dist_ref(S, TL, beta, gamma, tau), rel=1e-5, abs=1e-7)
    no_sq = dist(tens(S), tens(TL), beta, gamma, tau, tau_sq=False)
    assert no_sq.item() == pytest.approx(dist_ref(S, TL, beta, gamma, tau) / tau**2, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.8, 1.0])
def test_ttm_wttm_golden(gamma):
    assert ttm(tens(S), tens(TL), gamma).item() == pytest.approx(ttm_ref(S, TL, gamma, False), rel=1e-5)
    assert wttm(tens(S), tens(TL), gamma).item() == pytest.approx(ttm_ref(S, TL, gamma, True), rel=1e-5)


def zscore_ref(row, eps=1e-7):
    """Sun et al. CVPR 2024: (z - mean) / (eps + std), std unbiased (n - 1) as in the official code."""
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (eps + std) for v in row]


def kd_ref(s_rows, t_rows, temperature):
    total = sum(kl_ref(softmax_ref(t, temperature), softmax_ref(s, temperature)) for s, t in zip(s_rows, t_rows))
    return temperature**2 * total / len(s_rows)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logit_standardised_kd_and_dkd_golden(temperature):
    """Logit standardisation: z-score each row in float64, then the method's tempered softmax."""
    zs, zt = [zscore_ref(r) for r in S], [zscore_ref(r) for r in TL]
    got = kd(tens(S), tens(TL), temperature=temperature, logit_std=True)
    assert got.item() == pytest.approx(kd_ref(zs, zt, temperature), rel=1e-5, abs=1e-7)
    assert kd(tens(S), tens(TL), temperature).item() == pytest.approx(kd_ref(S, TL, temperature), rel=1e-5)
    assert got.item() != pytest.approx(kd_ref(S, TL, temperature), rel=1e-3)  # it does change the loss
    got = dkd(tens(S), tens(TL), torch.tensor(Y), 9.0, 72.0, temperature, logit_std=True)
    assert got.item() == pytest.approx(dkd_ref(zs, zt, Y, 9.0, 72.0, temperature), rel=1e-5, abs=1e-7)


def test_logit_standardisation_invariant_to_per_sample_affine_maps():
    """A positive scale and shift of one sample's logits leaves the standardised KD unchanged."""
    s, t = tens(S), tens(TL)
    scale = torch.tensor([[0.5], [3.0], [1.0], [7.0]])
    shift = torch.tensor([[1.0], [-2.0], [0.0], [5.0]])
    a = kd(s, t, 2.0, logit_std=True)
    b = kd(s * scale + shift, t * scale.flip(0) - shift, 2.0, logit_std=True)
    assert b.item() == pytest.approx(a.item(), rel=1e-4)


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_methods_take_logit_std(name):
    cls = METHODS.get(name)
    s, t, y = tens(S), tens(TL), torch.tensor(Y)
    hp = cls.resolve({"logit_std": "true", "T": 2.0})
    assert hp["logit_std"] is True
    terms = cls(hp, _ctx()).losses(StepOutputs(s, y, 100, 0, teacher_logits=t))
    plain = cls(cls.resolve({"T": 2.0}), _ctx()).losses(StepOutputs(s, y, 100, 0, teacher_logits=t))
    key = name
    w = hp["w_kd"] if name == "kd" else 1.0
    if name == "kd":
        ref = kd_ref([zscore_ref(r) for r in S], [zscore_ref(r) for r in TL], 2.0)
    else:
        ref = dkd_ref([zscore_ref(r) for r in S], [zscore_ref(r) for r in TL], Y, hp["alpha"], hp["beta"], 2.0)
    assert terms[key].item() == pytest.approx(w * ref, rel=1e-5)
    assert terms[key].item() != pytest.approx(plain[key].item(), rel=1e-3)
    with pytest.raises(ConfigError, match=f"{name}.logit_std"):
        cls.resolve({"logit_std": "maybe"})


# ----------------------------------------------------------------------------- DKD identities and traps
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposition_uses_teacher_target_probability(temperature):
    """Zhao et al. eq. 4: KL(p_t || p_s) = TCKD + (1 - p^t_y) * NCKD, per sample, at the same T."""
    s, t, y = tens(S), tens(TL), torch.tensor(Y)
    tckd, nckd = dkd_terms(s, t, y, temperature)
    for i in range(len(Y)):
        pt = softmax_ref(TL[i], temperature)
        ps = softmax_ref(S[i], temperature)
        kl = kl_ref(pt, ps)
        assert tckd[i].item() + (1 - pt[Y[i]]) * nckd[i].item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
        # the student's target probability does not satisfy it (these logits make the two differ)
        assert tckd[i].item() + (1 - ps[Y[i]]) * nckd[i].item() != pytest.approx(kl, rel=1e-2)


def test_dkd_is_linear_in_alpha_and_beta():
    s, t, y = tens(S), tens(TL), torch.tensor(Y)
    a = dkd(s, t, y, 1.0, 0.0, 4.0)
    b = dkd(s, t, y, 0.0, 1.0, 4.0)
    assert dkd(s, t, y, 3.0, 8.0, 4.0).item() == pytest.approx(3.0 * a.item() + 8.0 * b.item(), rel=1e-6)


def test_dkd_target_removed_by_mask_not_by_offset():
    """NCKD ignores the target logit however large it is (subtracting 1000 breaks beyond ~1000)."""
    s, t, y = tens(S), tens(TL), torch.tensor(Y)
    _, nckd = dkd_terms(s, t, y, 1.0)
    s2, t2 = s.clone(), t.clone()
    rows = torch.arange(len(Y))
    s2[rows, y] = 5000.0
    t2[rows, y] = -3000.0
    _, nckd2 = dkd_terms(s2, t2, y, 1.0)
    torch.testing.assert_close(nckd2, nckd, rtol=1e-5, atol=1e-6)


def test_dkd_two_classes_has_zero_nckd():
    s, t = torch.tensor([[1.0, -1.0], [0.3, 2.0]]), torch.tensor([[2.0, 0.0], [-1.0, 1.0]])
    y = torch.tensor([0, 1])
    tckd, nckd = dkd_terms(s, t, y, 2.0)
    assert torch.all(nckd == 0)
    # with two classes TCKD is the whole KL
    kl = [kl_ref(softmax_ref(t[i].tolist(), 2.0), softmax_ref(s[i].tolist(), 2.0)) for i in range(2)]
    torch.testing.assert_close(tckd, torch.tensor(kl, dtype=torch.float32), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_bf16_large_logits_finite(temperature):
    """bf16 logits of magnitude 60: confident-right, confident-wrong and saturated rows stay finite."""
    c = 100
    s = torch.full((4, c), -60.0)
    t = torch.full((4, c), -60.0)
    y = torch.tensor([0, 1, 2, 3])
    s[0, 0], t[0, 0] = 60.0, 60.0  # both confident on the target
    s[1, 5], t[1, 1] = 60.0, 60.0  # student confidently wrong
    s[2, 2], t[2, 7] = 60.0, 60.0  # teacher confidently wrong
    s[3] = torch.linspace(-60, 60, c)
    t[3] = torch.linspace(60, -60, c)
    s16 = s.to(torch.bfloat16).requires_grad_()
    loss = dkd(s16, t.to(torch.bfloat16), y, 1.0, 8.0, temperature)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s16.grad.float()).all()
    # reference on the bf16-rounded values, in float64
    s_r, t_r = s.to(torch.bfloat16).double().tolist(), t.to(torch.bfloat16).double().tolist()
    ref = dkd_ref(s_r, t_r, y.tolist(), 1.0, 8.0, temperature)
    assert loss.item() == pytest.approx(ref, rel=1e-4)


def test_dkd_warmup_factor_matches_mdistiller_one_based():
    # mdistiller: epoch counted from 1, factor min(epoch / warmup, 1); kdtune: 0-based epoch e, (e+1)/warmup
    for e in range(40):
        assert warmup_factor(e, 20) == min((e + 1) / 20, 1.0)
    assert warmup_factor(0, 20) == pytest.approx(0.05)
    assert warmup_factor(19, 20) == 1.0
    assert warmup_factor(0, 0) == 1.0


def _ctx(num_classes=5, student_feat_dim=None):
    return MethodContext(
        num_classes=num_classes,
        epochs=30,
        steps_per_epoch=1,
        device=torch.device("cpu"),
        student=torch.nn.Identity(),
        student_feat_dim=student_feat_dim,
    )


def test_dkd_method_ramps_only_the_dkd_term():
    cls = METHODS.get("dkd")
    m = cls(cls.resolve(), _ctx())
    s, t, y = tens(S), tens(TL), torch.tensor(Y)
    full = dkd(s, t, y, 1.0, 8.0, 4.0)
    ce = F.cross_entropy(s, y)
    for epoch, factor in [(0, 0.05), (9, 0.5), (19, 1.0), (100, 1.0)]:
        terms = m.losses(StepOutputs(s, y, epoch, 0, teacher_logits=t))
        assert set(terms) == {"ce", "dkd"}
        assert terms["dkd"].item() == pytest.approx(factor * full.item(), rel=1e-6)
        assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)


# ----------------------------------------------------------------------------- TTM / WTTM identities
def test_power_transform_is_temperature_scaling():
    """Zheng & Yang eq. 9: p^gamma / U = softmax(gamma * v); eq. 7's U is the unnormalised power sum."""
    t = tens(TL)
    for gamma in (0.1, 0.5, 1.0):
        log_p_hat, u = power_transform(t, gamma)
        torch.testing.assert_close(log_p_hat.exp(), F.softmax(gamma * t, dim=1), rtol=1e-5, atol=1e-7)
        for i, row in enumerate(TL):
            assert u[i].item() == pytest.approx(sum(p**gamma for p in softmax_ref(row)), rel=1e-5)


@pytest.mark.parametrize("temperature", [2.0, 4.0, 10.0])
def test_ttm_renyi_decomposition_eq15(temperature):
    """Eq. 15: D(p_T^t||q) = T*D(p_T^t||q_T) - (T-1)*H_{1/T}(q) + (T-1)*H(p_T^t), batch means."""
    lhs = ttm(tens(S), tens(TL), 1.0 / temperature).item()
    rhs = 0.0
    for s_row, t_row in zip(S, TL):
        pt_t = softmax_ref(t_row, temperature)
        q = softmax_ref(s_row)
        q_t = softmax_ref(s_row, temperature)
        rhs += (
            temperature * kl_ref(pt_t, q_t)
            - (temperature - 1) * renyi_ref(q, 1.0 / temperature)
            + (temperature - 1) * entropy_ref(pt_t)
        )
    rhs /= len(S)
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # the same statement with kdtune's KD (T^2 * KL at temperature T) as the first term
    regulariser = sum(
        -(temperature - 1) * renyi_ref(softmax_ref(s_row), 1.0 / temperature)
        + (temperature - 1) * entropy_ref(softmax_ref(t_row, temperature))
        for s_row, t_row in zip(S, TL)
    ) / len(S)
    kd_kl = kd(tens(S), tens(TL), temperature).item() / temperature**2
    assert lhs == pytest.approx(temperature * kd_kl + regulariser, rel=1e-5)
    # without the Renyi term the statement is false: the test can tell
    assert lhs != pytest.approx(temperature * kd_kl, rel=1e-3)


def test_gamma_one_gives_kd_at_t1():
    s, t = tens(S), tens(TL)
    k = kd(s, t, 1.0)
    torch.testing.assert_close(ttm(s, t, 1.0), k, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(wttm(s, t, 1.0), k, rtol=1e-6, atol=1e-7)
    _, u = power_transform(t, 1.0)
    torch.testing.assert_close(u, torch.ones(len(TL)), rtol=1e-6, atol=1e-6)


def test_power_sum_bounds():
    """Section 4: U_gamma(p) is 1 for a one-hot p and C^(1-gamma) for the uniform one."""
    c, gamma = 7, 0.3
    one_hot = torch.full((1, c), -1e4)
    one_hot[0, 2] = 1e4
    _, u1 = power_transform(one_hot, gamma)
    _, uu = power_transform(torch.zeros(1, c), gamma)
    assert u1.item() == pytest.approx(1.0, abs=1e-6)
    assert uu.item() == pytest.approx(c ** (1 - gamma), rel=1e-6)
    _, u = power_transform(torch.randn(64, c) * 3, gamma)
    assert torch.all(u >= 1 - 1e-6) and torch.all(u <= c ** (1 - gamma) + 1e-5)


def test_ttm_bf16_extreme_logits_finite():
    s = (torch.randn(8, 100) * 60).to(torch.bfloat16).requires_grad_()
    t = (torch.randn(8, 100) * 60).to(torch.bfloat16)
    for fn in (ttm, wttm):
        loss = fn(s, t, 0.1)
        assert torch.isfinite(loss)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g.float()).all()


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_ttm_methods_weigh_with_beta_and_refuse_gamma_outside_0_1(name):
    cls = METHODS.get(name)
    hp = cls.resolve({"gamma": 0.25, "beta": 5.0})
    m = cls(hp, _ctx())
    s, t, y = tens(S), tens(TL), torch.tensor(Y)
    terms = m.losses(StepOutputs(s, y, 0, 0, teacher_logits=t))
    fn = ttm if name == "ttm" else wttm
    assert terms[name].item() == pytest.approx(5.0 * fn(s, t, 0.25).item(), rel=1e-6)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=rf"{name}\.gamma"):
            cls.resolve({"gamma": bad})
    assert cls.resolve({"gamma": 1.0})["gamma"] == 1.0


# ----------------------------------------------------------------------------- DIST invariances and guards
def _probs(rows, tau=4.0):
    return F.softmax(tens(rows, torch.float64) / tau, dim=1)


# The official eps (1e-8 added to the product of the norms) breaks exact invariance by about eps / |u||v|;
# with these small probability columns that is up to ~1e-5 relative, hence rtol 1e-4 below.
INV_TOL = {"rtol": 1e-4, "atol": 1e-7}


def test_dist_inter_invariant_to_positive_affine_maps_of_rows():
    y_s, y_t = _probs(S), _probs(TL)
    base_inter = inter_class_relation(y_s, y_t)
    a_s = torch.tensor([[2.0], [0.5], [7.0], [1.3]], dtype=torch.float64)
    b_s = torch.tensor([[1.0], [-3.0], [0.2], [10.0]], dtype=torch.float64)
    a_t = torch.tensor([[0.1], [3.0], [1.0], [4.0]], dtype=torch.float64)
    b_t = torch.tensor([[-1.0], [0.0], [5.0], [0.5]], dtype=torch.float64)
    moved_s, moved_t = a_s * y_s + b_s, a_t * y_t + b_t
    torch.testing.assert_close(inter_class_relation(moved_s, moved_t), base_inter, **INV_TOL)
    # ... but not to a negative scale (rho flips sign: inter -> 2 - inter) ...
    flipped = inter_class_relation(-y_s, y_t)
    torch.testing.assert_close(flipped, 2.0 - base_inter, rtol=1e-6, atol=1e-7)
    assert abs(flipped.item() - base_inter.item()) > 1e-2
    # ... and per-row maps change the intra (column) term
    assert abs(intra_class_relation(moved_s, y_t).item() - intra_class_relation(y_s, y_t).item()) > 1e-3


def test_dist_intra_invariant_to_positive_affine_maps_of_columns():
    y_s, y_t = _probs(S), _probs(TL)
    a = torch.tensor([[3.0, 0.2, 1.0, 9.0, 0.7]], dtype=torch.float64)
    b = torch.tensor([[0.5, -2.0, 0.0, 1.0, 4.0]], dtype=torch.float64)
    base = intra_class_relation(y_s, y_t)
    torch.testing.assert_close(intra_class_relation(a * y_s + b, y_t), base, **INV_TOL)
    torch.testing.assert_close(intra_class_relation(y_s, a * y_t + b), base, **INV_TOL)
    assert abs(inter_class_relation(a * y_s + b, y_t).item() - inter_class_relation(y_s, y_t).item()) > 1e-3


def test_dist_total_invariant_to_one_global_positive_affine_map_and_zero_at_match():
    y_s, y_t = _probs(S), _probs(TL)
    total = inter_class_relation(y_s, y_t) + intra_class_relation(y_s, y_t)
    moved = 3.0 * y_s - 0.25
    torch.testing.assert_close(
        inter_class_relation(moved, y_t) + intra_class_relation(moved, y_t), total, **INV_TOL
    )
    # identical inputs: 0 up to the eps of the official convention (1 - |u|^2 / (|u|^2 + eps) per pair)
    same = dist(tens(S), tens(S), 1.0, 1.0, 4.0).item()
    assert same == pytest.approx(dist_ref(S, S, 1.0, 1.0, 4.0), rel=1e-3, abs=1e-6) and 0 <= same < 1e-3
    assert dist(tens(S), tens(TL), 1.0, 1.0, 4.0).item() > 1.0


def test_dist_guards_degenerate_shapes():
    s = torch.randn(1, 6, requires_grad=True)
    t = torch.randn(1, 6)
    one_row = dist(s, t, 1.0, 1.0, 4.0)
    assert torch.isfinite(one_row)
    assert one_row.item() == pytest.approx(
        16.0 * (1.0 - pearson_ref(*[softmax_ref(r[0], 4.0) for r in (s.tolist(), t.tolist())])), rel=1e-5
    )
    one_row.backward()
    assert torch.isfinite(s.grad).all()
    s1 = torch.randn(5, 1, requires_grad=True)
    one_class = dist(s1, torch.randn(5, 1), 1.0, 1.0, 4.0)
    assert one_class.item() == 0.0
    one_class.backward()
    assert torch.isfinite(s1.grad).all()
    # a constant column (one class never varies over the batch) is correlation 0, not NaN
    s2 = torch.randn(6, 4)
    t2 = torch.zeros(6, 4)
    assert torch.isfinite(dist(s2, t2, 1.0, 1.0, 4.0))


def test_dist_method_weighs_with_w_kd():
    cls = METHODS.get("dist")
    m = cls(cls.resolve(), _ctx())
    s, t, y = tens(S), tens(TL), torch.tensor(Y)
    terms = m.losses(StepOutputs(s, y, 0, 0, teacher_logits=t))
    assert terms["dist"].item() == pytest.approx(2.0 * dist_ref(S, TL, 1.0, 1.0, 4.0), rel=1e-5)
    with pytest.raises(ConfigError, match="dist.tau"):
        cls.resolve({"tau": 0})


# ----------------------------------------------------------------------------- IPWD weights
def test_inverse_propensity_weights_formula_clip_and_normalisation():
    h_cls = torch.tensor([1.0, 2.0, 0.5, 3.0])
    h_kd = torch.tensor([1.0, 0.5, 2.0, 1e-12])
    raw = inverse_propensity_weights(h_cls, h_kd, clip=float("inf"), normalize=False)
    torch.testing.assert_close(raw[:3], torch.tensor([2.0, 5.0, 1.25]))
    assert raw[3] > 1e6  # H_kd -> 0: only the clip bounds it
    clipped = inverse_propensity_weights(h_cls, h_kd, clip=4.0, normalize=False)
    torch.testing.assert_close(clipped, torch.tensor([2.0, 4.0, 1.25, 4.0]))
    normed = inverse_propensity_weights(h_cls, h_kd, clip=4.0, normalize=True)
    torch.testing.assert_close(normed, clipped / clipped.mean())
    assert normed.mean().item() == pytest.approx(1.0)


def _ipwd(overrides, feat_dim=6, num_classes=5):
    cls = METHODS.get("ipwd")
    torch.manual_seed(0)
    return cls(cls.resolve(overrides), _ctx(num_classes, feat_dim))


def _kd_ref_per_sample(s_rows, t_rows, temperature):
    return [
        temperature**2 * kl_ref(softmax_ref(t, temperature), softmax_ref(s, temperature))
        for s, t in zip(s_rows, t_rows)
    ]


def test_ipwd_sample_weights_and_weighted_kd():
    m = _ipwd({"clip": 1e9})
    head = m.trainable_modules()["cls_head"]
    torch.manual_seed(1)
    feats = torch.randn(4, 6)
    s, t, y = tens(S), tens(TL), torch.tensor(Y)
    terms = m.losses(StepOutputs(s, y, 0, 0, teacher_logits=t, student_features=feats))
    assert set(terms) == {"ce", "kd", "cls"}
    cls_logits = head(feats).detach()
    raw = []
    for i in range(4):
        h_cls = -math.log(softmax_ref(cls_logits[i].tolist())[Y[i]])
        h_kd = -math.log(softmax_ref(S[i])[Y[i]])
        raw.append(1 + h_cls / h_kd)
    w = [r / (sum(raw) / 4) for r in raw]
    torch.testing.assert_close(m.last_weights, torch.tensor(w), rtol=1e-5, atol=1e-6)
    kl = _kd_ref_per_sample(S, TL, 4.0)
    expected = 0.9 * sum(wi * ki for wi, ki in zip(w, kl)) / 4
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-6)
    assert terms["cls"].item() == pytest.approx(F.cross_entropy(cls_logits, y).item(), rel=1e-6)


def test_ipwd_class_weights_follow_moving_averages():
    m = _ipwd({"weighting": "class", "momentum": 0.5, "clip": 1e9, "normalize": False}, num_classes=5)
    head = m.trainable_modules()["cls_head"]
    torch.manual_seed(2)
    f1, f2 = torch.randn(4, 6), torch.randn(4, 6)
    s1, t = tens(S), tens(TL)
    y1 = torch.tensor([0, 0, 1, 1])
    s2 = tens(S).flip(0)
    y2 = torch.tensor([0, 2, 2, 0])

    def ce(logits, y):
        return F.cross_entropy(logits, y, reduction="none")

    m.losses(StepOutputs(s1, y1, 0, 0, teacher_logits=t, student_features=f1))
    h_cls1, h_kd1 = ce(head(f1).detach(), y1), ce(s1, y1)
    w1 = m.last_weights
    # samples of one class share one weight: 1 + mean H_cls / mean H_kd of their class
    assert w1[0].item() == pytest.approx(1 + h_cls1[:2].mean().item() / h_kd1[:2].mean().item(), rel=1e-5)
    assert w1[1].item() == pytest.approx(w1[0].item(), rel=1e-6)

    m.losses(StepOutputs(s2, y2, 0, 1, teacher_logits=t, student_features=f2))
    h_cls2, h_kd2 = ce(head(f2).detach(), y2), ce(s2, y2)
    sel0 = y2 == 0
    ema_cls0 = 0.5 * h_cls1[:2].mean() + 0.5 * h_cls2[sel0].mean()
    ema_kd0 = 0.5 * h_kd1[:2].mean() + 0.5 * h_kd2[sel0].mean()
    w2 = m.last_weights
    assert w2[0].item() == pytest.approx(1 + ema_cls0.item() / ema_kd0.item(), rel=1e-5)
    # class 2 first seen now: its statistics are this batch's means
    sel2 = y2 == 2
    assert w2[1].item() == pytest.approx(1 + h_cls2[sel2].mean().item() / h_kd2[sel2].mean().item(), rel=1e-5)
    # class 1 was absent from batch 2: its statistics are those of batch 1
    state = m.state_dict()
    assert state["ema_kd"][1].item() == pytest.approx(h_kd1[2:].mean().item(), rel=1e-5)
    assert state["seen"].tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("detach", [True, False])
def test_ipwd_extra_head_reads_detached_features(detach):
    assert METHODS.get("ipwd").resolve()["detach_features"] is False  # the paper's IPWD shares the backbone
    m = _ipwd({"detach_features": detach})
    feats = torch.randn(4, 6, requires_grad=True)
    terms = m.losses(
        StepOutputs(tens(S), torch.tensor(Y), 0, 0, teacher_logits=tens(TL), student_features=feats)
    )
    terms["cls"].backward()
    assert (feats.grad is None) == detach
    assert m.trainable_modules()["cls_head"].weight.grad is not None


def test_ipwd_needs_feature_size():
    cls = METHODS.get("ipwd")
    with pytest.raises(ConfigError, match="student_feat_dim"):
        cls(cls.resolve(), _ctx(5, None))
    with pytest.raises(ConfigError, match="ipwd.weighting"):
        cls.resolve({"weighting": "batch"})
