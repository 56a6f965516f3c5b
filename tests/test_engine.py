"""The training engine on the CPU: run directories, resume equality, validation, the loader's determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdtune.config import TrainConfig
from kdtune.data.base import Split
from kdtune.data.loader import DeviceLoader, augment_uint8
from kdtune.engine import Trainer, epoch_line, iter_train, train
from kdtune.engine.schedule import lr_factor
from kdtune.engine.trainer import DivergedError
from kdtune.errors import CheckpointError, ConfigError

FAST = dict(data="digits", model="resnet8", batch_size=128, eval_batch_size=512)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(dict(FAST, model="resnet8x4", method="ce", epochs=4, lr=0.1, out=str(out)))
    return out


def test_run_directory_and_result(tmp_path):
    out = tmp_path / "ce"
    result = train(dict(FAST, method="ce", epochs=3, seed=1, out=str(out)))
    for f in ("config.yaml", "train.log", "state.pt", "best.pt", "final.pt", "result.json"):
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "result.json").read_text())
    for key in (
        "test_acc",
        "test_loss",
        "best_test_acc",
        "epochs",
        "seed",
        "wall_s",
        "train_images_per_s",
        "config",
    ):
        assert key in on_disk, key
    assert on_disk["epochs"] == 3 and on_disk["seed"] == 1
    assert on_disk["config"]["method"] == "ce" and on_disk["config"]["hp"] == {}
    assert result["test_acc"] == on_disk["test_acc"]
    assert 0 <= result["test_acc"] <= 100 and result["train_images_per_s"] > 0
    lines = (out / "train.log").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3")
    # the checkpoint reloads as a teacher of the same architecture
    from kdtune.models.checkpoint import load_model

    model, info = load_model(str(out / "final.pt"), arch="resnet8", num_classes=10, in_channels=1)
    assert info["arch"] == "resnet8"


def test_training_learns_digits(teacher_dir):
    result = json.loads((teacher_dir / "result.json").read_text())
    assert result["test_acc"] > 70.0  # 10 classes: chance is 10%


def test_iter_train_yields_one_dict_per_epoch():
    epochs = list(iter_train(dict(FAST, method="ce", epochs=2)))
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert {"val_acc", "test_acc", "lr", "train_loss", "loss_ce", "train_images_per_s"} <= set(epochs[0])


def test_host_memory_is_reported_and_flat_across_epochs():
    """A trial's host memory must not grow with the epochs (no per-epoch leak of tensors or history)."""
    epochs = list(iter_train(dict(FAST, method="ce", epochs=6)))
    rss = [m["host_rss_mb"] for m in epochs]
    assert all(isinstance(v, float) and v > 10 for v in rss)
    # after the first epoch (allocator warm-up), each further epoch adds well under a megabyte on average
    growth = (rss[-1] - rss[1]) / (len(rss) - 2)
    assert growth < 2.0, rss
    assert "host " in epoch_line(epochs[-1]) and " MB" in epoch_line(epochs[-1])


