"""DiSK (kdtune/losses/disk.py): help, eq. 4, budget eq. 3, lambda schedule, fitted temperature, guide, state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdtune.errors import ConfigError
from kdtune.losses import METHODS, MethodContext, StepOutputs
from kdtune.losses.disk import (
    WARM_START_HINT,
    DiSK,
    budget_loss,
    disk_distill,
    fit_student_temperature,
    guide_objective,
    guide_stats,
    helped_mistakes,
    helped_probs,
    lambda_schedule,
    student_ce,
    summarize_guide_stats,
    topk_mask,
)
from kdtune.models.toys import BNMLP

C = 6


def _logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# -- help and eq. 4 ------------------------------------------------------------------------------------------
def test_help_touches_only_teacher_topk_and_keeps_a_distribution():
    s, t = _logits(8, C, seed=1), _logits(8, C, seed=2)
    g = torch.rand(8, generator=torch.Generator().manual_seed(3))
    k, tau_s = 2, 1.5
    base = F.softmax(s / tau_s, dim=1)
    helped = helped_probs(s, t, g, tau_s, k)
    top = torch.topk(t, k, dim=1).indices
    mask = torch.zeros(8, C, dtype=torch.bool).scatter_(1, top, True)
    diff = helped - base
    assert torch.allclose(diff[~mask], torch.zeros(()), atol=0)  # other classes untouched
    assert torch.allclose(diff[mask].view(8, k), g[:, None].expand(8, k), atol=1e-6)  # +g on each top-K class
    assert (helped >= 0).all()
    assert torch.allclose(helped.sum(1), 1 + k * g, atol=1e-6)  # eq. 4's helped vector: mass 1 + K g
    norm = helped_probs(s, t, g, tau_s, k, normalize=True)
    assert torch.allclose(norm.sum(1), torch.ones(8), atol=1e-6)  # as a distribution
    assert torch.allclose(norm * (1 + k * g[:, None]), helped, atol=1e-6)


def test_zero_help_leaves_student_unchanged_and_eq4_is_tempered_cross_entropy():
    s, t = _logits(16, C, seed=4), _logits(16, C, seed=5)
    g = torch.zeros(16)
    tau_t, tau_s, k = 4.0, 2.5, 3
    assert torch.allclose(helped_probs(s, t, g, tau_s, k), F.softmax(s / tau_s, dim=1))
    pt = F.softmax(t / tau_t, dim=1)
    want = -(pt * F.log_softmax(s / tau_s, dim=1)).sum(1).mean() * tau_t * tau_s
    assert torch.allclose(disk_distill(s, t, g, tau_t, tau_s, k), want, atol=1e-5)
    # help can only lower eq. 4, and more help lowers it more
    g1, g2 = torch.full((16,), 0.2), torch.full((16,), 0.6)
    d0, d1, d2 = (disk_distill(s, t, x, tau_t, tau_s, k) for x in (g, g1, g2))
    assert d2 < d1 < d0


def test_topk_mask_and_topk_target():
    t = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert topk_mask(t, 2).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    s = torch.tensor([[1.0, 0.0, 5.0, 0.0]])  # the student bets on class 2, outside the teacher's top 2
    g = torch.ones(1)
    full = disk_distill(s, t, g, 1.0, 1.0, 2, target="full")
    topk = disk_distill(s, t, g, 1.0, 1.0, 2, target="topk")
    pt = F.softmax(t, dim=1)[0]
    ps = F.softmax(s, dim=1)[0]
    helped = ps + torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert torch.allclose(full, -(pt * helped.log()).sum(), atol=1e-6)
    q = pt * torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert torch.allclose(topk, -((q / q.sum()) * helped.log()).sum(), atol=1e-6)
    with pytest.raises(ConfigError):
        topk_mask(t, 5)


def test_budget_is_relu_of_helped_cross_entropy_minus_delta():
    s = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 1])  # right, wrong, wrong
    g = torch.tensor([1.0, 0.5, 0.0])
    ce = -F.log_softmax(s, dim=1)[torch.arange(3), y]
    assert torch.allclose(student_ce(s, y), ce)
    want = (g * ce).mean() - 0.1
    assert torch.allclose(budget_loss(s, y, g, 0.1), want)
    assert budget_loss(s, y, g, 5.0) == 0  # within budget: no penalty
    assert torch.allclose(budget_loss(s, y, g, 0.0, ce_cap=1.0), (g * ce.clamp(max=1.0)).mean())
    assert math.isclose(float(helped_mistakes(s, y, g)), 0.5 / 3, rel_tol=1e-6)


# -- lambda schedule ---------------------------------------------------------------------------------------
def _cos(frac, lo=0.1, hi=50.0):
    return lo + (hi - lo) * (1 - math.cos(math.pi * frac)) / 2


def test_lambda_schedule_cosine_periods_and_monotone_final_period():
    lo, hi = 0.1, 50.0
    lam = [lambda_schedule(e, 200, lo, hi, 50) for e in range(200)]
    assert lam[0] == pytest.approx(lo)
    assert lam[25] == pytest.approx((lo + hi) / 2)  # mid-period
    assert lam[60] == pytest.approx(_cos(10 / 50))
    assert lam[50] == pytest.approx(lo)  # a new exploratory period restarts at lambda_min
    assert lam[49] == pytest.approx(_cos(49 / 50))
    # final period (epochs 150..199): from lambda_min, monotone, exactly lambda_max on the last epoch
    assert lam[150] == pytest.approx(lo)
    assert lam[199] == pytest.approx(hi)
    assert lam[175] == pytest.approx(_cos(25 / 49))
    assert all(b > a for a, b in zip(lam[150:], lam[151:]))
    # 240 epochs: the final period starts at the boundary 150 (where the cosine restarts anyway) and rises to
    # the end; no restart at 190 (the old schedule dropped from 44.3 to lambda_min there)
    lam = [lambda_schedule(e, 240, lo, hi, 50) for e in range(240)]
    assert lam[149] == pytest.approx(_cos(49 / 50)) and lam[150] == pytest.approx(lo)
    assert lam[239] == pytest.approx(hi)
    assert all(b > a for a, b in zip(lam[150:], lam[151:]))
    assert lam[190] > lam[189]
    # shorter than one period: one monotone rise
    assert [round(lambda_schedule(e, 3, 1.0, 3.0, 50), 6) for e in range(3)] == [1.0, 2.0, 3.0]


# -- fitted student temperature ------------------------------------------------------------------------------
@pytest.mark.parametrize("c,tau_t", [(4.0, 2.0), (0.5, 4.0), (2.0, 7.0)])
def test_fitted_temperature_recovers_known_scale(c, tau_t):
    s = _logits(300, 10, seed=7)
    t = c * s  # softmax(t / tau_t) == softmax(s / (tau_t / c))
    T = fit_student_temperature(s, t, tau_t)
    assert float(T) == pytest.approx(tau_t / c, rel=1e-4)


def test_fitted_temperature_per_ensemble_member():
    s = _logits(3, 200, 5, seed=8)
    c = torch.tensor([1.0, 2.0, 8.0])
    t = c[:, None, None] * s
    T = fit_student_temperature(s, t, 4.0)
    assert T.shape == (3,)
    assert torch.allclose(T, 4.0 / c, rtol=1e-4)


# -- the Method ------------------------------------------------------------------------------------------------
class Scaled(nn.Module):
    """A 'teacher' whose logits are c times the student's, with features."""

    def __init__(self, student, c):
        super().__init__()
        self.student, self.c = student, c
        self.feat_dim = student.feat_dim

    def forward(self, x, return_features=False):
        logits, feats = self.student(x, return_features=True)
        return (self.c * logits, feats) if return_features else self.c * logits


