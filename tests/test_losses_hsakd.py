"""HSAKD (Yang et al., IJCAI 2021, frozen-teacher variant, as winycg/HSAKD computes it): the auxiliary branches
per family, the four-rotation batch and its joint labels (golden), the loss against an independent float64
derivation of the official formula, where gradients go, the heads stage (the teacher unchanged bit for bit, the
heads trained), the refusal of a plain teacher, `kdtune train` end to end on digits (teacher, heads, student),
a bit-identical resume, short runs on generated CIFAR-100, the sweep's cached heads stage, and the refusals by
fused bundles and the teacher store.

The float64 references are written from the formula (log-softmax by log-sum-exp over Python floats, KL as
``sum_c p_t (log p_t - log p_s)``), not from the code under test. The cross-check against the official code
itself (its ``DistillKL`` and ``Auxiliary_Classifier`` on the same tensors and weights) ran outside the suite;
its figures are in the report of the change that added HSAKD.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdtune.errors import ConfigError
from kdtune.losses import METHODS, MethodContext, StepOutputs
from kdtune.losses.base import probe_stage_shapes
from kdtune.losses.hsakd import hsakd_loss, original_labels, rotations
from kdtune.models import create_model
from kdtune.models.aux_heads import build_aux_heads, has_aux_heads, load_aux_heads

HSAKD_METHODS = ("hsakd", "hsakd_heads")


@pytest.fixture(autouse=True, scope="module")
def _method_names():
    """``kdtune.names`` repeats the method registry for the CLI's early name check; until it lists the two HSAKD
    methods, add them for this module (a no-op once it does)."""
    from kdtune import names

    listed, command = names._KINDS["method"]
    if set(HSAKD_METHODS) <= set(listed):
        yield
        return
    mp = pytest.MonkeyPatch()
    mp.setitem(names._KINDS, "method", (tuple(sorted({*listed, *HSAKD_METHODS})), command))
    yield
    mp.undo()


# ----------------------------------------------------------------------------- the auxiliary branches
FAMILIES = [  # arch, branches, the stage features they read (kind, index)
    ("resnet8", 3, [("post", 0), ("post", 1), ("post", 2)]),
    ("resnet32x4", 3, [("post", 0), ("post", 1), ("post", 2)]),
    ("wrn_16_2", 3, [("post", 0), ("post", 1), ("post", 2)]),
    ("shufflev1", 3, [("post", 0), ("post", 1), ("post", 2)]),
    ("shufflev2", 3, [("post", 0), ("post", 1), ("post", 2)]),
    ("vgg8", 4, [("stem", 0), ("post", 0), ("post", 1), ("post", 3)]),
    ("mobilenetv2", 4, [("post", 0), ("post", 1), ("post", 2), ("post", 3)]),
    (
        "resnet10_xxs",
        4,
        [("post", 0), ("post", 1), ("post", 2), ("post", 3)],
    ),  # the CIFAR-stem ResNets (resnet50)
]


@pytest.mark.parametrize("arch,branches,taps", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_branch_shapes_per_family(arch, branches, taps):
    torch.manual_seed(0)
    for size, ch in ((32, 3), (8, 1)):
        model = create_model(arch, 10, ch).eval()
        heads = build_aux_heads(model, 10).eval()
        assert has_aux_heads(model) and len(heads) == branches and list(heads.taps) == taps
        with torch.no_grad():
            _, st = model.forward_stages(torch.randn(2, ch, size, size))
            before = [x.clone() for x in heads.inputs(st)]
            out = heads(st)
        assert [tuple(o.shape) for o in out] == [(2, 40)] * branches  # 4 C joint classes
        assert all(torch.equal(a, b) for a, b in zip(before, heads.inputs(st)))  # the maps are not modified
        names = {n.split(".")[0] for n, _ in heads.named_parameters()}  # the official module names
        assert {f"block_extractor{i}" for i in range(1, branches + 1)} | {
            f"fc{i}" for i in range(1, branches + 1)
        } <= names
    # the deepest branch copies the last stage at stride 1: it keeps the resolution of the map it reads
    if arch in ("resnet8", "wrn_16_2", "shufflev1", "shufflev2", "resnet10_xxs"):
        with torch.no_grad():
            _, st = model.forward_stages(torch.randn(2, 1, 8, 8))
        last = heads.inputs(st)[-1]
        deep = getattr(heads, f"block_extractor{branches}")(last)
        assert deep.shape[-2:] == last.shape[-2:]
        assert (
            deep.shape[1] == last.shape[1] or arch == "shufflev2"
        )  # V2's branch ends in its 1x1 conv to 1024


def test_branches_are_fresh_copies_of_the_later_stages():
    """resnet20: branch 1 = stages 2 and 3 (3 blocks each), branch 2 = stage 3, branch 3 = stage 3 at stride 1,
    widths as the backbone's, weights its own; WRN adds one BN-ReLU per branch."""
    torch.manual_seed(0)
    m = create_model("resnet20", 100, 3)
    h = build_aux_heads(m, 100)
    assert [len(s) for s in h.block_extractor1] == [3, 3] and len(h.block_extractor2[0]) == 3
    assert h.block_extractor1[0][0].conv1.weight.shape == m.layer2[0].conv1.weight.shape
    assert h.block_extractor1[0][0].conv1.stride == (2, 2) and h.block_extractor3[0][0].conv1.stride == (1, 1)
    assert h.block_extractor3[0][0].downsample is None  # 64 -> 64 at stride 1: identity shortcut, as official
    assert not any(p is q for p in h.parameters() for q in m.parameters())
    assert h.fc1.weight.shape == (400, 64)
    w = build_aux_heads(create_model("wrn_40_2", 100, 3), 100)
    assert w.tail == "bn_relu" and w.bn3.num_features == 128 and len(w.block_extractor1[0].layer) == 6


