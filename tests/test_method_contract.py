"""One contract test over every registered method (``kdtune.losses.METHODS``), as the engine drives them.

A method that declares ``needs_teacher``, ``needs_student_features``, ``needs_teacher_features`` or
``needs_init`` gets exactly that: teacher logits (computed under ``torch.no_grad``), ``(B, feat_dim)``
features, ``ctx.init_error = 0.3`` and ``ctx.train_batches`` yielding two batches; what it does not
declare it does not get (a method that reads undeclared inputs fails here).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from kdtune.errors import ConfigError
from kdtune.losses import METHODS, HParam, MethodContext, StepOutputs

# enough classes for every published default (DiSK's top-K uses K = 20)
NUM_CLASSES = 24
IN_DIM = 8
BATCH = 64


class TinyNet(nn.Module):
    """An MLP with the model-zoo contract: ``forward(x, return_features=False)`` and ``feat_dim``."""

    def __init__(self, hidden: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(IN_DIM, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, NUM_CLASSES)
        self.feat_dim = hidden
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(max(p.shape[-1], 1))))

    def forward(self, x, return_features: bool = False):
        f = self.body(x)
        logits = self.fc(f)
        return (logits, f) if return_features else logits


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, IN_DIM, generator=gen)
    rule = torch.randn(IN_DIM, NUM_CLASSES, generator=gen)
    y = (x @ rule).argmax(dim=1)
    return x, y


@pytest.fixture(scope="module")
def teacher():
    """A teacher fitted to the labels (so its soft labels carry information), then frozen in eval mode."""
    torch.manual_seed(0)
    net = TinyNet(hidden=32, seed=1)
    x, y = _data()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.grad = None
        p.requires_grad_(False)
    return net


def _is_stage(cls) -> bool:
    return cls.needs_student_stages or cls.needs_teacher_stages


@pytest.fixture(scope="module")
def stage_teacher():
    """For the stage methods (AT, SP, VID, FitNet, ...): a zoo resnet20 on 1 x 8 x 8 images, frozen in eval mode;
    the labels of the stage harness are its own predictions."""
    from kdtune.models import create_model

    torch.manual_seed(11)
    net = create_model("resnet20", NUM_CLASSES, 1).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# crd: the harness's 64 samples are its whole training split, too few for the published 16384 negatives
CASES = [(name, {"nce_k": 16} if name == "crd" else {}) for name in METHODS.names()]
if "ipwd" in METHODS:
    CASES.append(("ipwd", {"weighting": "class"}))
if "dist" in METHODS:
    CASES.append(("dist", {"tau_sq": False}))
if "reviewkd" in METHODS:  # its official warm-up factor is 0 in epoch 0, the harness's epoch: ramp off here
    CASES = [(n, {"warmup": 0.0} if n == "reviewkd" else ov) for n, ov in CASES]
IDS = [name + "".join(f"-{k}={v}" for k, v in ov.items()) for name, ov in CASES]


class Harness:
    """Builds a method like the engine does and runs its steps."""

    def __init__(self, name: str, overrides: dict, teacher: nn.Module, student_seed: int = 2, stage_teacher=None):
        self.cls = METHODS.get(name)
        self.hp = self.cls.resolve(overrides)
        self.teacher = teacher
        self.stages = _is_stage(self.cls)
        if self.stages:  # stage maps need zoo models: a resnet8 student of the resnet20 teacher, on images
            from kdtune.models import create_model

            self.teacher = stage_teacher
            torch.manual_seed(student_seed)
            self.student = create_model("resnet8", NUM_CLASSES, 1)
            gen = torch.Generator().manual_seed(0)
            self.x = torch.randn(BATCH, 1, 8, 8, generator=gen)
            with torch.no_grad():
                self.y = self.teacher(self.x).argmax(1)
        else:
            self.student = TinyNet(hidden=16, seed=student_seed)
            self.x, self.y = _data()
        self.ctx = self.make_ctx()
        torch.manual_seed(3)
        self.method = self.cls(self.hp, self.ctx)
        self.modules = self.method.trainable_modules()
        self.method.setup()
        self.method.on_epoch_start(0)

    def make_ctx(self) -> MethodContext:
        x, y = self.x, self.y

        def train_batches():
            yield x[: BATCH // 2], y[: BATCH // 2]
            yield x[BATCH // 2 :], y[BATCH // 2 :]

        shapes = {}
        if self.stages:
            from kdtune.losses.base import probe_stage_shapes

            shapes = {"student_stages": probe_stage_shapes(self.student, 1, 8, torch.device("cpu")),
                      "teacher_stages": probe_stage_shapes(self.teacher, 1, 8, torch.device("cpu"))}  # fmt: skip
        if self.cls.needs_indices:  # the harness's batch is the whole training split (CRD)
            shapes.update(num_train=BATCH, train_targets=y)
        if self.cls.needs_teacher_heads:  # HSAKD: the teacher's rotation heads, frozen, as the engine loads them
            from kdtune.models.aux_heads import build_aux_heads

            heads = build_aux_heads(self.teacher, NUM_CLASSES).eval().requires_grad_(False)
            shapes["extra"] = {"teacher_heads": heads}
        return MethodContext(
            num_classes=NUM_CLASSES,
            epochs=3,
            steps_per_epoch=2,
            device=torch.device("cpu"),
            student=self.student,
            teacher=self.teacher if self.cls.needs_teacher else None,
            student_feat_dim=self.student.feat_dim,
            teacher_feat_dim=self.teacher.feat_dim,
            train_batches=train_batches,
            init_error=0.3,
            **shapes,
        )

    def params(self) -> list[nn.Parameter]:
        ps = list(self.student.parameters())
        for m in self.modules.values():
            ps += list(m.parameters())
        return ps

    def step_terms(self, method=None, epoch: int = 0, step: int = 0, autocast: bool = False):
        method = method or self.method
        cls = self.cls
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else _null()
        t_stages = s_stages = None
        with ctx:
            t_logits = t_feat = None
            if self.stages:
                with torch.no_grad():
                    t_logits, t_stages = self.teacher.forward_stages(self.x)
                t_logits, t_feat = t_logits.float(), t_stages.pooled.float()
                s_logits, s_stages = self.student.forward_stages(self.x)
                s_feat = s_stages.pooled
            else:
                if cls.needs_teacher or cls.needs_teacher_features:
                    with torch.no_grad():
                        t_logits, t_feat = self.teacher(self.x, return_features=True)
                    t_logits = t_logits.float() if cls.needs_teacher else None
                    t_feat = t_feat if cls.needs_teacher_features else None
                s_logits, s_feat = self.student(self.x, return_features=True)
        out = StepOutputs(
            student_logits=s_logits.float(),
            targets=self.y,
            epoch=epoch,
            step=step,
            teacher_logits=t_logits,
            student_features=s_feat if cls.needs_student_features else None,
            teacher_features=t_feat,
            images=self.x,
            student_stages=s_stages if cls.needs_student_stages else None,
            teacher_stages=t_stages if cls.needs_teacher_stages else None,
            indices=torch.arange(BATCH) if cls.needs_indices else None,
        )
        return method.losses(out)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _total(terms: dict) -> torch.Tensor:
    return sum(terms.values())


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_defaults_resolve_and_are_documented(name, overrides):
    cls = METHODS.get(name)
    assert cls.name == name and cls.summary
    hp = cls.resolve(overrides)
    assert set(hp) == set(cls.hparams)
    for key, h in cls.hparams.items():
        assert isinstance(h, HParam) and h.doc, f"{name}.{key} has no doc"
        assert h.check(key, h.default, name) == h.default
    with pytest.raises(ConfigError, match="no hyperparameter"):
        cls.resolve({"surely_not_a_field": 1})


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_finite_scalar_loss(name, overrides, teacher, stage_teacher):
    h = Harness(name, overrides, teacher, stage_teacher=stage_teacher)
    terms = h.step_terms()
    assert isinstance(terms, dict) and terms, f"{name} returned no loss terms"
    for key, value in terms.items():
        assert isinstance(key, str) and key
        assert torch.is_tensor(value) and value.dim() == 0, f"{name}.{key} is not a scalar tensor"
        assert value.dtype == torch.float32, f"{name}.{key} is {value.dtype}"
        assert torch.isfinite(value), f"{name}.{key} = {value}"


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_gradients_reach_only_student_and_trainable_modules(name, overrides, teacher, stage_teacher):
    h = Harness(name, overrides, teacher, stage_teacher=stage_teacher)
    teacher = h.teacher
    terms = h.step_terms()
    # modules the method keeps for itself (e.g. a guide with its own optimiser) must not be touched by the
    # engine's backward of the returned terms
    own = {
        id(p): (p, None if p.grad is None else p.grad.clone())
        for attr in vars(h.method).values()
        if isinstance(attr, nn.Module) and attr not in h.modules.values()
        for p in attr.parameters()
        if all(p is not q for q in h.params()) and all(p is not q for q in teacher.parameters())
    }
    for p in h.params():
        p.grad = None
    _total(terms).backward()
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
    student_grads = [p.grad for p in h.student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads), "no gradient reached the student"
    assert all(torch.isfinite(g).all() for g in student_grads)
    for key, module in h.modules.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"trainable module {key!r} got no gradient"
    for p, before in own.values():
        if before is None:
            assert p.grad is None, f"{name}: the returned loss back-propagates into the method's own module"
        else:
            torch.testing.assert_close(p.grad, before)


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_state_round_trip(name, overrides, teacher, stage_teacher):
    h = Harness(name, overrides, teacher, stage_teacher=stage_teacher)
    opt = torch.optim.SGD(h.params(), lr=0.01)
    epoch = 1
    h.method.on_epoch_start(epoch)
    for step in range(3):  # move the state (EMA statistics, schedules, own optimisers) away from its start
        opt.zero_grad()
        _total(h.step_terms(epoch=epoch, step=step)).backward()
        opt.step()
    # checkpoint as the engine does: modules of trainable_modules() and the method's own state, through bytes
    buf = io.BytesIO()
    torch.save(
        {"modules": {k: m.state_dict() for k, m in h.modules.items()}, "method": h.method.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # as the engine loads training state

    torch.manual_seed(123)  # a different initialisation of the fresh instance's modules
    fresh = h.cls(h.hp, h.ctx)
    fresh_modules = fresh.trainable_modules()
    assert set(fresh_modules) == set(h.modules)
    for k, m in fresh_modules.items():
        m.load_state_dict(ckpt["modules"][k])
    fresh.load_state_dict(copy.deepcopy(ckpt["method"]))
    fresh.on_epoch_start(epoch)

    torch.manual_seed(7)
    expected = h.step_terms(epoch=epoch, step=3)
    torch.manual_seed(7)
    got = h.step_terms(method=fresh, epoch=epoch, step=3)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=f"{name}.{k} differs")


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_tiny_training_run_lowers_the_loss(name, overrides, teacher, stage_teacher):
    h = Harness(name, overrides, teacher, stage_teacher=stage_teacher)
    opt = torch.optim.SGD(h.params(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(30):
        opt.zero_grad()
        total = _total(h.step_terms(epoch=0, step=step))
        total.backward()
        opt.step()
        losses.append(total.item())
    assert all(math.isfinite(v) for v in losses)
    final = _total(h.step_terms(epoch=0, step=30)).item()
    assert final < losses[0], f"{name}: loss {losses[0]:.4g} -> {final:.4g} after 30 steps"


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_bf16_autocast_finite(name, overrides, teacher, stage_teacher):
    h = Harness(name, overrides, teacher, stage_teacher=stage_teacher)
    terms = h.step_terms(autocast=True)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in terms.values())
    _total(terms).backward()
    assert all(torch.isfinite(p.grad).all() for p in h.student.parameters() if p.grad is not None)


def _invalid_values(h: HParam) -> list:
    if h.choices is not None:
        return ["surely-not-a-choice"]
    if h.type is bool:
        return ["maybe"]
    bad: list = ["not-a-number"] if h.type in (int, float) else []
    if h.low is not None:
        bad.append(h.low if h.low_open else h.low - 1)
    if h.high is not None:
        bad.append(h.high if h.high_open else h.high + 1)
    if h.type is int:
        bad.append(1.5)
    return bad


@pytest.mark.parametrize("name", METHODS.names())
def test_out_of_range_hyperparameters_name_the_field(name):
    cls = METHODS.get(name)
    for key, h in cls.hparams.items():
        for bad in _invalid_values(h):
            with pytest.raises(ConfigError, match=rf"{name}\.{key}\b"):
                cls.resolve({key: bad})


@pytest.mark.parametrize(
    "name,field,value",
    [("kd", "T", -1), ("dkd", "T", -1), ("dist", "tau", 0), ("ttm", "gamma", 1.5), ("wttm", "gamma", 0.0)],
)
def test_published_examples_of_nonsense_are_refused(name, field, value):
    if name not in METHODS:
        pytest.skip(f"{name} not registered")
    with pytest.raises(ConfigError, match=rf"{name}\.{field}"):
        METHODS.get(name).resolve({field: value})