def _ctx(init_error=0.2, classes=3, epochs=10, seed=0):
    torch.manual_seed(seed)
    student = BNMLP(2, (4,), classes)
    teacher = BNMLP(2, (8, 16), classes)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(11))
    y = torch.randint(0, classes, (64,), generator=torch.Generator().manual_seed(12))
    return MethodContext(
        num_classes=classes, epochs=epochs, steps_per_epoch=4, device=torch.device("cpu"), student=student,
        teacher=teacher, student_feat_dim=student.feat_dim, teacher_feat_dim=teacher.feat_dim,
        train_batches=lambda: iter([(x[:32], y[:32]), (x[32:], y[32:])]), init_error=init_error,
    )  # fmt: skip


def _make(overrides=None, **ctx_kw):
    hp = DiSK.resolve({"K": 2, "guide_hidden": "8", "student_T": 2.0, "alternate": "batch", **(overrides or {})})
    return DiSK(hp, _ctx(**ctx_kw))


def _batch(seed=0, n=32, classes=3, student_wrong=None):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, classes, generator=gen) * 3
    y = t.argmax(1)
    s = torch.randn(n, classes, generator=gen) * 2
    if student_wrong is not None:  # the student is right on the first half, confidently wrong on the rest
        s = F.one_hot(y, classes).float() * 4
        s[n // 2 :] = F.one_hot((y[n // 2 :] + 1) % classes, classes).float() * 4
    feats = torch.randn(n, 16, generator=gen)
    return StepOutputs(student_logits=s, targets=y, epoch=0, step=0, teacher_logits=t, teacher_features=feats)


def _guide_obj(m, out):
    m.guide.train()
    with torch.no_grad():
        g = m.guide(out.teacher_features, out.teacher_logits)
        return float(guide_objective(out.student_logits, out.teacher_logits, out.targets, g, **m._step_kw()))


def test_registered_with_flags():
    cls = METHODS.get("disk")
    assert cls is DiSK
    assert cls.needs_teacher and cls.needs_teacher_features and cls.needs_init
    assert DiSK.resolve({})["K"] == 20 and DiSK.resolve({})["tau_t"] == 7.0


def test_guide_steps_lower_the_guide_objective():
    m = _make({"guide_steps": 5, "lambda_min": 1.0, "lambda_max": 2.0})
    out = _batch(seed=1)
    before = _guide_obj(m, out)
    for _ in range(4):
        m.losses(out)
    after = _guide_obj(m, out)
    assert after < before - 0.05 * abs(before)


def test_student_terms_are_weighted_and_carry_no_budget():
    m = _make({"alpha": 0.3, "guide_steps": 1})
    out = _batch(seed=2)
    out.student_logits.requires_grad_(True)
    terms = m.losses(out)
    assert set(terms) == {"ce", "disk"}
    assert torch.allclose(terms["ce"], 0.3 * F.cross_entropy(out.student_logits, out.targets))
    with torch.no_grad():
        g = m.guide(out.teacher_features, out.teacher_logits)
    want = 0.7 * disk_distill(out.student_logits, out.teacher_logits, g, 7.0, 2.0, 2)
    assert torch.allclose(terms["disk"], want, atol=1e-5)
    sum(terms.values()).backward()
    assert out.student_logits.grad is not None and out.student_logits.grad.abs().sum() > 0
    stats = m.epoch_metrics()
    assert 0 <= stats["g_mean"] <= 1 and stats["lambda"] == m.lam


@pytest.mark.parametrize("delta", [0.3, 3.0])
def test_budget_binds_helped_fraction_moves_to_delta(delta):
    # The student is right on the first half of the batch and confidently wrong on the second; the teacher's
    # features tell the halves apart. Unnormalised help always lowers L_dist, so only the budget limits g.
    m = _make({"alpha": 0.0, "delta": 0.3, "lambda_min": 5.0, "lambda_max": 6.0, "guide_steps": 10,
               "guide_lr": 0.05, "tau_t": 1.0, "student_T": 1.0, "help_norm": "eq4", "budget_relax": "ce",
               "guide_schedule": "constant"})  # fmt: skip
    m.delta = delta  # 3.0: a budget the guide cannot exceed (above the [0, 1] range of the hyperparameter)
    out = _batch(seed=3, n=64, student_wrong=True)
    out.teacher_features[:32, 0], out.teacher_features[32:, 0] = 3.0, -3.0
    s, y, t = out.student_logits, out.targets, out.teacher_logits

    def stats():
        m.guide.train()
        with torch.no_grad():
            g = m.guide(out.teacher_features, t)
        return float((g * student_ce(s, y)).mean()), float(helped_mistakes(s, y, g)), g

    relaxed0, frac0, _ = stats()
    assert 1.0 < relaxed0 < 2.0 and 0.2 < frac0 < 0.45  # untrained guide: g about 0.7 everywhere
    for _ in range(30):
        m.losses(out)
    relaxed1, frac1, g = stats()
    epoch = m.epoch_metrics()  # the engine's per-epoch statistics: the means over the steps' g
    assert 0.0 <= epoch["g_right"] <= 1.0 and 0.0 <= epoch["helped_frac"] <= 1.0
    if delta < relaxed0:  # binds: the relaxed budget settles at delta, help goes to the right answers first
        assert relaxed1 == pytest.approx(delta, abs=0.05)
        assert frac1 < frac0 / 2
        assert g[:32].mean() > 0.95 and 0.02 < g[32:].mean() < 0.5
    else:  # never binds: nothing stops the help
        assert g.min() > 0.95 and frac1 > 0.45


def test_state_dict_round_trips_exactly():
    a = _make({"guide_opt": "sgd"}, seed=0)
    a.on_epoch_start(3)
    out = _batch(seed=4)
    for _ in range(3):
        a.losses(out)
    state = a.state_dict()
    b = _make({"guide_opt": "sgd"}, seed=1)  # other initial guide weights
    b.load_state_dict(state)
    for (ka, va), (kb, vb) in zip(a.guide.state_dict().items(), b.guide.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert (b.tau_s, b.lam, b.epoch, b.delta) == (a.tau_s, a.lam, a.epoch, a.delta)
    out2 = _batch(seed=5)
    ta, tb = a.losses(out2), b.losses(out2)  # the optimiser's momentum came along: identical next step
    for k in ta:
        assert torch.equal(ta[k], tb[k])
    for pa, pb in zip(a.guide.parameters(), b.guide.parameters()):
        assert torch.equal(pa, pb)
    # the saved state is a snapshot: later steps of `a` do not change it
    saved = state["guide_opt"]["state"][0]["momentum_buffer"].clone()
    a.losses(out2)
    assert torch.equal(state["guide_opt"]["state"][0]["momentum_buffer"], saved)


def test_setup_fits_student_temperature_with_the_warm_student():
    hp = DiSK.resolve({"K": 2, "guide_hidden": "8", "tau_t": 4.0})
    ctx = _ctx()
    ctx.teacher = Scaled(ctx.student, 2.0)
    m = DiSK(hp, ctx)
    with pytest.raises(RuntimeError):
        m.losses(_batch())
    m.setup()
    assert m.tau_s == pytest.approx(2.0, rel=1e-4)
    assert ctx.student.training  # mode restored


def test_delta_from_init_error_or_explicit():
    assert _make({"delta_offset": 0.05}, init_error=0.3).delta == pytest.approx(0.35)
    assert _make({"delta_offset": -0.5}, init_error=0.3).delta == 0.0
    assert _make({"delta": 0.1}, init_error=None).delta == pytest.approx(0.1)


def test_bad_input_raises_config_error():
    with pytest.raises(ConfigError, match="K=5 exceeds"):
        _make({"K": 5})
    with pytest.raises(ConfigError, match="lambda_max"):
        DiSK.resolve({"lambda_min": 5.0, "lambda_max": 5.0})
    with pytest.raises(ConfigError, match="lambda_max"):
        DiSK.resolve({"lambda_min": 10.0, "lambda_max": 1.0})
    with pytest.raises(ConfigError) as e:
        _make({}, init_error=None)
    assert WARM_START_HINT in str(e.value) and "init=runs/ce/final.pt" in str(e.value)
    with pytest.raises(ConfigError, match="guide_hidden"):
        DiSK.resolve({"guide_hidden": "64,x"})
    with pytest.raises(ConfigError):
        DiSK.resolve({"guide_opt": "rmsprop"})


# -- a guide that selects ------------------------------------------------------------------------------------
def test_renormalised_help_is_eq4_plus_the_official_log_term():
    s, t = _logits(2, 16, C, seed=20), _logits(2, 16, C, seed=21)
    g = torch.rand(2, 16, generator=torch.Generator().manual_seed(22))
    for k, target in ((C, "full"), (3, "full"), (3, "topk")):
        plain = disk_distill(s, t, g, 4.0, 2.5, k, reduction="none", target=target)
        renorm = disk_distill(s, t, g, 4.0, 2.5, k, reduction="none", target=target, normalize=True)
        assert torch.allclose(renorm, plain + 4.0 * 2.5 * torch.log1p(k * g), atol=1e-4)
    # the student's gradient is the same either way: 1 + K g does not depend on the student
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    disk_distill(s1, t, g, 4.0, 2.5, 3).sum().backward()
    disk_distill(s2, t, g, 4.0, 2.5, 3, normalize=True).sum().backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_renormalised_help_lowers_l_dist_on_mistakes_only():
    # student agrees with the teacher on row 0 and disagrees on row 1: help pays on row 1 only
    t = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    s = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    no, yes = torch.zeros(2), torch.ones(2)
    d0 = disk_distill(s, t, no, 1.0, 1.0, 3, reduction="none", normalize=True)
    d1 = disk_distill(s, t, yes, 1.0, 1.0, 3, reduction="none", normalize=True)
    assert d1[0] > d0[0] and d1[1] < d0[1]
    # eq. 4 as written: help lowers both
    e0 = disk_distill(s, t, no, 1.0, 1.0, 3, reduction="none")
    e1 = disk_distill(s, t, yes, 1.0, 1.0, 3, reduction="none")
    assert (e1 < e0).all()


def test_budget_relaxations_and_normalisers():
    s = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])  # mistakes: rows 1 and 2
    g = torch.tensor([0.5, 1.0, 0.25, 1.0])
    ce = student_ce(s, y)
    assert budget_loss(s, y, g, 0.1, relax="indicator").item() == pytest.approx((1.0 + 0.25) / 4 - 0.1)
    assert budget_loss(s, y, g, 0.1, relax="indicator", norm="mistakes").item() == pytest.approx(1.25 / 2 - 0.1)
    assert budget_loss(s, y, g, 0.0).item() == pytest.approx(float((g * ce).mean()), rel=1e-6)
    assert budget_loss(s, y, g, 0.9, relax="indicator").item() == 0.0
    with pytest.raises(ConfigError, match="budget_relax"):
        budget_loss(s, y, g, 0.1, relax="hinge")
    with pytest.raises(ConfigError, match="help_norm"):
        guide_objective(s, s, y, g, alpha=0.1, lam=1.0, tau_t=1.0, tau_s=1.0, k=2, delta=0.1, help_norm="x")


