"""CRD (Tian et al., ICLR 2020, as RepDistiller computes it): golden values against an independent float64
derivation, the contrastive indices (other classes only, no duplicates, the positive first, reproducible
from (seed, epoch, step), uniform), the normaliser Z frozen after the first batch, the memory update, where
the gradients go, the state round trip, the refusals (nce_k larger than the data allows, a fused bundle, a
data set whose loader gives no index), and end to end: digits runs with a bit-identical resume, and the
generated CIFAR-100 for two CRD pairs.

The float64 references below are written from the formula (Python loops with ``math`` for the loss, the scores
and the memory update; the gradients from float64 autograd of the gathered-rows form the official code uses),
not from the code under test. The cross-check against RepDistiller's own ``CRDLoss`` / ``ContrastMemory``
(same tensors, same weights, same indices) was run outside the test suite (it needs RepDistiller's files); its
figures are in the report of the change that added CRD.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.errors import ConfigError
from kdtune.losses import METHODS, MethodContext, StepOutputs
from kdtune.losses.crd import contrast_indices, nce_loss

T, EPS = 0.07, 1e-7


# ----------------------------------------------------------------------------- float64 references
def dot(a, b) -> float:
    return math.fsum(x * y for x, y in zip(a, b))


def embed64(linear: torch.nn.Linear, h: torch.Tensor) -> list[list[float]]:
    """``normalize(W h + b)`` row by row, no eps."""
    w, b = linear.weight.double().tolist(), linear.bias.double().tolist()
    out = []
    for row in h.double().tolist():
        v = [dot(wr, row) + bb for wr, bb in zip(w, b)]
        n = math.sqrt(math.fsum(a * a for a in v))
        out.append([a / n for a in v])
    return out


def scores64(anchors, memory, rows) -> list[list[float]]:
    """exp(memory[J_ik] . anchor_i / T), unnormalised."""
    return [[math.exp(dot(memory[j], a) / T) for j in js] for a, js in zip(anchors, rows)]


def nce64(x, n_data: int) -> float:
    """eq. 18 as ContrastLoss, c = K / N: -(1/B) [sum log(x0/(x0 + c + eps)) + sum log(c/(xk + c + eps))]"""
    k = len(x[0]) - 1
    c = k / n_data
    total = math.fsum(
        math.log(r[0] / (r[0] + c + EPS)) + math.fsum(math.log(c / (v + c + EPS)) for v in r[1:]) for r in x
    )
    return -total / len(x)


def update64(memory, index, z, m: float):
    """memory[i] <- normalize(m memory[i] + (1 - m) z_i) at the samples' own indices (a new list)."""
    new = [list(r) for r in memory]
    for i, zi in zip(index, z):
        v = [m * a + (1 - m) * b for a, b in zip(memory[i], zi)]
        n = math.sqrt(math.fsum(a * a for a in v))
        new[i] = [a / n for a in v]
    return new


def grads64(head, h_s, h_t, mem_s, mem_t, rows, zs, n_data):
    """d(L_s + L_t)/d(h_s, W_s, W_t) in float64 autograd, the official gathered-rows form: W = memory[J]
    (B, K+1, D), scores = exp(bmm(W, z) / T) / Z, then ContrastLoss."""
    ws = head.embed_s.linear.weight.detach().double().requires_grad_()
    bs = head.embed_s.linear.bias.detach().double()
    wt = head.embed_t.linear.weight.detach().double().requires_grad_()
    bt = head.embed_t.linear.bias.detach().double()
    hs = h_s.detach().double().requires_grad_()
    j = torch.tensor(rows)

    def side(z, memory, big_z):
        w = torch.tensor(memory, dtype=torch.float64)[j]
        x = torch.exp(torch.einsum("bkd,bd->bk", w, z) / T) / big_z
        c = (x.shape[1] - 1) / n_data
        pos, neg = torch.log(x[:, 0] / (x[:, 0] + c + EPS)), torch.log(c / (x[:, 1:] + c + EPS))
        return -(pos.sum() + neg.sum()) / len(x)

    def emb(h, w, b):
        e = h @ w.t() + b
        return e / e.pow(2).sum(1, keepdim=True).sqrt()

    loss = side(emb(hs, ws, bs), mem_t, zs[0]) + side(emb(h_t.double(), wt, bt), mem_s, zs[1])
    loss.backward()
    return hs.grad, ws.grad, wt.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ----------------------------------------------------------------------------- a method on synthetic data
