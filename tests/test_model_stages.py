"""``forward_stages``: the stage features of every CIFAR-zoo model (RepDistiller's ``is_feat=True, preact=...``).

Over every registered model that has stages (``tv_*`` and ``toy_*`` must refuse in one line):

- shapes at 32x32, 3 channels, 100 classes equal the table of ``/work/shared/FEATURE_METHODS.md`` section 1
  (models it does not list: the shapes that follow from the same architectures);
- the taps are where the CRD code puts them (stage modules' outputs in a plain forward, pre/post relations);
- ``forward_stages`` computes the same numbers as ``forward`` and as the code before it existed (the model files
  at ``PRISTINE_COMMIT``, read with ``git show``), bit for bit: logits, pooled features, BatchNorm running
  statistics after one training step (every BN runs exactly once: the double-BN trap of mdistiller's WRN),
  gradients; and the parameter and buffer names are unchanged (checkpoints keep loading);
- every stage tensor keeps its autograd graph, and channels-last inputs work.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdtune.errors import ConfigError
from kdtune.models import create_model, list_models
from kdtune.models.cifar_resnet import CifarResNet
from kdtune.models.common import KDModel, Stages
from kdtune.models.mobilenetv2 import STAGE_BLOCKS, MobileNetV2
from kdtune.models.resnet_cifar_stem import CifarStemResNet
from kdtune.models.shufflenet import ShuffleNetV1, ShuffleNetV2, channel_shuffle
from kdtune.models.vgg import VGG
from kdtune.models.wrn import WideResNet

torch.set_num_threads(1)

STAGE_MODELS = [n for n in list_models() if not n.startswith(("tv_", "toy_"))]
NO_STAGE_MODELS = [n for n in list_models("toy_*")] + ["tv_resnet18", "tv_mobilenet_v3_small"]
NUM_CLASSES = 100

# The last commit whose kdtune/models/*.py have no forward_stages: the reference for "same numbers as before".
PRISTINE_COMMIT = "0bcbc72d8900493ec267fe12dd06a003b9246b9f"
ROOT = Path(__file__).resolve().parents[1]

# (stem (C, H, W), [f1..fL] (C, H, W), pooled width) at 32x32. The rows marked S1 are section 1's table of the
# fact sheet; the others follow from the same architectures (depth or width changes only).
_R = ((16, 32, 32), [(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64)
_RX4 = ((32, 32, 32), [(64, 32, 32), (128, 16, 16), (256, 8, 8)], 256)
_VGG = ((64, 32, 32), [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512)
_WRN1 = ((16, 32, 32), [(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64)
_WRN2 = ((16, 32, 32), [(32, 32, 32), (64, 16, 16), (128, 8, 8)], 128)


def _r4(w: tuple[int, int, int, int], expansion: int = 1):
    return (
        (w[0], 32, 32),
        [
            (w[0] * expansion, 32, 32),
            (w[1] * expansion, 16, 16),
            (w[2] * expansion, 8, 8),
            (w[3] * expansion, 4, 4),
        ],
        w[3] * expansion,
    )


SHAPES = {
    **{f"resnet{d}": _R for d in (20, 32, 56, 110)},  # S1
    **{f"resnet{d}": _R for d in (8, 14, 44)},
    "resnet8x4": _RX4,  # S1
    "resnet32x4": _RX4,  # S1
    "resnet50": _r4((64, 128, 256, 512), 4),  # S1
    "resnet18": _r4((64, 128, 256, 512)),
    "resnet34": _r4((64, 128, 256, 512)),
    "resnet10": _r4((64, 128, 256, 512)),
    "resnet10_l": _r4((32, 64, 128, 256)),
    "resnet10_m": _r4((16, 32, 64, 128)),
    "resnet10_s": _r4((8, 16, 32, 64)),
    "resnet10_xs": _r4((8, 16, 16, 32)),
    "resnet10_xxs": _r4((8, 8, 16, 16)),
    "wrn_40_2": _WRN2,  # S1
    "wrn_16_2": _WRN2,  # S1
    "wrn_40_1": _WRN1,  # S1
    "wrn_16_1": _WRN1,
    "vgg8": _VGG,  # S1
    "vgg13": _VGG,  # S1
    **{f"vgg{d}": _VGG for d in (11, 16, 19)},
    "mobilenetv2": ((16, 16, 16), [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280),  # S1
    "shufflev1": ((24, 32, 32), [(240, 16, 16), (480, 8, 8), (960, 4, 4)], 960),  # S1
    "shufflev2": ((24, 32, 32), [(116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024),  # S1
}
# One small model per family, for the more expensive checks.
FAMILY_SAMPLE = ["resnet8", "resnet10_xxs", "wrn_16_1", "vgg8", "mobilenetv2", "shufflev1", "shufflev2"]


def _tensors(st: Stages) -> list[torch.Tensor]:
    return [st.stem, *st.post, *st.pre, st.pooled]


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


# ------------------------------------------------------------------------------------ the code before stages


def _git_show(path: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{PRISTINE_COMMIT}:{path}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


@functools.cache
def _pristine_factories() -> dict[str, object] | None:
    """The model factories of the model files at PRISTINE_COMMIT, by registered name (None without git or that
    commit). The old sources are executed with a collecting ``register_model`` (nothing is registered) and
    import today's ``kdtune.models.common`` helpers; the old classes override ``forward_features``."""
    factories: dict[str, object] = {}

    def register_model(name=None):
        def deco(f):
            factories[name] = f
            return f

        return deco

    namespaces: dict[str, dict] = {}
    for mod in ("cifar_resnet", "resnet_cifar_stem", "resnet10", "wrn", "vgg", "mobilenetv2", "shufflenet"):
        src = _git_show(f"kdtune/models/{mod}.py")
        if src is None:
            return None
        ns: dict = {"__name__": f"_pristine_{mod}", "register_model": register_model}
        for line, names in (
            ("from kdtune.models.registry import register_model\n", ()),
            (
                "from kdtune.models.resnet_cifar_stem import BasicBlock, CifarStemResNet\n",
                ("BasicBlock", "CifarStemResNet"),
            ),
        ):
            if line in src:
                src = src.replace(line, "")
                ns.update({n: namespaces["resnet_cifar_stem"][n] for n in names})
        assert not re.search(r"^from kdtune\.models\.(registry|resnet_cifar_stem) import", src, re.M), mod
        exec(compile(src, f"<{PRISTINE_COMMIT[:8]}:kdtune/models/{mod}.py>", "exec"), ns)
        namespaces[mod] = ns
    return factories