def test_guide_stats_sums_and_means():
    g = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.6])
    wrong = torch.tensor([True, True, False, False, False])
    stats = summarize_guide_stats(guide_stats(g, wrong))
    assert stats["g_mean"] == pytest.approx(2.6 / 5)
    assert stats["g_wrong"] == pytest.approx(0.85) and stats["g_right"] == pytest.approx(0.3)
    assert stats["helped_frac"] == pytest.approx(3 / 5) and stats["wrong_frac"] == pytest.approx(0.4)
    # ensemble sums add up over members
    two = guide_stats(torch.stack([g, g]), torch.stack([wrong, wrong])).sum(0)
    assert summarize_guide_stats(two)["g_wrong"] == pytest.approx(0.85)


def test_passes_alternation_trains_the_guide_at_round_starts_only():
    m = _make({"alternate": "passes", "guide_epochs": 2, "round_epochs": 3, "guide_warmup": 1})
    seen = []
    batches = m.ctx.train_batches
    m.ctx.train_batches = lambda: (seen.append(1), batches())[1]

    def params():
        return [p.detach().clone() for p in m.guide.parameters()]

    for epoch, trained in ((0, 3), (1, 0), (2, 0), (3, 2)):
        before, n = params(), len(seen)
        m.on_epoch_start(epoch)
        assert len(seen) - n == trained  # guide passes over the training set (+1 warm-up pass first)
        changed = any(not torch.equal(a, b) for a, b in zip(before, params()))
        assert changed == (trained > 0)
        before = params()
        m.losses(_batch(seed=epoch))  # the student's step leaves the guide alone
        assert all(torch.equal(a, b) for a, b in zip(before, params()))
    stats = m.epoch_metrics()
    assert set(stats) >= {"g_mean", "g_wrong", "g_right", "helped_frac", "lambda", "delta", "guide_lr"}