@pytest.mark.parametrize("method", ["ce", "kd"])
def test_resume_ends_with_same_weights(tmp_path, teacher_dir, method):
    """A run stopped after epoch 2 and resumed equals an uninterrupted run, bit for bit on the CPU."""
    cfg = dict(FAST, method=method, epochs=4, seed=3, schedule="cosine", warmup_epochs=1.0)
    if method == "kd":
        cfg["teacher"] = str(teacher_dir)
    full = tmp_path / "full"
    train(dict(cfg, out=str(full)))
    part = tmp_path / "part"
    gen = iter_train(dict(cfg, out=str(part)))
    next(gen)
    next(gen)
    gen.close()  # stopped after epoch 2: state.pt holds epoch 2
    assert not (part / "result.json").exists()
    resumed = train(dict(cfg, out=str(part), resume=True))
    assert resumed["epochs"] == 4
    a = torch.load(full / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "final.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_log = (full / "train.log").read_text().splitlines()
    part_log = (part / "train.log").read_text().splitlines()
    assert len(part_log) == 4
    strip = [line.split("  ")[:5] for line in full_log], [line.split("  ")[:5] for line in part_log]
    assert strip[0] == strip[1]  # same losses and accuracies per epoch (timings differ)


def test_resume_refuses_changed_config(tmp_path):
    out = tmp_path / "r"
    gen = iter_train(dict(FAST, method="ce", epochs=3, out=str(out)))
    next(gen)
    gen.close()
    with pytest.raises(ConfigError, match="lr"):
        train(dict(FAST, method="ce", epochs=3, lr=0.2, out=str(out), resume=True))


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "o"
    train(dict(FAST, method="ce", epochs=1, out=str(out)))
    before = (out / "final.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(dict(FAST, method="ce", epochs=1, seed=5, out=str(out)))
    assert (out / "final.pt").read_bytes() == before
    train(dict(FAST, method="ce", epochs=1, seed=5, out=str(out), overwrite=True))
    assert (out / "final.pt").read_bytes() != before


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(epochs=-1), "epochs"),
        (dict(lr=0), "lr"),
        (dict(method="kd", teacher="x.pt", T=-1), "T"),
        (dict(method="kd", teacher="x.pt", T=0), "T"),
        (dict(method="nope"), "method"),
        (dict(model="resnet9000"), "model"),
        (dict(data="mnist-but-not"), "data set"),
        (dict(batch_size=0), "batch_size"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(optimizer="lion"), "optimizer"),
        (dict(milestones=[5, 50], epochs=10), "milestones"),
        (dict(temprature=4), "temprature"),
        (dict(method="kd"), "needs a teacher"),
    ],
)
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field) as e:
        TrainConfig.from_dict(dict(FAST, **override))
    assert "\n" not in str(e.value)


def test_crd_preset_and_overrides():
    cfg = TrainConfig.from_dict(dict(data="digits", model="resnet8x4", preset="crd"))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.milestones, cfg.schedule) == (
        240,
        0.05,
        64,
        [150, 180, 210],
        "step",
    )
    assert TrainConfig.from_dict(dict(data="digits", model="mobilenetv2", preset="crd")).lr == 0.01
    assert TrainConfig.from_dict(dict(data="digits", model="resnet8x4", preset="crd", lr=0.1)).lr == 0.1


def test_cli_key_value_and_yaml(tmp_path):
    f = tmp_path / "trial.yaml"
    f.write_text("data: digits\nmodel: resnet8\nmethod: kd\nteacher: t.pt\nkd.T: 2\nepochs: 7\n")
    cfg = TrainConfig.from_args(["epochs=5", "w_kd=0.5"], f)
    assert cfg.epochs == 5 and cfg.hp["T"] == 2.0 and cfg.hp["w_kd"] == 0.5 and cfg.hp["w_ce"] == 0.1


def test_teacher_of_another_architecture_is_refused(teacher_dir):
    with pytest.raises(CheckpointError):
        Trainer(
            TrainConfig.from_dict(dict(FAST, method="kd", teacher=str(teacher_dir), teacher_model="resnet8"))
        )


def test_missing_teacher_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        Trainer(TrainConfig.from_dict(dict(FAST, method="kd", teacher=str(tmp_path / "nope.pt"))))


def test_divergence_is_reported(monkeypatch):
    from kdtune.losses.ce import CE

    def nan_loss(self, out):
        return {"ce": out.student_logits.sum() * float("nan")}

    monkeypatch.setattr(CE, "losses", nan_loss)
    with pytest.raises(DivergedError, match="epoch 1"):
        train(dict(FAST, method="ce", epochs=2))


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "kdtune", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    for args, needle in [
        (["train", "epochs=-1"], "epochs"),
        (["train", "method=kd"], "teacher"),
        (["train", "model=resnet9"], "valid models"),
        (["train", "data=cifar100", f"data_root={tmp_path}"], str(tmp_path)),
        (["train", "nonsense"], "key=value"),
        (["train", "--config", str(tmp_path / "none.yaml")], "does not exist"),
    ]:
        p = run_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kdtune: error:") and needle in err[0], (args, p.stderr)