def _pristine_model(name: str) -> nn.Module:
    factories = _pristine_factories()
    if factories is None:
        pytest.skip(f"the pristine model code (commit {PRISTINE_COMMIT[:8]}) is not readable with git here")
    if name not in factories:
        pytest.skip(f"{name} was registered after commit {PRISTINE_COMMIT[:8]}")
    return factories[name](num_classes=NUM_CLASSES, in_channels=3)


# ------------------------------------------------------------------------------------------------- tests


def test_every_cifar_zoo_model_has_stages_and_a_shape_row():
    assert set(SHAPES) <= set(STAGE_MODELS), set(SHAPES) - set(STAGE_MODELS)
    assert set(STAGE_MODELS) <= set(SHAPES), f"add the stage shapes of {set(STAGE_MODELS) - set(SHAPES)}"
    for name in STAGE_MODELS:
        model = create_model(name, num_classes=10, in_channels=1)
        assert isinstance(model, KDModel) and model.has_stages is True and type(model).has_stages is True


@pytest.mark.parametrize("name", STAGE_MODELS)
def test_shapes_taps_and_same_numbers_as_forward(name):
    """Eval mode at 32x32: shapes (section 1), tap points, and logits/pooled equal forward's bit for bit."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES).eval()
    x = torch.randn(2, 3, 32, 32)
    stem_shape, post_shapes, pooled_dim = SHAPES[name]

    seen: list[torch.Tensor] = []
    if isinstance(model, (CifarResNet, CifarStemResNet, ShuffleNetV1, ShuffleNetV2)):
        taps = [model.layer1, model.layer2, model.layer3, getattr(model, "layer4", None)]
    elif isinstance(model, WideResNet):
        taps = [model.block1, model.block2, model.block3]
    elif isinstance(model, VGG):  # VGG's blocks output the pre-activations
        taps = [model.block1, model.block2, model.block3, model.block4]
    elif isinstance(model, MobileNetV2):
        taps = [model.blocks[i] for i in STAGE_BLOCKS]
    else:  # pragma: no cover - a new family: add its tap points here
        raise AssertionError(f"unknown family {type(model).__name__}")
    for m in filter(None, taps):
        m.register_forward_hook(lambda mod, i, out: seen.append(out))

    with torch.no_grad():
        plain, feats = model(x, return_features=True)
        hooked, seen[:] = list(seen), []
        logits, st = model.forward_stages(x)

    # shapes
    assert isinstance(st, Stages)
    assert tuple(st.stem.shape) == (2, *stem_shape)
    assert [tuple(t.shape[1:]) for t in st.post] == post_shapes
    assert [t.shape for t in st.pre] == [t.shape for t in st.post]
    assert st.pooled.shape == (2, pooled_dim) == (2, model.feat_dim)
    # the same numbers as forward
    assert torch.equal(logits, plain)
    assert torch.equal(st.pooled, feats)
    # tap points: the stage modules' outputs in the plain forward, and the pre/post relation of each family
    if isinstance(model, VGG):
        assert all(torch.equal(a, b) for a, b in zip(st.pre, hooked, strict=True))
        assert torch.equal(st.stem, F.relu(model.block0(x)))
    else:
        assert all(torch.equal(a, b) for a, b in zip(st.post, hooked, strict=True))
    if isinstance(model, WideResNet):  # pre = the BN that reads f_l next (eval: running statistics)
        bns = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
        for pre, post, bn in zip(st.pre, st.post, bns, strict=True):
            torch.testing.assert_close(pre, bn(post), rtol=0, atol=0)
        assert torch.equal(st.stem, model.conv1(x))
        assert torch.equal(st.pooled, torch.flatten(F.adaptive_avg_pool2d(F.relu(st.pre[-1]), 1), 1))
    elif isinstance(model, MobileNetV2):  # linear bottlenecks: pre is post
        assert all(a is b for a, b in zip(st.pre, st.post, strict=True))
        assert torch.equal(st.stem, model.conv1(x))
    else:  # ResNets, VGG, ShuffleNets: post = relu(pre), elementwise
        assert all(torch.equal(post, F.relu(pre)) for pre, post in zip(st.pre, st.post, strict=True))
        assert not all(bool((pre >= 0).all()) for pre in st.pre)  # pre is really before the ReLU
        if not isinstance(model, VGG):
            assert torch.equal(st.stem, F.relu(model.bn1(model.conv1(x))))


def test_shufflev2_pre_is_crd_preact_up_to_the_shuffle():
    """kdtune's ShuffleV2 pre is shuffled like post; channel_shuffle(pre, C // 2) is the CRD code's preact,
    cat([x1, bn3(conv3(...))]) of the stage's last unit."""
    model = create_model("shufflev2", num_classes=NUM_CLASSES).eval()
    x = torch.randn(2, 3, 32, 32)
    unit_in: dict[int, torch.Tensor] = {}
    bn3_out: dict[int, torch.Tensor] = {}
    for i, layer in enumerate((model.layer1, model.layer2, model.layer3)):
        layer[-1].register_forward_pre_hook(lambda m, args, i=i: unit_in.__setitem__(i, args[0]))
        layer[-1].bn3.register_forward_hook(lambda m, args, out, i=i: bn3_out.__setitem__(i, out))
    with torch.no_grad():
        _, st = model.forward_stages(x)
    for i, pre in enumerate(st.pre):
        c = pre.shape[1]
        crd = channel_shuffle(pre, c // 2)
        assert torch.equal(crd[:, : c // 2], unit_in[i][:, : c // 2])  # x1
        assert torch.equal(crd[:, c // 2 :], bn3_out[i])


@pytest.mark.parametrize("name", STAGE_MODELS)
def test_train_step_same_numbers_as_before_and_bn_runs_once(name):
    """One training step from the same state: the code before stages (its forward), today's forward and
    forward_stages give identical logits, BN running statistics and gradients, and every BN ran exactly once;
    state_dict keys (and shapes) are those of the code before stages."""
    torch.manual_seed(1)
    model = create_model(name, num_classes=NUM_CLASSES).train()
    old = _pristine_model(name)
    assert list(old.state_dict()) == list(model.state_dict())
    old.load_state_dict(model.state_dict())  # strict: names and shapes
    old.train()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([3, 97])

    ref = old(x)
    out = plain(x)
    logits, st = model.forward_stages(x)
    assert torch.equal(ref, out) and torch.equal(ref, logits)

    buffers = _bn_buffers(model)
    assert buffers, "no BatchNorm buffers"
    assert all(int(v) == 1 for k, v in buffers.items() if k.endswith("num_batches_tracked"))
    for other in (old, plain):
        theirs = _bn_buffers(other)
        assert theirs.keys() == buffers.keys()
        assert all(torch.equal(theirs[k], buffers[k]) for k in buffers)

    for lg in (ref, out, logits):
        F.cross_entropy(lg, y).backward()
    for (n, p_old), p_plain, p_new in zip(
        old.named_parameters(), plain.parameters(), model.parameters(), strict=True
    ):
        assert p_new.grad is not None, n
        assert torch.equal(p_old.grad, p_new.grad) and torch.equal(p_plain.grad, p_new.grad), n

    old.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(old(x), model(x))
        assert torch.equal(old.forward_features(x), model.forward_features(x))


@pytest.mark.parametrize("name", FAMILY_SAMPLE)
def test_stage_tensors_keep_autograd_and_gradients_reach_every_parameter(name):
    torch.manual_seed(2)
    model = create_model(name, num_classes=NUM_CLASSES).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits, st = model.forward_stages(x)
    tensors = _tensors(st)
    assert all(t.requires_grad and t.grad_fn is not None for t in tensors)
    # each stage tensor depends on the input (a random projection: sums of train-mode BN outputs are constant)
    for t in tensors:
        (g,) = torch.autograd.grad((t * torch.randn_like(t)).sum(), x, retain_graph=True)
        assert g.abs().sum() > 0
    loss = F.cross_entropy(logits, torch.tensor([0, 1])) + sum(t.square().mean() for t in tensors)
    loss.backward()  # also fails if a saved tensor was modified in place
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", FAMILY_SAMPLE)
def test_channels_last(name):
    torch.manual_seed(3)
    model = create_model(name, num_classes=NUM_CLASSES).eval()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        logits, st = model.forward_stages(x)
        logits_cl, st_cl = cl.forward_stages(xc)
        assert torch.equal(st_cl.pooled, cl.forward_features(xc))
        assert torch.equal(logits_cl, cl(xc))
    for a, b in zip(_tensors(st), _tensors(st_cl), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_cl, logits, rtol=1e-4, atol=1e-5)
    cl.train()
    lg, st_cl = cl.forward_stages(xc)
    (lg.sum() + sum(t.square().mean() for t in _tensors(st_cl))).backward()


@pytest.mark.parametrize("name", NO_STAGE_MODELS)
def test_models_without_stages_refuse_in_one_line(name):
    dims = {"toy_interval_teacher": (2, 1), "toy_interval_student": (2, 1)}
    classes, in_ch = dims.get(name, (3, 2) if name.startswith("toy_") else (10, 3))
    model = create_model(name, num_classes=classes, in_channels=in_ch)
    assert model.has_stages is False and type(model).has_stages is False
    with pytest.raises(ConfigError) as err:
        model.forward_stages(torch.randn(2, in_ch) if name.startswith("toy_") else torch.randn(1, 3, 32, 32))
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "exposes no stage features" in msg
    assert all(m in msg for m in ("at", "sp", "vid", "fitnet", "reviewkd", "hsakd"))


def test_no_stage_models_keep_their_state_dict_keys():
    import torchvision

    ref = torchvision.models.resnet18(num_classes=10).state_dict()
    assert list(create_model("tv_resnet18", num_classes=10).state_dict()) == list(ref)
    toys = {
        "toy_interval_student": ["ends"],
        "toy_mlp_student": ["head_weight", "head_bias", "running_mean0", "running_var0", "weights.0", "gammas.0",
                            "betas.0"],
    }  # fmt: skip
    assert (
        list(create_model("toy_interval_student", num_classes=2, in_channels=1).state_dict())
        == toys["toy_interval_student"]
    )
    assert (
        list(create_model("toy_mlp_student", num_classes=3, in_channels=2).state_dict())
        == toys["toy_mlp_student"]
    )


def test_a_kdmodel_with_only_forward_features_refuses():
    class Plain(KDModel):
        feat_dim = 4

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward_features(self, x):
            return torch.flatten(x, 1)

    model = Plain()
    assert model.has_stages is False
    assert model(torch.randn(2, 4)).shape == (2, 2)
    with pytest.raises(ConfigError, match="Plain exposes no stage features"):
        model.forward_stages(torch.randn(2, 4))
