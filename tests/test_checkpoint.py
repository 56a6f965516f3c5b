"""save_model / load_model: round trip, foreign formats, mismatches, and weights_only safety."""

from __future__ import annotations

import os
import urllib.error
from collections import OrderedDict

import numpy as np
import pytest
import torch

from kdtune.errors import CheckpointError
from kdtune.models import checkpoint as ckpt
from kdtune.models import create_model
from kdtune.models.checkpoint import load_model, save_model

torch.set_num_threads(1)


def _trained_like(name="resnet8", num_classes=10, in_channels=3, seed=0):
    """A model whose BN statistics and weights differ from a fresh init (so a load that silently
    does nothing would be caught)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()
        model(torch.randn(4, in_channels, 16, 16))
    return model.eval()


def _outputs(model, in_channels=3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(3, in_channels, 16, 16, generator=g), return_features=True)


def _assert_same(a, b):
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)


def test_round_trip_identical_outputs(tmp_path):
    model = _trained_like()
    path = tmp_path / "runs" / "t" / "final.pt"
    meta = {"test_acc": 0.5, "dataset": "cifar10", "np_scalar": np.float32(0.25), "tensor": torch.tensor(3)}
    assert save_model(path, model, "resnet8", 10, 3, meta) == path
    assert sorted(os.listdir(path.parent)) == ["final.pt"]  # no temporary file left behind

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"kdtune_format", "arch", "num_classes", "in_channels", "state_dict", "meta"}
    assert raw["kdtune_format"] == 1 and raw["arch"] == "resnet8"

    loaded, info = load_model(path)
    assert not loaded.training
    _assert_same(model, loaded)
    assert info["arch"] == "resnet8" and info["num_classes"] == 10 and info["in_channels"] == 3
    assert info["meta"] == {"test_acc": 0.5, "dataset": "cifar10", "np_scalar": 0.25, "tensor": 3}
    assert info["format"] == "kdtune"
    # the same with every field given and matching
    again, _ = load_model(str(path), arch="resnet8", num_classes=10, in_channels=3)
    _assert_same(model, again)


def test_round_trip_grey_model_and_compiled_prefix(tmp_path):
    model = _trained_like("wrn_16_1", num_classes=4, in_channels=1)
    wrapped = torch.nn.DataParallel(model)  # keys 'module.*' on save: stripped
    save_model(tmp_path / "m.pt", wrapped, "wrn_16_1", 4, 1, {})
    assert all(not k.startswith("module.") for k in torch.load(tmp_path / "m.pt")["state_dict"])
    loaded, info = load_model(tmp_path / "m.pt")
    assert info["in_channels"] == 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    model = _trained_like()
    path = tmp_path / "final.pt"
    save_model(path, model, "resnet8", 10, 3, {"version": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(path, model, "resnet8", 10, 3, {"version": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["final.pt"]


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_model(tmp_path / "m.pt", _trained_like(), "resnet8", 10, 3, {"bad": object()})
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("key", ["model", "net", "state_dict"])
def test_public_code_wrappers_load(tmp_path, key):
    """CRD / mdistiller save {'epoch', 'model': state_dict, 'best_acc', 'optimizer'}; others use 'net' or
    'state_dict'."""
    model = _trained_like("resnet8", num_classes=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    model.eval()
    state = {
        "epoch": 240,
        key: model.state_dict(),
        "best_acc": torch.tensor(72.5),
        "optimizer": opt.state_dict(),
    }
    torch.save(state, tmp_path / "ckpt_epoch_240.pth")
    loaded, info = load_model(tmp_path / "ckpt_epoch_240.pth", arch="resnet8")
    assert info["num_classes"] == 100 and info["in_channels"] == 3  # read from fc.weight / conv1.weight
    assert info["meta"] == {} and key in info["format"]
    _assert_same(model, loaded)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_plain_state_dict_loads(tmp_path, prefix):
    model = _trained_like("wrn_16_1", num_classes=10)
    sd = model.state_dict()
    torch.save(OrderedDict((prefix + k, v) for k, v in sd.items()), tmp_path / "dp.pt")
    loaded, info = load_model(tmp_path / "dp.pt", arch="wrn_16_1", num_classes=10)
    assert info["format"] == "state_dict"
    _assert_same(model, loaded)


def test_old_checkpoint_without_bn_counters_loads(tmp_path):
    """Checkpoints from before PyTorch 0.4.1 have no BN num_batches_tracked."""
    model = _trained_like()
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": sd}, tmp_path / "old.pth")
    loaded, _ = load_model(tmp_path / "old.pth", arch="resnet8")
    _assert_same(model, loaded)


def test_torchvision_state_dict_loads(tmp_path):
    """tv_* models keep torchvision's keys, so a torchvision state dict loads as is."""
    import torchvision

    ref = torchvision.models.resnet18(num_classes=6).eval()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    loaded, info = load_model(tmp_path / "r18.pth", arch="tv_resnet18")
    assert info["num_classes"] == 6
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ref(x), loaded(x))


# ------------------------------------------------------------------------------------------------ mismatches