def test_initialisation_as_the_official_branches():
    torch.manual_seed(0)
    h = build_aux_heads(create_model("resnet32x4", 100, 3), 100)
    convs = [m for m in h.modules() if isinstance(m, torch.nn.Conv2d)]
    for c in convs[:6]:  # N(0, sqrt(2 / (k^2 C_out)))
        want = math.sqrt(2.0 / (c.kernel_size[0] * c.kernel_size[1] * c.out_channels))
        assert c.weight.std().item() == pytest.approx(want, rel=0.05)
    bns = [m for m in h.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    assert torch.all(h.fc1.bias == 0) and h.fc1.weight.abs().max() <= 1 / math.sqrt(
        256
    )  # default weight, bias 0
    mb = build_aux_heads(create_model("mobilenetv2", 100, 3), 100)
    assert mb.fc1.weight.std().item() == pytest.approx(0.01, rel=0.05) and torch.all(mb.fc1.bias == 0)


def test_a_model_without_branches_is_refused_in_one_line():
    toy = create_model("toy_mlp_student", 3, 2)
    assert not has_aux_heads(toy)
    with pytest.raises(ConfigError) as e:
        build_aux_heads(toy, 3)
    msg = str(e.value)
    assert "\n" not in msg and "toy_mlp_student" in msg and "wrn_" in msg and "shufflev1" in msg


def test_heads_state_that_does_not_fit_is_refused():
    torch.manual_seed(0)
    heads = build_aux_heads(create_model("resnet8", 10, 1), 10)
    with pytest.raises(Exception) as e:
        load_aux_heads(create_model("resnet20", 100, 1), heads.state_dict(), 100, "t.pt")
    assert "t.pt" in str(e.value) and "\n" not in str(e.value)


def test_checkpoints_carry_the_heads_kdtune_and_official(tmp_path):
    """kdtune's file keeps the heads beside the model (a plain reader loads the model alone); an official HSAKD
    ``{"net": {"backbone.*", "auxiliary_classifier.*"}}`` checkpoint is split into the two."""
    from kdtune.models.checkpoint import load_model, save_model

    torch.manual_seed(0)
    m = create_model("resnet8", 10, 1)
    h = build_aux_heads(m, 10)
    save_model(tmp_path / "k.pt", m, "resnet8", 10, 1, {}, aux_heads=h.state_dict())
    _, info = load_model(tmp_path / "k.pt")
    assert info["aux_heads"].keys() == h.state_dict().keys()
    assert all(torch.equal(info["aux_heads"][k], v) for k, v in h.state_dict().items())
    net = {**{f"backbone.{k}": v for k, v in m.state_dict().items()},
           **{f"auxiliary_classifier.{k}": v for k, v in h.state_dict().items()}}  # fmt: skip
    torch.save({"net": net, "acc": 0.5, "epoch": 99}, tmp_path / "official.pth.tar")
    model, info = load_model(tmp_path / "official.pth.tar", arch="resnet8")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(info["aux_heads"][k], v) for k, v in h.state_dict().items())
    loaded = load_aux_heads(model, info["aux_heads"], 10, "official.pth.tar")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in h.state_dict().items())
    save_model(tmp_path / "plain.pt", m, "resnet8", 10, 1, {})
    assert load_model(tmp_path / "plain.pt")[1]["aux_heads"] is None