def make(n=40, classes=4, d_s=6, d_t=7, seed=0, torch_seed=1, labels=None, **hp):
    cls = METHODS.get("crd")
    y = labels if labels is not None else torch.arange(n) % classes
    ctx = MethodContext(num_classes=classes, epochs=2, steps_per_epoch=3, device=torch.device("cpu"),
                        student=torch.nn.Identity(), teacher=torch.nn.Identity(), student_feat_dim=d_s,
                        teacher_feat_dim=d_t, num_train=len(y), train_targets=y, seed=seed)  # fmt: skip
    torch.manual_seed(torch_seed)
    return cls(cls.resolve(hp), ctx)


def batch(m, index, seed: int, epoch: int = 0, step: int = 0, grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    b, d_s, d_t = len(index), m.head.embed_s.linear.in_features, m.head.embed_t.linear.in_features
    h_s = (torch.randn(b, d_s, generator=g) * 2).relu().requires_grad_(grad)
    h_t = (torch.randn(b, d_t, generator=g) * 2).relu()
    logits = torch.randn(b, m.ctx.num_classes, generator=g).requires_grad_(grad)
    index = torch.as_tensor(index)
    return StepOutputs(student_logits=logits, targets=m.labels[index], epoch=epoch, step=step,
                       student_features=h_s, teacher_features=h_t, indices=index)  # fmt: skip


# ----------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_golden_two_steps_against_float64(mode):
    """Two steps (Z set by the first, frozen in the second; the second sees the memory the first wrote): the
    weighted term, the CE term, Z, the updated banks and the gradients against the float64 derivation."""
    n, k, dim = 40, 12, 8
    m = make(n=n, embed_dim=dim, nce_k=k, mode=mode, beta=0.8, w_ce=0.5)
    head = m.head
    mem_s, mem_t = head.memory_s.double().tolist(), head.memory_t.double().tolist()
    zs = None
    for step, index in enumerate(([3, 17, 22, 8, 31], [0, 9, 14, 27, 39])):
        out = batch(m, index, seed=10 + step, step=step)
        rows = contrast_indices(out.indices, m.labels, k, m.generator(0, step), mode).tolist()
        z_s = embed64(head.embed_s.linear, out.student_features)
        z_t = embed64(head.embed_t.linear, out.teacher_features)
        xs, xt = scores64(z_s, mem_t, rows), scores64(z_t, mem_s, rows)
        if zs is None:  # the first batch sets Z = N mean(exp(...)) over all B (K+1) entries
            zs = tuple(n * math.fsum(map(math.fsum, x)) / (len(x) * (k + 1)) for x in (xs, xt))
        ref = nce64([[v / zs[0] for v in r] for r in xs], n) + nce64([[v / zs[1] for v in r] for r in xt], n)
        g_ref = grads64(head, out.student_features, out.teacher_features, mem_s, mem_t, rows, zs, n)
        for p in head.parameters():
            p.grad = None
        terms = m.losses(out)
        assert set(terms) == {"crd", "ce"}
        assert all(v.dtype == torch.float32 and v.dim() == 0 for v in terms.values())
        assert terms["crd"].item() == pytest.approx(0.8 * ref, rel=2e-6, abs=0)
        ce = F.cross_entropy(out.student_logits.double(), out.targets).item()
        assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-6)
        assert head.z.tolist() == pytest.approx(list(zs), rel=1e-6)
        (terms["crd"] / 0.8).backward()
        assert rel(out.student_features.grad, g_ref[0]) < 1e-5
        assert rel(head.embed_s.linear.weight.grad, g_ref[1]) < 1e-5
        assert rel(head.embed_t.linear.weight.grad, g_ref[2]) < 1e-5
        # the update: own indices (also in relax mode), from the banks before the step
        mem_s, mem_t = update64(mem_s, index, z_s, 0.5), update64(mem_t, index, z_t, 0.5)
        for bank, ref_bank in ((head.memory_s, mem_s), (head.memory_t, mem_t)):
            ref64 = torch.tensor(ref_bank, dtype=torch.float64)
            torch.testing.assert_close(bank.double(), ref64, rtol=0, atol=2e-7)