def test_guide_lr_follows_the_student_schedule():
    m = _make({"guide_lr": 0.2})
    m.ctx.extra["lr_factor"] = lambda ef: 0.5 if ef >= 5 else 1.0
    m.on_epoch_start(6)
    assert m.guide_opt.param_groups[0]["lr"] == pytest.approx(0.1)
    del m.ctx.extra["lr_factor"]  # no engine schedule: A.5's cosine over the epochs
    m.on_epoch_start(5)
    assert m.guide_opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    c = _make({"guide_lr": 0.2, "guide_schedule": "constant"})
    c.on_epoch_start(9)
    assert c.guide_opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_passes_need_training_data():
    hp = DiSK.resolve({"K": 2, "guide_hidden": "8", "student_T": 2.0})
    ctx = _ctx()
    ctx.train_batches = None
    with pytest.raises(ConfigError, match="alternate=batch"):
        DiSK(hp, ctx)


def test_epoch_line_shows_the_method_metrics():
    from kdtune.engine.run import epoch_line

    m = {"epoch": 1, "epochs": 2, "train_loss": 1.0, "loss_ce": 1.0, "lr": 0.1, "val_acc": None, "test_acc": 50.0,
         "train_images_per_s": 10.0, "train_s": 1.0, "eval_s": 1.0, "method_g_wrong": 0.8, "method_g_right": 0.1}
    line = epoch_line(m)
    assert "g_wrong 0.8" in line and "g_right 0.1" in line


