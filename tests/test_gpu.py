"""The CUDA paths: bf16 autocast, channels_last, the device-resident loader on the GPU, and `kdtune bench`
reaching a fraction of the bf16 peak. Marked `gpu` (run with `pytest -m gpu` on a machine with CUDA); the
same code runs on the CPU in test_engine.py and test_data.py."""

from __future__ import annotations

import math

import pytest
import torch

from kdtune.config import TrainConfig
from kdtune.data.base import Split
from kdtune.data.loader import DeviceLoader, augment_uint8
from kdtune.engine import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _bundle(n=2048, classes=100):
    from kdtune.bench import synthetic_bundle

    return synthetic_bundle(n, num_classes=classes)


def test_bf16_channels_last_training_on_cuda(tmp_path):
    cfg = TrainConfig.from_dict(dict(data="cifar100", model="resnet8x4", method="ce", epochs=2, batch_size=256,
                                     device="cuda", val_fraction=0.0))  # fmt: skip
    trainer = Trainer(cfg, data=_bundle())
    assert trainer.device.type == "cuda" and trainer.amp_dtype == torch.bfloat16
    conv = next(m for m in trainer.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.train_loader.x.device.type == "cuda" and trainer.train_loader.x.dtype == torch.uint8
    history = list(trainer.run())
    assert all(math.isfinite(m["train_loss"]) for m in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 1.05


def test_views_are_identical_on_cpu_and_gpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    idx = torch.arange(64)
    cpu = augment_uint8(x, idx, data_seed=3, epoch=5, padding=4, flip=True)
    gpu = augment_uint8(x.cuda(), idx.cuda(), data_seed=3, epoch=5, padding=4, flip=True)
    assert torch.equal(cpu, gpu.cpu())
    loader = DeviceLoader(Split(x, torch.zeros(64, dtype=torch.int64)), 16, train=True, device="cuda",
                          crop_padding=4, flip=True, channels_last=True)  # fmt: skip
    xb, yb = next(iter(loader.epoch(0)))
    assert xb.is_cuda and xb.dtype == torch.float32 and xb.is_contiguous(memory_format=torch.channels_last)


def test_bench_reports_the_peak_fraction_on_gpu(tmp_path):
    import json

    from kdtune.cli import main

    out = tmp_path / "bench.json"
    rc = main(
        ["bench", "--batch", "128", "--steps", "10", "--warmup", "5", "--repeats", "2", "--json", str(out)]
    )
    assert rc == 0
    (row,) = json.loads(out.read_text())
    from kdtune.bench import BF16_PEAK_TFLOPS

    assert not row["device"].startswith("cpu")
    if any(k in row["device"] for k in BF16_PEAK_TFLOPS):  # a device of the peak table: the share is printed
        assert row["peak_flops"] > 1e14
    assert min(row["kdtune"]) > 0 and min(row["reference"]) > 0


def test_grouped_bundle_on_cuda_stays_grouped_and_trains(tmp_path):
    """The grouped student passes its channel probe on the GPU (TF32 and bf16 rounding are not a mixed channel),
    runs by name with allow_inexact (its exactness probe says whether it is bit for bit the lone kernels), its
    members train, and member 1's logits are those of its own weights run alone (bf16 autocast tolerance);
    auto picks an exact mode on the GPU."""
    from torch.func import functional_call

    from kdtune.engine import Bundle
    from kdtune.models import create_model
    from kdtune.models.checkpoint import save_model

    teacher = tmp_path / "t.pt"
    save_model(teacher, create_model("resnet32x4", 100, 3), "resnet32x4", 100, 3, {})
    base = dict(data="cifar100", model="resnet8x4", method="kd", teacher=str(teacher), epochs=1, batch_size=64,
                device="cuda", val_fraction=0.0)  # fmt: skip
    cfgs = [TrainConfig.from_dict(dict(base, seed=s, lr=0.05 / (s + 1))) for s in range(4)]
    auto = Bundle(cfgs, data=_bundle(512))
    assert auto.exact and auto.mode_exact[auto.mode] and auto.device.type == "cuda"
    bundle = Bundle(cfgs, data=_bundle(512), mode="grouped", allow_inexact=True)
    assert bundle.mode == "grouped" and bundle.device.type == "cuda"
    (epoch,) = list(bundle.run())
    assert [m["member"] for m in epoch] == [0, 1, 2, 3] and all(math.isfinite(m["train_loss"]) for m in epoch)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    bundle._train_mode(False)
    with torch.no_grad():
        got = bundle._forward_eval(bundle.params, bundle.buffers, x).float()
        student = bundle.sync_member(1).student.eval()
        want = functional_call(student, dict(student.named_parameters()) | dict(student.named_buffers()), (x,))
    assert (got[1] - want).abs().max().item() <= 2e-2 * want.abs().max().clamp_min(1.0).item()