def test_nce_loss_golden_and_extremes():
    """ContrastLoss on given scores: ordinary values, a tiny positive (log of ~1e-30) and huge negatives."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 9, generator=g) * 3
    x[0, 0], x[1, 3], x[2, 0] = 1e-30, 1e6, 5e5
    got = nce_loss(x, 100)
    assert got.dim() == 0 and got.item() == pytest.approx(nce64(x.double().tolist(), 100), rel=1e-6)


def test_defaults_and_declarations():
    cls = METHODS.get("crd")
    assert cls.needs_teacher and cls.needs_student_features and cls.needs_teacher_features
    assert cls.needs_indices
    assert not cls.needs_student_stages and "index" in cls.unfusable
    assert cls.resolve() == {"beta": 0.8, "embed_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5,
                             "mode": "exact", "w_ce": 1.0}  # fmt: skip
    for field, bad in (("mode", "fuzzy"), ("nce_t", 0.0), ("nce_m", 1.5), ("nce_k", 0), ("beta", -1.0)):
        with pytest.raises(ConfigError, match=rf"crd\.{field}"):
            cls.resolve({field: bad})


def test_refusals_at_construction():
    y = torch.tensor([0] * 30 + [1] * 8 + [2] * 2)  # class 0 leaves only 10 samples of other classes
    with pytest.raises(ConfigError) as e:
        make(labels=y, nce_k=11)
    msg = str(e.value)
    assert "crd.nce_k=11" in msg and "40 samples" in msg and "only 10" in msg and "\n" not in msg
    assert make(labels=y, nce_k=10).head.memory_s.shape == (40, 128)
    ctx = MethodContext(num_classes=3, epochs=1, steps_per_epoch=1, device=torch.device("cpu"),
                        student=torch.nn.Identity(), student_feat_dim=4, teacher_feat_dim=4)  # fmt: skip
    with pytest.raises(ConfigError, match="num_train"):
        METHODS.get("crd")(METHODS.get("crd").resolve({"nce_k": 2}), ctx)


# ----------------------------------------------------------------------------- contrastive indices
def test_contrast_indices_properties_and_reproducibility():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 5, (300,), generator=g)
    index = torch.randperm(300, generator=g)[:32]
    k = int(300 - torch.bincount(y).max())  # as many as the largest class allows: every other-class sample
    for mode in ("exact", "relax"):
        m = make(labels=y, nce_k=k, mode=mode, seed=4)
        j = contrast_indices(index, y, k, m.generator(1, 2), mode)
        assert j.shape == (32, k + 1) and j.dtype == torch.int64
        assert j.min() >= 0 and j.max() < 300
        if mode == "exact":
            assert torch.equal(j[:, 0], index)
        assert torch.equal(y[j[:, 0]], y[index])  # the positive is of the sample's class
        assert (y[j[:, 1:]] != y[index][:, None]).all()  # negatives: other classes only
        assert all(len(set(r)) == k + 1 for r in j.tolist())  # no duplicates
        assert torch.equal(j, contrast_indices(index, y, k, m.generator(1, 2), mode))  # (seed, epoch, step)
        assert not torch.equal(j, contrast_indices(index, y, k, m.generator(1, 3), mode))
        other = make(labels=y, nce_k=k, mode=mode, seed=5)
        assert not torch.equal(j, contrast_indices(index, y, k, other.generator(1, 2), mode))


def test_contrast_indices_are_uniform():
    """One sample drawn 2000 times: each of the 50 other-class samples is a negative in K/50 of the rows,
    each of the 10 same-class samples (itself included) the relax positive in 1/10."""
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    index = torch.full((2000,), 4)
    j = contrast_indices(index, y, 25, torch.Generator().manual_seed(0), "relax")
    freq = torch.bincount(j[:, 1:].flatten(), minlength=60).double() / 2000
    assert (freq[:10] == 0).all() and ((freq[10:] - 0.5).abs() < 0.06).all()  # 5.4 sigma
    pos = torch.bincount(j[:, 0], minlength=60).double() / 2000
    assert pos[10:].sum() == 0 and ((pos[:10] - 0.1).abs() < 0.035).all()  # 5.2 sigma


def test_the_method_draws_from_its_generator_not_the_global_rng():
    m = make(nce_k=12)
    state = torch.get_rng_state()
    m.losses(batch(m, [1, 2, 3], seed=0))
    assert torch.equal(torch.get_rng_state(), state)
    # building it draws from the global RNG only its two Linear layers, as RepDistiller's Embeds
    torch.manual_seed(1)
    torch.nn.Linear(6, 128), torch.nn.Linear(7, 128)
    expected = torch.get_rng_state()
    make(nce_k=12, torch_seed=1)
    assert torch.equal(torch.get_rng_state(), expected)
    # the banks: U(-s, s), s = 1/sqrt(128/3), from the run seed (same seed, same banks; another, other banks)
    s = 1 / math.sqrt(128 / 3)
    bank = make(nce_k=12).head.memory_s
    assert bank.abs().max() <= s and bank.abs().max() > 0.99 * s and abs(bank.mean()) < 0.01
    assert torch.equal(make(nce_k=12, torch_seed=9).head.memory_s, bank)
    assert not torch.equal(make(nce_k=12, seed=1).head.memory_s, bank)


# ----------------------------------------------------------------------------- state, gradients, Z
def test_z_frozen_memory_update_and_gradients():
    m = make(nce_k=12)
    head = m.head
    assert head.z.tolist() == [-1.0, -1.0]
    out = batch(m, [5, 6, 7], seed=1)
    out.teacher_features.requires_grad_()  # to see that none reaches it (RepDistiller detaches f_t)
    before_s, before_t = head.memory_s.clone(), head.memory_t.clone()
    terms = m.losses(out)
    z = head.z.clone()
    assert (z > 0).all()
    # only the batch's rows changed, to unit rows
    for bank, before in ((head.memory_s, before_s), (head.memory_t, before_t)):
        assert (bank != before).any(1).nonzero().flatten().tolist() == [5, 6, 7]
    torch.testing.assert_close(head.memory_s[[5, 6, 7]].norm(dim=1), torch.ones(3))
    sum(terms.values()).backward()
    assert out.student_features.grad.abs().sum() > 0 and out.student_logits.grad.abs().sum() > 0
    assert out.teacher_features.grad is None
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n for n, _ in head.named_buffers()} == {"memory_s", "memory_t", "z"}
    assert not any(b.requires_grad for b in head.buffers())
    assert not any(b.grad_fn is not None for b in head.buffers())  # the memory is a constant of the graph
    # Z stays what the first batch set, whatever the memory and the embeddings do later
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for step in range(1, 4):
        opt.step()
        m.losses(batch(m, [step, 20 + step], seed=step, step=step))
        assert torch.equal(head.z, z)


def test_state_round_trip_is_bit_identical():
    """Checkpointed as the engine does (the module of trainable_modules(), through bytes), a fresh
    instance built under another global seed continues exactly as the original."""
    m = make(nce_k=12, mode="relax")
    opt = torch.optim.SGD(m.head.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        opt.zero_grad()
        terms = m.losses(batch(m, [step, step + 10, step + 20], seed=step, epoch=1, step=step))
        sum(terms.values()).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"modules": {k: v.state_dict() for k, v in m.trainable_modules().items()},
                "method": m.state_dict()}, buf)  # fmt: skip
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert set(ckpt["modules"]["crd"]) >= {"memory_s", "memory_t", "z", "embed_s.linear.weight"}
    fresh = make(nce_k=12, mode="relax", torch_seed=123)
    fresh.trainable_modules()["crd"].load_state_dict(ckpt["modules"]["crd"])
    fresh.load_state_dict(ckpt["method"])
    a = m.losses(batch(m, [30, 31], seed=9, epoch=1, step=3))
    b = fresh.losses(batch(fresh, [30, 31], seed=9, epoch=1, step=3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k, v in m.head.state_dict().items():
        assert torch.equal(v, fresh.head.state_dict()[k]), k


def test_bf16_autocast_gives_the_fp32_numbers():
    a, b = make(nce_k=12), make(nce_k=12)
    ref = a.losses(batch(a, [1, 2], seed=0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = b.losses(batch(b, [1, 2], seed=0))
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]) for k in ref)


def test_default_k_on_a_cifar_sized_split():
    """The published configuration (K = 16384, 128-d, T 0.07) on a 20,000-sample split of 100 classes, B = 64:
    indices as promised, Z near its expectation N E[exp(m.z / T)] for random unit-ish rows, a finite loss."""
    y = torch.arange(20_000) % 100
    m = make(labels=y, classes=100, d_s=256, d_t=256)
    index = torch.randperm(20_000, generator=torch.Generator().manual_seed(0))[:64]
    j = contrast_indices(index, y, 16384, m.generator(0, 0))
    assert (y[j[:, 1:]] != y[index][:, None]).all() and all(len(set(r)) == 16385 for r in j.tolist())
    terms = m.losses(batch(m, index, seed=0))
    assert torch.isfinite(terms["crd"]) and 0 < terms["crd"].item() / 0.8 < 50
    # E[exp(u.z/T)] over rows u ~ U(-s, s)^128: prod_d sinh(s z_d/T)/(s z_d/T), with ||z|| = 1
    z_s = m.head.embed_s(batch(m, index, seed=0).student_features)
    s = 1 / math.sqrt(128 / 3)
    a = (s * z_s.double() / T).abs().clamp_min(1e-12)  # sinh(a)/a is even
    expect = 20_000 * torch.exp(torch.log(torch.sinh(a) / a).sum(1)).mean().item()
    assert m.head.z[0].item() == pytest.approx(expect, rel=0.05)


# ----------------------------------------------------------------------------- refusals: fusing, no index
def test_fusing_is_refused_in_one_line(tmp_path):
    """A sweep asking for fused trials of crd is refused when it is planned, and a bundle of crd configs
    when it is built, each in one line saying why (no sample index in a bundle's training pass)."""
    from kdtune.config import TrainConfig
    from kdtune.engine.bundle import check_bundle
    from kdtune.spec import load_spec
    from kdtune.tune.plan import plan

    spec = {"name": "f", "data": "digits", "teacher": {"model": "resnet8", "train": {"epochs": 1}},
            "students": ["resnet8"], "methods": {"crd": {"trials": 2}},
            "budget": {"trials": 2, "epochs": 1, "fuse": 2}, "train": {"device": "cpu"},
            "storage": str(tmp_path / "runs")}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        plan(load_spec(spec))
    assert "budget.fuse=2 cannot fuse method crd: it reads each sample's index" in str(e.value)
    assert "\n" not in str(e.value)
    spec["budget"]["fuse"] = "auto"  # auto: one trial per slot
    assert plan(load_spec(spec)).groups[0].fuse == 1
    cfgs = [TrainConfig.from_dict(dict(data="digits", model="resnet8", teacher="t.pt", method="crd", lr=lr))
            for lr in (0.05, 0.02)]  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check_bundle(cfgs)
    assert "method=crd cannot be fused into a bundle: it reads each sample's index" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_data_set_without_indices_is_refused_in_one_line(tmp_path, capsys):
    """ImageNet is read by the folder loader, which gives no index: `kdtune train` exits 2, in one line."""
    from kdtune.cli import main
    from kdtune.models import create_model
    from kdtune.models.checkpoint import save_model
    from tests.datagen import write_image_folder

    write_image_folder(tmp_path / "imagenet", classes=3, per_class=2, size=32, layout="imagefolder",
                       val_per_class=1)  # fmt: skip
    teacher = tmp_path / "t.pt"
    save_model(teacher, create_model("resnet8", 3, 3), "resnet8", 3, 3, {})
    rc = main(["train", "data=imagenet", f"data_root={tmp_path}", "model=resnet8", f"teacher={teacher}",
               "method=crd", "nce_k=2", "epochs=1", "device=cpu", "batch_size=2", "val_fraction=0",
               "num_workers=0", "--quiet"])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert "method=crd needs each sample's index" in lines[0] and "'imagenet'" in lines[0]


# ----------------------------------------------------------------------------- end to end (CPU)
# digits' training split (1,295 samples, val_fraction 0.1) leaves over 1,100 of other classes: K = 1024 there
RUN = dict(data="digits", model="resnet8", method="crd", device="cpu", batch_size=128, seed=3, nce_k=1024)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from kdtune import train

    out = tmp_path_factory.mktemp("crd_teacher") / "resnet20"
    train(dict(data="digits", model="resnet20", method="ce", epochs=1, device="cpu", batch_size=128,
               out=str(out)))  # fmt: skip
    return out


def test_crd_trains_end_to_end(tmp_path, teacher_dir):
    from kdtune import train

    out = tmp_path / "crd"
    result = train(dict(RUN, teacher=str(teacher_dir), epochs=1, out=str(out)))
    assert result["epochs"] == 1 and 0 <= result["test_acc"] <= 100
    line = (out / "train.log").read_text().splitlines()[0]
    assert "crd " in line and "ce " in line  # both terms logged under their names
    mods = torch.load(out / "state.pt", weights_only=True)["method_modules"]
    from kdtune.data import load_data

    n = len(load_data("digits").train)  # 1,295
    assert mods["crd.memory_s"].shape == (n, 128) and mods["crd.memory_t"].shape == (n, 128)
    assert (mods["crd.z"] > 0).all()  # set by the first batch, saved
    # the samples of the epoch's 10 batches of 128 (1,280; the last partial batch is dropped): unit rows now
    norms = mods["crd.memory_s"].norm(dim=1)
    assert int(((norms - 1).abs() < 1e-5).sum()) >= 1280


def test_crd_resume_is_bit_identical(tmp_path, teacher_dir):
    """Stopped after epoch 1 and resumed: the student AND CRD's embeddings, banks and Z equal a lone run."""
    from tests.resume_check import stopped_and_resumed

    ma, mb, logs = stopped_and_resumed(dict(RUN, teacher=str(teacher_dir), epochs=2, mode="relax"), tmp_path)
    assert ma.keys() == mb.keys() and {"crd.memory_s", "crd.memory_t", "crd.z"} <= set(ma)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert logs[0] == logs[1]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    from kdtune.data import load_data
    from tests.datagen import write_tiny_cifar100

    root = tmp_path_factory.mktemp("cifar")
    write_tiny_cifar100(root, n_train=32, n_test=16)
    return load_data("cifar100", root=root, val_fraction=0.0)


@pytest.mark.parametrize("teacher_arch,student", [("wrn_40_2", "wrn_16_2"), ("resnet32x4", "shufflev1")])
def test_crd_trains_on_generated_cifar100(teacher_arch, student, cifar, tmp_path):
    from kdtune.config import TrainConfig
    from kdtune.engine import Trainer
    from kdtune.models import create_model
    from kdtune.models.checkpoint import save_model

    torch.manual_seed(0)
    path = tmp_path / f"{teacher_arch}.pt"
    save_model(path, create_model(teacher_arch, 100, 3), teacher_arch, 100, 3, {})
    cfg = TrainConfig.from_dict(dict(data="cifar100", model=student, teacher=str(path), method="crd",
                                     nce_k=16, epochs=1, batch_size=16, eval_batch_size=16, device="cpu",
                                     val_fraction=0.0, lr=0.01))  # fmt: skip
    t = Trainer(cfg, data=cifar, teacher_info={"arch": teacher_arch, "test_acc": 1.0})
    head = t.method.head
    d_s = {"wrn_16_2": 128, "shufflev1": 960}[student]  # the pooled widths (FEATURE_METHODS.md section 1)
    d_t = {"wrn_40_2": 128, "resnet32x4": 256}[teacher_arch]
    assert head.embed_s.linear.in_features == d_s and head.embed_t.linear.in_features == d_t
    assert head.memory_s.shape == (32, 128)
    h = list(t.run())[-1]
    assert torch.isfinite(torch.tensor(h["loss_crd"])) and torch.isfinite(torch.tensor(h["loss_ce"])), h
    assert (head.z > 0).all()