# ----------------------------------------------------------------------------- rotations (golden)
def test_rotations_golden():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 6.0], [7.0, 8.0]]]])  # (2, 1, 2, 2)
    y = torch.tensor([3, 7])
    x4, y4 = rotations(x, y)
    # rot90 by k quarter turns from the row axis toward the column axis: [[a, b], [c, d]] -> [[b, d], [a, c]]
    a = [[[1, 2], [3, 4]]], [[[2, 4], [1, 3]]], [[[4, 3], [2, 1]]], [[[3, 1], [4, 2]]]
    b = [[[5, 6], [7, 8]]], [[[6, 8], [5, 7]]], [[[8, 7], [6, 5]]], [[[7, 5], [8, 6]]]
    assert torch.equal(x4, torch.tensor([*a, *b], dtype=torch.float32))  # image-major: row 4 i + k
    assert y4.tolist() == [12, 13, 14, 15, 28, 29, 30, 31]  # 4 y + k
    assert original_labels(y4).tolist() == [3, 7]
    xc = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    x4c, _ = rotations(xc, y)
    assert x4c.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x4c[5], torch.rot90(xc[1], 1, (1, 2)))
    with pytest.raises(ConfigError, match="square"):
        rotations(torch.zeros(2, 1, 4, 3), y)