@pytest.fixture()
def kd_file(tmp_path):
    path = tmp_path / "runs" / "t" / "final.pt"
    save_model(path, _trained_like("resnet8", num_classes=10), "resnet8", 10, 3, {"dataset": "cifar10"})
    return path


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_wrong_arch(kd_file):
    msg = _err(load_model, kd_file, arch="resnet32x4")
    assert "is a resnet8" in msg and "arch=resnet32x4" in msg and str(kd_file) in msg


def test_wrong_class_count(kd_file):
    msg = _err(load_model, kd_file, num_classes=100)
    assert "num_classes" in msg and "10 classes" in msg and "100" in msg
    msg = _err(
        load_model, kd_file, arch="resnet8", num_classes=100, role="teacher checkpoint", data="cifar100"
    )
    assert msg == (
        f"teacher checkpoint {kd_file} is a resnet8 with 10 classes, but data cifar100 has 100 classes "
        "(num_classes); train a teacher on this data set or pass teacher=<matching checkpoint>"
    )


def test_wrong_in_channels(kd_file, tmp_path):
    msg = _err(load_model, kd_file, in_channels=1)
    assert "in_channels" in msg and "3 input channels" in msg
    # a plain state dict: in_channels read from the stem's weight
    torch.save(_trained_like("resnet8", in_channels=1).state_dict(), tmp_path / "grey.pt")
    msg = _err(load_model, tmp_path / "grey.pt", arch="resnet8", in_channels=3)
    assert "in_channels" in msg and "conv1.weight is [16, 1, 3, 3]" in msg


def test_plain_state_dict_wrong_classes_names_key(tmp_path):
    torch.save({"model": _trained_like("resnet8x4", num_classes=10).state_dict()}, tmp_path / "t.pth")
    msg = _err(load_model, tmp_path / "t.pth", arch="resnet8x4", num_classes=100)
    assert "num_classes" in msg and "fc.weight is [10, 256]" in msg


def test_plain_state_dict_other_arch_names_first_key(tmp_path):
    torch.save(_trained_like("resnet8").state_dict(), tmp_path / "r8.pt")
    # same depth, other widths: the first mis-shaped key and both shapes
    msg = _err(load_model, tmp_path / "r8.pt", arch="resnet8x4", num_classes=10)
    assert "conv1.weight is [16, 3, 3, 3] in the file but [32, 3, 3, 3] in the model" in msg
    # deeper network: the first missing key
    msg = _err(load_model, tmp_path / "r8.pt", arch="resnet14")
    assert "layer1.1.conv1.weight [16, 16, 3, 3] is missing from the file" in msg
    # shallower network: an unexpected key
    torch.save(_trained_like("resnet14").state_dict(), tmp_path / "r14.pt")
    msg = _err(load_model, tmp_path / "r14.pt", arch="resnet8")
    assert "the file has layer1.1.conv1.weight [16, 16, 3, 3], which the model lacks" in msg


def test_plain_state_dict_needs_arch(tmp_path):
    torch.save(_trained_like().state_dict(), tmp_path / "sd.pt")
    assert "arch=" in _err(load_model, tmp_path / "sd.pt")


def test_missing_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _err(load_model, "runs/none/final.pt", arch="resnet8")
    assert "not found" in msg and str(tmp_path / "runs" / "none" / "final.pt") in msg
    assert "is a directory" in _err(load_model, tmp_path)


def test_unreadable_and_foreign_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    assert "cannot read" in _err(load_model, tmp_path / "junk.pt", arch="resnet8")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nodict.pt")
    msg = _err(load_model, tmp_path / "nodict.pt", arch="resnet8")
    assert "holds no state_dict" in msg and "epoch" in msg
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "not a state_dict" in _err(load_model, tmp_path / "list.pt", arch="resnet8")


def _leave_mark(path):  # pragma: no cover - must never run
    with open(path, "w") as f:
        f.write("unpickled!")
    return {}


class _Payload:
    """An object whose unpickling runs code: what weights_only=True exists to refuse."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (_leave_mark, (self.mark,))


def test_pickled_objects_are_refused(tmp_path):
    mark = tmp_path / "MARK"
    sd = _trained_like().state_dict()
    torch.save({"model": sd, "extra": _Payload(str(mark))}, tmp_path / "evil.pth")
    msg = _err(load_model, tmp_path / "evil.pth", arch="resnet8")
    assert "weights_only" in msg and "_leave_mark" in msg
    assert not mark.exists()


def test_url_uses_weights_only(monkeypatch):
    model = _trained_like()
    calls = []

    def fake_hub(url, **kwargs):
        calls.append((url, kwargs))
        return {"model": model.state_dict()}

    monkeypatch.setattr(ckpt.torch.hub, "load_state_dict_from_url", fake_hub)
    loaded, info = load_model("https://example.org/ckpt/resnet8.pth", arch="resnet8")
    assert calls and calls[0][0] == "https://example.org/ckpt/resnet8.pth"
    assert calls[0][1]["weights_only"] is True
    assert info["source"] == "https://example.org/ckpt/resnet8.pth"
    _assert_same(model, loaded)


def test_url_failure_is_one_line(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(ckpt.torch.hub, "load_state_dict_from_url", offline)
    msg = _err(load_model, "https://example.org/x.pth", arch="resnet8")
    assert "could not download" in msg and "no route to host" in msg