def test_cli_train_writes_run(tmp_path):
    out = tmp_path / "cli"
    p = run_cli("train", "data=digits", "model=resnet8", "epochs=2", f"out={out}", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("epoch ") >= 2 and "done: test acc" in p.stdout
    assert (out / "result.json").exists()
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr


def test_cli_lists_methods_with_ranges():
    p = run_cli("methods", "kd")
    assert p.returncode == 0
    assert "T" in p.stdout and "default 4.0" in p.stdout and "(0, inf)" in p.stdout


# ------------------------------------------------------------------------------------------ loader
def _split(n=40, c=3, h=8):
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=g), torch.arange(n) % 5)


def test_views_depend_on_seed_epoch_index_only():
    s = _split()
    a = DeviceLoader(s, 8, train=True, crop_padding=2, flip=True, data_seed=7)
    b = DeviceLoader(s, 5, train=True, crop_padding=2, flip=True, data_seed=7)
    xa = torch.cat([x for x, _ in a.epoch(3)])
    ya = torch.cat([y for _, y in a.epoch(3)])
    xb = torch.cat([x for x, _ in b.epoch(3)])
    assert torch.equal(xa, xb)  # batch size does not change order or views
    assert not torch.equal(xa, torch.cat([x for x, _ in a.epoch(4)]))
    c = DeviceLoader(s, 8, train=True, crop_padding=2, flip=True, data_seed=8)
    assert not torch.equal(xa, torch.cat([x for x, _ in c.epoch(3)]))
    assert sorted(ya.tolist()) == sorted(s.y.tolist())  # a permutation of the split


def test_crop_and_flip_are_windows_of_the_padded_image():
    s = _split(n=64)
    idx = torch.arange(64)
    out = augment_uint8(s.x, idx, data_seed=1, epoch=0, padding=2, flip=True)
    padded = torch.nn.functional.pad(s.x, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        found = False
        for oy in range(5):
            for ox in range(5):
                win = padded[i, :, oy : oy + 8, ox : ox + 8]
                if torch.equal(out[i], win):
                    found = True
                elif torch.equal(out[i], win.flip(2)):
                    found, flips = True, flips + 1
        assert found, i
    assert 10 < flips < 54  # about half flipped


def test_eval_loader_is_plain_and_normalised():
    s = _split(n=10)
    loader = DeviceLoader(s, 4, train=False, mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=4, flip=True)
    x = torch.cat([x for x, _ in loader.epoch(0)])
    assert len(loader) == 3 and x.shape == (10, 3, 8, 8)
    torch.testing.assert_close(x, (s.x.float() / 255 - 0.5) / 0.25)


def test_lr_schedules():
    kw = dict(epochs=10, milestones=[5, 8], lr_decay=0.1)
    assert lr_factor(0.0, schedule="step", **kw) == 1.0
    assert lr_factor(5.0, schedule="step", **kw) == pytest.approx(0.1)
    assert lr_factor(9.5, schedule="step", **kw) == pytest.approx(0.01)
    assert lr_factor(5.0, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(0.5, schedule="cosine", warmup_epochs=1.0, **kw) == pytest.approx(0.5)
    assert lr_factor(10.0, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)


def test_cifar100_sized_data_resident_within_200_mb():
    """The whole of CIFAR-100 (50k train carved into train + val, 10k test) as the engine holds it on its device."""
    from kdtune.data.base import DataBundle, carve_val

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 100, (50_000,), generator=g)
    train_split, val_split = carve_val(x, y, 0.1, seed=0)
    test = Split(x[:10_000].clone(), y[:10_000].clone())
    bundle = DataBundle(name="cifar100", num_classes=100, in_channels=3, image_size=32, train=train_split,
                        val=val_split, test=test, mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=4, flip=True)  # fmt: skip
    trainer = Trainer(TrainConfig.from_dict(dict(data="cifar100", model="resnet8", epochs=1, device="cpu")),
                      data=bundle)  # fmt: skip
    resident = trainer.data_resident_bytes()
    assert resident == 60_000 * 3 * 32 * 32 + 60_000 * 8  # uint8 images and int64 labels, nothing else
    assert resident / 1e6 <= 200
    assert trainer.train_loader.x.dtype == torch.uint8