def test_trainer_logs_the_guide_statistics_per_epoch(tmp_path):
    """The engine adds epoch_metrics() to each epoch's metrics as method_* (MLflow and the epoch line)."""
    from kdtune.engine import iter_train, train

    toy = dict(data="disk-gaussians", batch_size=200, lr=0.1, weight_decay=0.01)
    train(dict(toy, model="toy_mlp_teacher", method="ce", epochs=3, out=str(tmp_path / "t")))
    train(dict(toy, model="toy_mlp_student", method="ce", epochs=3, out=str(tmp_path / "ce")))
    lines: list[str] = []
    epochs = list(iter_train(dict(toy, model="toy_mlp_student", method="disk", teacher=str(tmp_path / "t"),
                                  init=str(tmp_path / "ce" / "final.pt"), K=3, guide_hidden="2", epochs=4,
                                  out=str(tmp_path / "disk")), log=lines.append))  # fmt: skip
    assert len(epochs) == 4
    for m in epochs:
        assert 0.0 <= m["method_g_mean"] <= 1.0 and 0.0 <= m["method_helped_frac"] <= 1.0
        assert {"method_g_wrong", "method_g_right", "method_lambda", "method_delta"} <= set(m)
    assert any("g_wrong" in ln and "helped_frac" in ln for ln in lines)
