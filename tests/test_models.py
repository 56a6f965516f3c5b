"""The model registry contract, over every registered image model (adding a model adds its tests).

Toy models (``toy_*``: vector inputs, DiSK's toy problems) have their own tests; torchvision models
(``tv_*``) are represented by a small sample, as they are large.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from kdtune.errors import ConfigError
from kdtune.models import create_model, list_models
from kdtune.models.common import count_params

torch.set_num_threads(1)

IMAGE_MODELS = [n for n in list_models() if not n.startswith(("tv_", "toy_"))]
TV_SAMPLE = ["tv_resnet18", "tv_mobilenet_v3_small", "tv_squeezenet1_1"]
NUM_CLASSES = 7


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def test_zoo_is_complete():
    wanted = {
        *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
        "resnet8x4",
        "resnet32x4",
        "wrn_16_1",
        "wrn_16_2",
        "wrn_40_1",
        "wrn_40_2",
        *(f"vgg{d}" for d in (8, 11, 13, 16, 19)),
        "mobilenetv2",
        "shufflev1",
        "shufflev2",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet10",
        *(f"resnet10_{s}" for s in ("l", "m", "s", "xs", "xxs")),
    }
    assert wanted <= set(IMAGE_MODELS), wanted - set(IMAGE_MODELS)


@pytest.mark.parametrize("name", IMAGE_MODELS + TV_SAMPLE)
def test_forward_features_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES)
    assert isinstance(model.feat_dim, int) and not isinstance(model.feat_dim, bool)
    assert model.kdtune_arch == name
    x = torch.randn(2, 3, 32, 32)

    model.train()
    logits, feats = model(x, return_features=True)
    assert logits.shape == (2, NUM_CLASSES)
    assert feats.shape == (2, model.feat_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    head = _last_linear(model)
    if name != "tv_squeezenet1_1":  # SqueezeNet's classifier is a conv (documented exception)
        assert head is not None and head.in_features == model.feat_dim
        # the features are the input of the final linear classifier
        torch.testing.assert_close(logits, head(feats))

    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())

    model.eval()
    with torch.no_grad():
        plain = model(x)
        again, _ = model(x, return_features=True)
    assert isinstance(plain, torch.Tensor)
    torch.testing.assert_close(plain, again)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_grey_8x8_inputs(name):
    """in_channels=1 and 8x8 digits: every CIFAR-zoo model (VGG too: three max-pools reach 1x1)."""
    model = create_model(name, num_classes=10, in_channels=1)
    logits, feats = model(torch.randn(2, 1, 8, 8), return_features=True)
    assert logits.shape == (2, 10) and feats.shape == (2, model.feat_dim)
    assert torch.isfinite(logits).all()
    with pytest.raises(RuntimeError):  # the stem really takes one channel
        model(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("name", ["resnet8", "resnet10_xxs", "wrn_16_1", "vgg8", "mobilenetv2", "shufflev2"])
def test_tiny_imagenet_64x64(name):
    model = create_model(name, num_classes=200).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64), return_features=True)
    assert logits.shape == (2, 200) and feats.shape == (2, model.feat_dim)


def test_vgg_pools_after_stage3_only_for_64px():
    """CRD's VGG max-pools after stage 3 only for 64x64 inputs: block4 sees 4x4 both at 32 and 64 px."""
    model = create_model("vgg8", num_classes=10).eval()
    seen = []
    model.block4.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 64, 64))
    assert seen == [(4, 4), (4, 4)]


# Published parameter counts: (value, classes, source). CRD benchmark counts (Tian et al. ICLR 2020 and the
# papers using its zoo, e.g. DKD, CVPR 2022) for CIFAR-100; DiSK Tables 2 and 5 for CIFAR-100 (100 classes)
# and Tiny-ImageNet (200 classes).
PUBLISHED = {
    ("resnet20", 100): 0.28e6,
    ("resnet32", 100): 0.47e6,
    ("resnet56", 100): 0.86e6,
    ("resnet110", 100): 1.74e6,
    ("resnet8x4", 100): 1.23e6,
    ("resnet32x4", 100): 7.43e6,
    ("wrn_16_2", 100): 0.70e6,
    ("wrn_40_1", 100): 0.57e6,
    ("wrn_40_2", 100): 2.26e6,
    ("vgg8", 100): 3.96e6,
    ("vgg13", 100): 9.46e6,
    ("mobilenetv2", 100): 0.81e6,
    ("shufflev1", 100): 0.95e6,
    ("shufflev2", 100): 1.36e6,
    ("resnet50", 100): 23.71e6,
    ("resnet18", 100): 11.22e6,
    ("resnet34", 100): 21.32e6,
    ("resnet18", 200): 11.27e6,
    ("resnet34", 200): 21.38e6,
    ("resnet10", 100): 4.92e6,
    ("resnet10_l", 100): 1.25e6,
    ("resnet10_l", 200): 1.28e6,
    ("resnet10_m", 100): 320e3,
    ("resnet10_m", 200): 333e3,
    ("resnet10_s", 100): 84e3,
    ("resnet10_s", 200): 90e3,
    ("resnet10_xs", 100): 28e3,
    ("resnet10_xs", 200): 31e3,
    ("resnet10_xxs", 100): 13e3,
    ("resnet10_xxs", 200): 15e3,
}


@pytest.mark.parametrize("name,classes", list(PUBLISHED))
def test_parameter_counts_match_published(name, classes):
    published = PUBLISHED[(name, classes)]
    # 2 %, or half a unit of the last published digit where the paper rounds coarser (DiSK's "13K")
    tol = max(0.02 * published, 500.0 if published < 1e5 else 0.0)
    n = count_params(create_model(name, num_classes=classes))
    assert abs(n - published) <= tol, f"{name} ({classes} classes): {n} parameters, published {published:.0f}"