# ----------------------------------------------------------------------------- the loss (float64, from the formula)
def log_softmax64(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def kl_t64(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    """T^2 / N sum_n sum_c p_t (log p_t - log p_s), tempered softmaxes, over all N rows."""
    total = 0.0
    for rs, rt in zip(s.double().tolist(), t.double().tolist()):
        ls = log_softmax64([v / temp for v in rs])
        lt = log_softmax64([v / temp for v in rt])
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return temp * temp * total / s.shape[0]


def ce64(logits: torch.Tensor, labels: torch.Tensor) -> float:
    rows = logits.double().tolist()
    return -sum(log_softmax64(r)[int(c)] for r, c in zip(rows, labels.tolist())) / len(rows)


def ref64(s, t, sa, ta, y, temp):
    """The official loss: CE of the unrotated rows (0::4) + sum of branch KLs + the main-head KL, all 4B rows."""
    return ce64(s[0::4], y), sum(kl_t64(a, b, temp) for a, b in zip(sa, ta)), kl_t64(s, t, temp)


def logits(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("scale,temp", [(1.0, 3.0), (8.0, 3.0), (30.0, 1.0), (3.0, 7.5)])
def test_loss_against_float64_derivation(scale, temp):
    b, c, branches = 3, 7, 3
    s, t = logits((4 * b, c), 1, scale), logits((4 * b, c), 2, scale)
    sa = [logits((4 * b, 4 * c), 10 + i, scale) for i in range(branches)]
    ta = [logits((4 * b, 4 * c), 20 + i, scale) for i in range(branches)]
    y = torch.tensor([0, 6, 3])
    ce, aux, main = hsakd_loss(s, t, sa, ta, y, temp)
    rce, raux, rmain = ref64(s, t, sa, ta, y, temp)
    assert ce.dtype == aux.dtype == main.dtype == torch.float32
    assert ce.item() == pytest.approx(rce, rel=2e-6)
    assert aux.item() == pytest.approx(raux, rel=2e-6)
    assert main.item() == pytest.approx(rmain, rel=2e-6)


def test_loss_is_fp32_under_bf16_autocast():
    s, t = logits((8, 5), 3, 4.0).bfloat16(), logits((8, 5), 4, 4.0).bfloat16()
    sa, ta = [logits((8, 20), 5, 4.0).bfloat16()], [logits((8, 20), 6, 4.0).bfloat16()]
    y = torch.tensor([1, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, aux, main = hsakd_loss(s, t, sa, ta, y, 3.0)
    rce, raux, rmain = ref64(s.float(), t.float(), [sa[0].float()], [ta[0].float()], y, 3.0)
    assert (ce.dtype, aux.dtype, main.dtype) == (torch.float32,) * 3
    assert (ce.item(), aux.item(), main.item()) == pytest.approx((rce, raux, rmain), rel=2e-6)


# ----------------------------------------------------------------------------- the Method on zoo models
def make_student_method(overrides=None, student="resnet8", teacher="resnet20", classes=10, ch=1, size=8):
    torch.manual_seed(0)
    t = create_model(teacher, classes, ch).eval()
    t_heads = build_aux_heads(t, classes)
    s = create_model(student, classes, ch)
    for p in list(t.parameters()) + list(t_heads.parameters()):
        p.requires_grad_(False)
    cpu = torch.device("cpu")
    ctx = MethodContext(num_classes=classes, epochs=1, steps_per_epoch=1, device=cpu, student=s, teacher=t,
                        student_stages=probe_stage_shapes(s, ch, size, cpu),
                        teacher_stages=probe_stage_shapes(t, ch, size, cpu), extra={"teacher_heads": t_heads})  # fmt: skip
    cls = METHODS.get("hsakd")
    return cls(cls.resolve(overrides or {}), ctx), s, t, t_heads


def student_step(method, s, t, seed=0, b=4, ch=1, size=8, classes=10):
    g = torch.Generator().manual_seed(seed)
    x4, y4 = method.transform_batch(
        torch.randn(b, ch, size, size, generator=g), torch.randint(0, classes, (b,), generator=g)
    )
    with torch.no_grad():
        tl, tst = t.forward_stages(x4)
    sl, sst = s.forward_stages(x4)
    out = StepOutputs(student_logits=sl.float(), targets=y4, epoch=0, step=0, teacher_logits=tl.float(),
                      student_stages=sst, teacher_stages=tst)  # fmt: skip
    return method.losses(out), out


def test_method_declares_defaults_and_terms():
    cls = METHODS.get("hsakd")
    assert (
        cls.needs_teacher
        and cls.needs_student_stages
        and cls.needs_teacher_stages
        and cls.needs_teacher_heads
    )
    assert cls.resolve() == {"T": 3.0, "w_ce": 1.0, "w_aux": 1.0, "w_main": 1.0}
    m, s, t, t_heads = make_student_method({"w_ce": 0.5, "w_aux": 2.0, "w_main": 3.0, "T": 2.0})
    terms, out = student_step(m, s, t)
    assert set(terms) == {"ce", "aux_kd", "kd"}
    with torch.no_grad():
        sa = m.student_heads(out.student_stages)
        ta = t_heads(out.teacher_stages)
    rce, raux, rmain = ref64(
        out.student_logits, out.teacher_logits, sa, ta, original_labels(out.targets), 2.0
    )
    assert terms["ce"].item() == pytest.approx(0.5 * rce, rel=2e-6)
    assert terms["aux_kd"].item() == pytest.approx(2.0 * raux, rel=2e-6)
    assert terms["kd"].item() == pytest.approx(3.0 * rmain, rel=2e-6)


def test_gradients_reach_the_student_and_its_branches_never_the_teacher():
    m, s, t, t_heads = make_student_method()
    terms, _ = student_step(m, s, t)
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())  # backbone and head
    for name, p in m.trainable_modules()["aux"].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # every branch learns
    assert all(p.grad is None for p in list(t.parameters()) + list(t_heads.parameters()))
    assert not t_heads.training and not t.training


def test_branch_counts_pair_by_position():
    """A 3-branch teacher (resnet20) and a 4-branch student (vgg8): the student keeps its first three."""
    m, s, t, _ = make_student_method(student="vgg8")
    assert len(m.student_heads) == 3
    terms, _ = student_step(m, s, t)
    assert torch.isfinite(sum(terms.values()))


def test_student_method_needs_the_teacher_heads():
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    s, t = create_model("resnet8", 10, 1), create_model("resnet20", 10, 1)
    ctx = MethodContext(num_classes=10, epochs=1, steps_per_epoch=1, device=cpu, student=s, teacher=t,
                        student_stages=probe_stage_shapes(s, 1, 8, cpu), teacher_stages=probe_stage_shapes(t, 1, 8, cpu))  # fmt: skip
    with pytest.raises(ConfigError, match="hsakd_heads"):
        METHODS.get("hsakd")(METHODS.get("hsakd").resolve(), ctx)


def test_refused_by_fused_bundles():
    from kdtune.tune.fused import resolve_fuse

    for name in HSAKD_METHODS:
        cls = METHODS.get(name)
        assert cls.unfusable  # stage maps (and the rotated batch) are what a bundle cannot give
        assert resolve_fuse("auto", name, 0.0, 8) == 1
        with pytest.raises(ConfigError, match="cannot fuse"):
            resolve_fuse(4, name, 0.0, 8)


# ----------------------------------------------------------------------------- end to end on digits
DIGITS = ["data=digits", "device=cpu", "val_fraction=0.85", "eval_batch_size=512"]  # 230 training images


def cli(args, capsys):
    from kdtune.cli import main

    code = main(["train", "--quiet", "--no-progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """`kdtune train`: a resnet20 teacher (CE), its heads (hsakd_heads on the frozen teacher), a resnet8 student."""
    from kdtune.cli import main

    root = tmp_path_factory.mktemp("hsakd")
    common = [*DIGITS, "epochs=1", "batch_size=64", "--quiet", "--no-progress"]
    assert main(["train", "model=resnet20", "method=ce", f"out={root / 'teacher'}", *common]) == 0
    assert main(["train", "model=resnet20", "method=hsakd_heads", "preset=hsakd_heads", f"teacher={root / 'teacher'}",
                 f"out={root / 'heads'}", *common]) == 0  # fmt: skip
    assert main(["train", "model=resnet8", "method=hsakd", f"teacher={root / 'heads'}", f"out={root / 'student'}",
                 "seed=3", *common]) == 0  # fmt: skip
    return root


def test_heads_stage_leaves_the_teacher_bit_identical_and_trains_the_heads(chain):
    from kdtune.config import TrainConfig
    from kdtune.engine.trainer import Trainer

    teacher = torch.load(chain / "teacher" / "final.pt", weights_only=True)
    heads = torch.load(chain / "heads" / "final.pt", weights_only=True)
    assert heads["arch"] == "resnet20" and heads["state_dict"].keys() == teacher["state_dict"].keys()
    for k, v in teacher["state_dict"].items():  # weights and BN statistics
        assert torch.equal(heads["state_dict"][k], v), k
    assert heads["meta"]["hsakd_heads"]["branches"] == 3 and heads["meta"]["hsakd_heads"]["classes"] == 40
    cfg = json.loads((chain / "heads" / "result.json").read_text())["config"]
    assert cfg["nesterov"] and cfg["lr"] == 0.05 and cfg["schedule"] == "step" and cfg["batch_size"] == 64
    # the heads' starting point is what a fresh run builds; the trained ones moved away from it
    fresh = Trainer(
        TrainConfig.from_dict({**cfg, "out": None}), teacher_info={"arch": "resnet20", "test_acc": 1.0}
    )
    start = fresh.method.export_heads().state_dict()
    assert fresh.student is not None and fresh.teacher is None and not fresh.student.training
    assert all(not p.requires_grad for p in fresh.student.parameters())
    assert not any(
        p is q for g in fresh.optimizer.param_groups for p in g["params"] for q in fresh.student.parameters()
    )
    assert heads["aux_heads"].keys() == start.keys()
    moved = [
        k for k in start if start[k].is_floating_point() and not torch.equal(start[k], heads["aux_heads"][k])
    ]
    assert any(k.startswith("fc1.") for k in moved) and any(".conv1." in k for k in moved)
    line = (chain / "heads" / "train.log").read_text().splitlines()[0]
    assert "aux_ce " in line and "aux1_acc" in line


def test_student_trains_end_to_end(chain):
    result = json.loads((chain / "student" / "result.json").read_text())
    assert result["epochs"] == 1 and 0 <= result["test_acc"] <= 100
    line = (chain / "student" / "train.log").read_text().splitlines()[0]
    assert all(f"{t} " in line for t in ("ce", "aux_kd", "kd"))
    state = torch.load(chain / "student" / "state.pt", weights_only=True)
    assert any(
        k.startswith("aux.block_extractor3.") for k in state["method_modules"]
    )  # its own branches, saved
    final = torch.load(chain / "student" / "final.pt", weights_only=True)
    assert "aux_heads" not in final and final["arch"] == "resnet8"  # the student alone, as the public code


def test_plain_teacher_is_refused_in_one_line(chain, capsys):
    code, _, err = cli(["model=resnet8", "method=hsakd", f"teacher={chain / 'teacher'}", *DIGITS], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "without HSAKD auxiliary heads" in lines[0]
    assert "kdtune train method=hsakd_heads" in lines[0] and "model=resnet20" in lines[0]
    # heads on the teacher itself: model= must be the teacher's architecture; no warm start
    code, _, err = cli(
        ["model=resnet8", "method=hsakd_heads", f"teacher={chain / 'teacher'}", *DIGITS], capsys
    )
    assert code == 2 and "model=resnet20" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["model=resnet20", "method=hsakd_heads", f"teacher={chain / 'teacher'}",
                        f"init={chain / 'teacher'}", *DIGITS], capsys)  # fmt: skip
    assert code == 2 and "init=" in err


def test_teacher_store_is_never_used(chain, tmp_path, capsys):
    code, _, err = cli(["model=resnet8", "method=hsakd", f"teacher={chain / 'heads'}", "teacher_store=on",
                        f"teacher_store_dir={tmp_path}", *DIGITS], capsys)  # fmt: skip
    assert code == 2 and "teacher_store=on cannot serve method=hsakd" in err
    from kdtune.config import TrainConfig
    from kdtune.engine.trainer import Trainer

    cfg = TrainConfig.from_dict(dict(data="digits", device="cpu", model="resnet8", method="hsakd", val_fraction=0.75,
                                     teacher=str(chain / "heads"), teacher_store="auto", teacher_store_dir=str(tmp_path)))  # fmt: skip
    assert Trainer(cfg, teacher_info={"arch": "resnet20", "test_acc": 1.0}).store is None
    assert not any(tmp_path.iterdir())


def test_resume_is_bit_identical(chain, tmp_path):
    """Stopped after epoch 1 and resumed: the student and its branches end as in an uninterrupted run."""
    from tests.resume_check import stopped_and_resumed

    cfg = dict(data="digits", device="cpu", val_fraction=0.85, eval_batch_size=512, model="resnet8", method="hsakd",
               teacher=str(chain / "heads"), epochs=2, batch_size=64, seed=5, preset="hsakd")  # fmt: skip
    ma, mb, _ = stopped_and_resumed(cfg, tmp_path)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_sweep_heads_stage_is_built_once_and_keyed_by_the_teacher(chain, tmp_path):
    from kdtune.config import TrainConfig
    from kdtune.tune.stages import Stage, ensure_heads_stage, heads_stage_config, train_stage

    result = json.loads((chain / "teacher" / "result.json").read_text())
    cfg = TrainConfig.from_dict({**result["config"], "out": None}).to_dict()
    teacher = Stage("teacher", "0123456789abcdef", chain / "teacher", cfg, result, cached=True)
    trained = []

    def runner(cfg_dict, out, threads):
        trained.append(cfg_dict)
        return train_stage(cfg_dict, out, threads)

    st = ensure_heads_stage(teacher, tmp_path, epochs=1, log=lambda s: None, runner=runner)
    assert len(trained) == 1 and not st.cached and st.key.startswith(teacher.key) and st.name == "hsakd-heads"
    assert trained[0]["method"] == "hsakd_heads" and trained[0]["teacher"] == str(teacher.model_path)
    assert trained[0]["preset"] == "hsakd_heads" and trained[0]["data"] == "digits"
    saved = torch.load(st.model_path, weights_only=True)
    assert "aux_heads" in saved and st.teacher_info()["arch"] == "resnet20"
    again = ensure_heads_stage(teacher, tmp_path, epochs=1, log=lambda s: None, runner=runner)
    assert again.cached and again.dir == st.dir and len(trained) == 1
    other = Stage("teacher", "fedcba9876543210", chain / "teacher", cfg, result, cached=True)
    assert heads_stage_config(other, epochs=1) == heads_stage_config(teacher, epochs=1)
    from kdtune.tune.stages import heads_stage_key

    assert (
        heads_stage_key(other.key, heads_stage_config(other, epochs=1)) != st.key
    )  # a new teacher, a new stage


def test_heads_stage_of_a_checkpoint_teacher(chain):
    from kdtune.tune.stages import checkpoint_teacher, heads_stage_config, heads_stage_key

    path = chain / "teacher" / "final.pt"
    ref = checkpoint_teacher(path, {"model": "resnet20", "data": "digits", "epochs": 3, "seed": 1, "lr": 9.0})
    cfg = heads_stage_config(ref)
    assert (
        cfg["teacher"] == str(path) and cfg["epochs"] == 3 and "lr" not in cfg
    )  # HSAKD's recipe, not the teacher's
    assert ref.key.startswith("ckpt") and heads_stage_key(ref.key, cfg).startswith(ref.key + "-hsakd-heads-")
    assert checkpoint_teacher(path, {}).key == ref.key  # the file's bytes


def test_preflight_builds_hsakd_as_a_trial_would_and_refuses_the_heads_method(tmp_path):
    from kdtune.preflight import preflight
    from kdtune.spec import load_spec

    spec = {"name": "h", "data": "digits", "teacher": {"model": "resnet20", "train": {"epochs": 1}},
            "students": ["resnet8"], "methods": ["hsakd"], "budget": {"trials": 1, "epochs": 1},
            "storage": str(tmp_path / "runs")}  # fmt: skip
    preflight(load_spec(spec))  # the teacher's heads come from the sweep's heads stage: branches of its shape
    with pytest.raises(ConfigError, match="hsakd_heads trains a teacher's auxiliary heads"):
        preflight(load_spec({**spec, "methods": ["hsakd_heads"]}))
    with pytest.raises(
        ConfigError, match="toy_interval_student exposes no stage features"
    ):  # every stage model
        # of the zoo has branches: a model without them has no stages either
        preflight(load_spec({**spec, "data": "disk-intervals", "teacher": {"model": "toy_interval_teacher",
                                                                          "train": {"epochs": 1}},
                             "students": ["toy_interval_student"]}))  # fmt: skip


def test_heads_preset_scales_the_official_schedule():
    from kdtune.config import TrainConfig

    c = TrainConfig.from_dict(dict(data="digits", model="resnet20", method="ce", preset="hsakd_heads"))
    assert (c.epochs, c.milestones, c.lr, c.nesterov, c.momentum, c.weight_decay, c.batch_size) == (
        100, [30, 60, 90], 0.05, True, 0.9, 5e-4, 64)  # fmt: skip
    assert TrainConfig.from_dict(dict(model="resnet20", preset="hsakd_heads", epochs=10)).milestones == [
        3,
        6,
        9,
    ]
    assert TrainConfig.from_dict(dict(model="resnet20", preset="hsakd_heads", epochs=1)).milestones == []
    s = TrainConfig.from_dict(dict(model="shufflev1", preset="hsakd"))
    assert (s.epochs, s.milestones, s.lr, s.nesterov) == (240, [150, 180, 210], 0.01, True)
    assert TrainConfig.from_dict(dict(model="resnet8", preset="hsakd", epochs=24)).milestones == [15, 18, 21]


# ----------------------------------------------------------------------------- generated CIFAR-100
@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    from kdtune.data import load_data
    from tests.datagen import write_tiny_cifar100

    root = tmp_path_factory.mktemp("cifar")
    write_tiny_cifar100(root, n_train=4, n_test=4)  # one step of 4 images (16 rotated) per epoch
    return load_data("cifar100", root=root, val_fraction=0.0)


@pytest.mark.parametrize("teacher_arch,student", [("wrn_40_2", "wrn_16_2"), ("resnet32x4", "shufflev1")])
def test_short_run_on_generated_cifar100(teacher_arch, student, cifar, tmp_path):
    from kdtune.config import TrainConfig
    from kdtune.engine.trainer import Trainer
    from kdtune.models.checkpoint import save_model

    torch.manual_seed(0)
    path = tmp_path / f"{teacher_arch}.pt"
    save_model(path, create_model(teacher_arch, 100, 3), teacher_arch, 100, 3, {})
    common = dict(data="cifar100", epochs=1, batch_size=4, eval_batch_size=16, device="cpu", val_fraction=0.0)
    heads = Trainer(TrainConfig.from_dict(dict(common, model=teacher_arch, method="hsakd_heads", teacher=str(path))),
                    data=cifar, teacher_info={"arch": teacher_arch, "test_acc": 1.0})  # fmt: skip
    h = list(heads.run())[-1]
    assert math.isfinite(h["loss_aux_ce"]) and h["loss_aux_ce"] > 0
    heads.save_model(tmp_path / "heads.pt")
    cfg = TrainConfig.from_dict(
        dict(common, model=student, method="hsakd", teacher=str(tmp_path / "heads.pt"), lr=0.01)
    )
    t = Trainer(cfg, data=cifar, teacher_info={"arch": teacher_arch, "test_acc": 1.0})
    assert len(t.method.student_heads) == 3 and len(t.teacher_heads) == 3
    m = list(t.run())[-1]
    assert all(math.isfinite(m[f"loss_{k}"]) for k in ("ce", "aux_kd", "kd"))