def test_torchvision_counts_unchanged():
    """The feature wrapper adds no parameters: torchvision's ResNet-18 has 11,689,512 for 1000 classes."""
    assert count_params(create_model("tv_resnet18", num_classes=1000)) == 11_689_512


# key names of HobbitLong/RepDistiller's models (models/*.py), so its checkpoints load unchanged
PUBLIC_KEYS = {
    "resnet8x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.bias"],
    "wrn_40_2": [
        "block1.layer.0.convShortcut.weight",
        "block3.layer.5.conv2.weight",
        "bn1.weight",
        "fc.weight",
    ],
    "vgg8": [
        "block0.0.weight",
        "block0.0.bias",
        "block0.1.running_mean",
        "block4.1.weight",
        "classifier.weight",
    ],
    "vgg13": ["block1.3.weight", "block1.4.running_var"],
    "mobilenetv2": [
        "conv1.0.weight",
        "blocks.0.0.conv.0.weight",
        "blocks.6.0.conv.7.weight",
        "classifier.0.weight",
    ],
    "shufflev1": ["conv1.weight", "layer1.0.conv3.weight", "layer3.3.bn3.bias", "linear.weight"],
    "shufflev2": [
        "layer1.0.conv5.weight",
        "layer1.3.conv3.weight",
        "conv2.weight",
        "bn2.weight",
        "linear.weight",
    ],
    "resnet50": ["conv1.weight", "layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "linear.weight"],
    "resnet10_xxs": ["conv1.weight", "layer2.0.shortcut.1.weight", "layer4.0.bn2.weight", "linear.weight"],
}


@pytest.mark.parametrize("name", list(PUBLIC_KEYS))
def test_state_dict_keys_follow_public_code(name):
    """Parameter names are RepDistiller's, so the CRD / mdistiller teacher checkpoints load unchanged."""
    sd = create_model(name, num_classes=100).state_dict()
    missing = [k for k in PUBLIC_KEYS[name] if k not in sd]
    assert not missing


def test_mobilenetv2_shapes_follow_crd():
    sd = create_model("mobilenetv2", num_classes=100).state_dict()
    assert sd["conv1.0.weight"].shape == (16, 3, 3, 3)  # width 0.5 stem, stride 2
    assert sd["blocks.0.0.conv.0.weight"].shape == (16, 16, 1, 1)  # t = 1 block keeps its expanding conv
    assert sd["classifier.0.weight"].shape == (100, 1280)


def test_list_models_patterns():
    assert set(list_models("wrn_*")) == {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"}
    assert list_models("vgg*") == ["vgg11", "vgg13", "vgg16", "vgg19", "vgg8"]
    resnets = list_models("resnet*")
    assert {"resnet8", "resnet32x4", "resnet10_xxs", "resnet50"} <= set(resnets)
    assert not any(n.startswith(("tv_", "wrn")) for n in resnets)
    tv_names = torchvision.models.list_models(module=torchvision.models)
    assert list_models("tv_*") == sorted("tv_" + n for n in tv_names)
    assert "tv_resnet18" in list_models("tv_resnet*") and list_models("nothing*") == []


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        create_model("resnet33", num_classes=10)
    msg = str(err.value)
    assert "\n" not in msg
    assert "resnet33" in msg and "did you mean" in msg
    assert "wrn_40_2" in msg and "shufflev2" in msg and "resnet10_xxs" in msg


def test_bad_channels_raise_config_error():
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("resnet8", num_classes=10, in_channels=0)
    with pytest.raises(ConfigError, match="in_channels=1"):
        create_model("tv_resnet18", num_classes=10, in_channels=1)


def test_torchvision_features_survive_deepcopy():
    """The feature hook stashes on the classifier itself: a copy returns its own features, and nothing
    stays referenced after the forward pass."""
    model = create_model("tv_resnet18", num_classes=5).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = twin(x, return_features=True)
        ref_logits, ref_feats = model(x, return_features=True)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(feats, ref_feats)
    assert not any("_kdtune_head_input" in vars(m) for m in [*model.modules(), *twin.modules()])


def test_lazy_registration_runs_only_for_names_it_may_hold():
    """``Registry.register_lazy``: the loader runs once, and only for a name or pattern that may match its
    prefix; an unknown name's error lists the lazily registered names too."""
    from kdtune.registry import Registry

    reg: Registry = Registry("thing")
    reg.register("alpha")(object())
    calls = []

    def load():
        calls.append(1)
        reg.register("zz_one")(object())

    reg.register_lazy("zz_", load)
    assert reg.names("al*") == ["alpha"] and "alpha" in reg and reg.get("alpha") and calls == []
    assert "zz_two" not in reg and calls == [1]  # a zz_ name may be the loader's: it ran, once
    assert reg.names("z?_*") == ["zz_one"] and len(reg) == 2 and calls == [1]
    other: Registry = Registry("thing")
    other.register_lazy("zz_", lambda: other.register("zz_one")(object()))
    with pytest.raises(ConfigError, match="valid things: zz_one"):
        other.get("nope")


def test_torchvision_is_imported_only_when_a_tv_model_is_asked_for():
    """Importing the engine and building kdtune's own models leaves torchvision (about a second to import)
    unloaded; a tv_ name loads it."""
    code = (
        "import sys, kdtune.engine, kdtune.models as m\n"
        "m.create_model('resnet8', 10, 1); assert 'resnet8' in m.MODELS\n"
        "assert 'torchvision' not in sys.modules, 'torchvision imported eagerly'\n"
        "assert type(m.create_model('tv_resnet18', 10)).__name__ == 'KDResNet' and 'torchvision' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
