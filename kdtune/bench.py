"""``kdtune bench``: images/s of kdtune's training step against a reference-style loop, side by side.

Both loops train the same teacher/student pair with the same method (vanilla KD) and batch, on the same
images (synthetic CIFAR-shaped data unless ``--data`` names a real data set). Each is timed over ``--repeats``
passes of ``--steps`` steps after ``--warmup`` steps; the table gives the median, min and max images/s, the
FLOPs per image and, on a GPU, the fraction of the device's bf16 dense peak reached. ``--fuse 1 4 8 16`` adds
fused bundles (:mod:`kdtune.engine.bundle`) of K KD students, measured in the same run. Imports nothing of
Ray, Optuna or MLflow.

``--sweep N`` and ``--simulate N`` measure the sweep path instead (:mod:`kdtune.tune.scale`): a real sweep of N
1-epoch toy trials, or N trials that report at once through the sweep's driver; these import Ray, Optuna and MLflow.

More: docs/bench.md (what each loop does, how the FLOPs are counted, the fused columns; Sweep scale).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdtune.engine.bundle import DEFAULT_MODE, MODES
from kdtune.errors import ConfigError

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="resnet32x4", help="teacher architecture (default resnet32x4)")
    p.add_argument("--student", default="resnet8x4", help="student architecture (default resnet8x4)")
    p.add_argument("--batch", type=int, nargs="+", default=[64], help="batch sizes to measure (default 64)")
    p.add_argument(
        "--data", default=None, help="a registered in-memory data set (default: synthetic CIFAR-100)"
    )
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default 20 CPU / 100 GPU)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU / 30 GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of the reference loop (default min(8, CPUs))",
    )
    p.add_argument("--compile", action="store_true", help="also torch.compile kdtune's student")
    p.add_argument("--only", choices=["kdtune", "reference"], default=None, help="measure one loop only")
    p.add_argument(
        "--fuse",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="also measure fused bundles of K students sharing one teacher forward (K = 1 is always added)",
    )
    p.add_argument(
        "--fuse-mode",
        choices=MODES,
        default=DEFAULT_MODE,
        help="how a bundle runs its stacked student (default auto: the fastest exact mode, timed)",
    )
    p.add_argument(
        "--exactness",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="instead of speed: how far a fused member ends from its lone run, per mode (digits, resnet8)",
    )
    p.add_argument(
        "--exact-epochs", type=int, nargs="+", default=[1, 2, 3], metavar="N", help="with --exactness (default 1 2 3)"
    )
    p.add_argument(
        "--method",
        nargs="+",
        default=None,
        metavar="NAME",
        help="also time kdtune's step with these methods (e.g. at sp vid), beside the KD row",
    )
    p.add_argument(
        "--store",
        action="store_true",
        help="also measure the lone trial (and --fuse bundles) reading the teacher store instead of the teacher",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak, if not in the table")
    g = p.add_argument_group("sweep scale (docs/bench.md, Sweep scale)")
    g.add_argument("--sweep", type=int, default=None, metavar="N",
                   help="instead: a real sweep of N 1-epoch KD trials (--spec) and its orchestration per trial, driver "
                   "RSS, MLflow and Optuna latency, `kdtune report` time and 'database is locked' count, beside targets")  # fmt: skip
    g.add_argument("--simulate", type=int, default=None, metavar="N",
                   help="instead: N trials that report at once through the sweep's driver (its Tuner, searcher, scheduler "
                   "and Optuna mirror, an MLflow run each): where the driver's time goes as trials accumulate")  # fmt: skip
    g.add_argument("--spec", default=None, help="the sweep spec of --sweep/--simulate (default sweeps/scale-toy.yaml)")
    g.add_argument("--storage", default=None,
                   help="where its experiment is written and kept (default: a temporary folder, removed after)")  # fmt: skip
    g.add_argument("--concurrency", type=int, default=None, help="trials at a time (default: the spec's)")
    g.add_argument("--probes", type=int, default=10, help="MLflow probes as the experiment grows (default 10)")
    g.add_argument("--bucket", type=int, default=500, help="--simulate: trials per row of its table (default 500)")
    g.add_argument("--tpe-window", type=int, default=None, metavar="W",
                   help="--simulate: the searcher's TPE reads the best 25 and the W most recent trials (kdtune's bound: "
                   "1000); 0: Optuna's TPE reading every trial")  # fmt: skip
    g.add_argument("--tpe-sizes", type=int, nargs="*", default=None, metavar="S",
                   help="--simulate: also time TPE's ask on studies of these sizes per sampler knob (default: those of "
                   "500 2000 5000 10000 up to N; none: skip)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- data
def synthetic_bundle(n_train: int, num_classes: int = 100, size: int = 32, seed: int = 0):
    from kdtune.data.base import DataBundle, Split

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_train, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, num_classes, (n_train,), generator=g)
    test = Split(x[:256].clone(), y[:256].clone())
    empty = Split(x[:0], y[:0])
    return DataBundle(
        name="synthetic-cifar100",
        num_classes=num_classes,
        in_channels=3,
        image_size=size,
        train=Split(x, y),
        val=empty,
        test=test,
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
        crop_padding=4,
        flip=True,
    )


class PILDataset(torch.utils.data.Dataset):
    """The torchvision CIFAR pattern: uint8 HWC array -> PIL image -> transforms, one image at a time."""

    def __init__(self, x_nchw: torch.Tensor, y: torch.Tensor, mean, std, padding: int, flip: bool):
        import torchvision.transforms as T

        self.x = x_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.y = y.tolist()
        size = self.x.shape[1]
        aug = [T.RandomCrop(size, padding=padding)] if padding else []
        aug += [T.RandomHorizontalFlip()] if flip else []
        self.transform = T.Compose([*aug, T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        img = self.x[i]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), self.y[i]


# ---------------------------------------------------------------------------------------------- loops
def _time_passes(run_steps, warmup: int, steps: int, repeats: int, sync) -> list[float]:
    """Seconds of each timed pass of ``steps`` steps, after ``warmup`` untimed steps."""
    if warmup:
        run_steps(warmup)
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_steps(steps)
        sync()
        out.append(time.perf_counter() - t0)
    return out


def reference_loop(bundle, teacher, student, batch: int, device, workers: int, warmup, steps, repeats):
    """The public repositories' loop: DataLoader + PIL transforms, fp32, teacher under no_grad."""
    from kdtune.losses.kd import kd

    ds = PILDataset(bundle.train.x, bundle.train.y, bundle.mean, bundle.std, bundle.crop_padding, bundle.flip)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    teacher.eval()
    student.train()
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    def run_steps(n: int) -> None:
        for _ in range(n):
            x, y = next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = 0.1 * F.cross_entropy(s, y) + 0.9 * kd(s, t, 4.0)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return _time_passes(run_steps, warmup, steps, repeats, lambda: _sync(device))


def kdtune_loop(
    bundle, teacher_ckpt: str, student_arch: str, batch: int, device, compile_: bool, warmup, steps, repeats,
    store_dir: str | None = None, method: str = "kd",
):
    """The engine's own training pass (Trainer.train_pass) with ``method``; with ``store_dir``, reading the
    teacher store there (epoch 0 is written first, untimed, and every timed step reads it)."""
    from kdtune.config import TrainConfig
    from kdtune.engine.trainer import Trainer

    cfg = TrainConfig.from_dict(
        dict(
            data="cifar100",
            model=student_arch,
            teacher=teacher_ckpt,
            method=method,
            batch_size=batch,
            epochs=1,
            device=str(device),
            compile=compile_,
            val_fraction=0.0,
            lr=0.05,
            teacher_store="on" if store_dir else "off",
            teacher_store_dir=store_dir,
        )
    )
    trainer = Trainer(cfg, data=bundle)
    run_steps = _stepper(trainer.train_pass, store_dir is not None)
    if store_dir is not None:
        _fill_store(trainer)
    return _time_passes(run_steps, warmup, steps, repeats, lambda: _sync(device))


def _stepper(train_pass, stored: bool):
    """``run_steps(n)``: n optimiser steps through ``train_pass``, on from epoch to epoch; on epoch 0 again and
    again where the teacher store serves it (the only epoch the benchmark stores)."""
    state = {"epoch": 0}

    def run_steps(n: int) -> None:
        left = n
        while left > 0:
            _, done, _, _ = train_pass(state["epoch"], max_steps=left)
            left -= done
            if left > 0 and not stored:
                state["epoch"] += 1

    return run_steps


def _fill_store(trainer) -> None:
    """Write the teacher store's epoch 0 (a whole untimed training pass) unless it is there already."""
    if 0 not in trainer.store.epochs():
        trainer.train_pass(0)
    if 0 not in trainer.store.epochs():
        raise ConfigError(f"the teacher store under {trainer.store.dir} could not be written; see the log above")


def fused_steps(bundle, teacher_ckpt: str, student_arch: str, batch: int, device, k: int, mode: str = DEFAULT_MODE,
                store_dir: str | None = None):
    """``(run_steps(n), mode)`` of a :class:`~kdtune.engine.bundle.Bundle` of ``k`` KD students (lr and seed
    differ per member): one teacher forward and one backward per step for all ``k``; ``mode`` is the one the
    bundle runs (``"auto"`` resolved)."""
    from kdtune.config import TrainConfig
    from kdtune.engine.bundle import Bundle

    cfgs = [
        TrainConfig.from_dict(
            dict(
                data="cifar100",
                model=student_arch,
                teacher=teacher_ckpt,
                method="kd",
                batch_size=batch,
                epochs=1,
                device=str(device),
                val_fraction=0.0,
                lr=0.05 * (1 + 0.01 * i),
                seed=i,
                teacher_store="on" if store_dir else "off",
                teacher_store_dir=store_dir,
            )
        )
        for i in range(k)
    ]
    fused = Bundle(cfgs, data=bundle, mode=mode, allow_inexact=True)  # timed as asked; the table says "not exact"
    run_steps = _stepper(fused.train_pass, store_dir is not None)
    if store_dir is not None:
        _fill_store(fused.shared)

    return run_steps, fused.mode if fused.exact else f"{fused.mode} (not exact)"


def time_interleaved(runners: dict, warmup: int, steps: int, repeats: int, sync) -> dict[int, list[float]]:
    """Seconds of each timed pass per runner, the runners' repeats interleaved (r1: all K, r2: all K, ...) so
    that a change of the machine's load touches every K alike (the machine may be shared)."""
    for run_steps in runners.values():
        if warmup:
            run_steps(warmup)
    out: dict[int, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, run_steps in runners.items():
            sync()
            t0 = time.perf_counter()
            run_steps(steps)
            sync()
            out[k].append(time.perf_counter() - t0)
    return out


def fused_rows(secs_by_k: dict[int, list[float]], batch: int, steps: int, modes: dict[int, str] | None = None) -> list[dict]:
    """One row per K. ``member_images_per_s``: the images/s each member trains at (median over the repeats);
    ``total_images_per_s``: K times that, the member-images the bundle trains per second; ``ratio_to_1``: the
    total over K = 1's, the bundle's speed-up for a sweep; ``best_*``: the same from the fastest repeat (a
    shared machine's load slows some repeats)."""
    rows = []
    per = {k: [batch * steps / s for s in secs] for k, secs in secs_by_k.items()}
    one, one_best = statistics.median(per[1]), max(per[1])
    for k in sorted(per):
        med, best = statistics.median(per[k]), max(per[k])
        rows.append(
            {
                "fuse": k,
                "mode": (modes or {}).get(k),
                "member_images_per_s": med,
                "total_images_per_s": k * med,
                "ratio_to_1": k * med / one,
                "best_total_images_per_s": k * best,
                "best_ratio_to_1": k * best / one_best,
                "member_images_per_s_runs": per[k],
            }
        )
    return rows


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- FLOPs
def flops_per_image(teacher, student, in_shape, device) -> tuple[float, float]:
    """(teacher forward, student forward+backward) FLOPs for one image, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *in_shape, device=device)
    teacher.eval()
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            teacher(x)
    t = fc.get_total_flops() / 2
    student.train()
    with FlopCounterMode(display=False) as fc:
        student(x).sum().backward()
    student.zero_grad(set_to_none=True)
    s = fc.get_total_flops() / 2
    return float(t), float(s)


def bf16_peak(device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


# ---------------------------------------------------------------------------------------------- main
def run(args) -> list[dict]:
    from kdtune.data import load_data
    from kdtune.engine.trainer import resolve_device
    from kdtune.losses import METHODS
    from kdtune.models import create_model
    from kdtune.models.checkpoint import save_model

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (100 if gpu else 20)
    warmup = args.warmup if args.warmup is not None else (30 if gpu else 3)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    for name, v in (("--steps", steps), ("--repeats", args.repeats)):
        if v < 1:
            raise ConfigError(f"{name}={v} is out of range; it must be >= 1")
    fuse = getattr(args, "fuse", None)
    if fuse is not None and any(k < 1 for k in fuse):
        raise ConfigError(f"--fuse {fuse} is out of range; bundle sizes must be >= 1")
    if any(b < 1 for b in args.batch):
        raise ConfigError(f"--batch {args.batch} is out of range; batch sizes must be >= 1")
    need = max(args.batch) * (steps + warmup + 1)
    if args.data:
        bundle = load_data(args.data, root=args.data_root, val_fraction=0.0)
        if not bundle.in_memory:
            raise ConfigError(f"--data {args.data} is a folder data set; bench measures in-memory data sets")
    else:
        # CRD draws 16384 negatives of other classes per sample: a CIFAR-sized split for methods with indices
        full = any(METHODS.get(m).needs_indices for m in getattr(args, "method", None) or [])
        bundle = synthetic_bundle(50_000 if full else min(max(need, 4096), 50_000))
    in_shape = tuple(bundle.train.x.shape[1:])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        teacher = create_model(args.teacher, bundle.num_classes, bundle.in_channels)
        ckpt = str(Path(tmp) / "teacher.pt")
        heads = None  # HSAKD reads the teacher's rotation heads: untrained ones cost the same step
        if any(METHODS.get(m).needs_teacher_heads for m in getattr(args, "method", None) or []):
            from kdtune.models.aux_heads import build_aux_heads

            heads = build_aux_heads(teacher, bundle.num_classes).state_dict()
        save_model(ckpt, teacher, args.teacher, bundle.num_classes, bundle.in_channels, {"bench": True},
                   aux_heads=heads)  # fmt: skip
        student = create_model(args.student, bundle.num_classes, bundle.in_channels)
        t_flops, s_flops = flops_per_image(teacher, student, in_shape, torch.device("cpu"))
        peak = bf16_peak(device, args.peak_tflops)
        for batch in args.batch:
            row = {
                "batch": batch,
                "device": _device_name(device),
                "teacher": args.teacher,
                "student": args.student,
                "flops_per_image": t_flops + s_flops,
                "teacher_flops": t_flops,
                "student_flops": s_flops,
                "steps": steps,
                "repeats": args.repeats,
                "workers": workers,
                "torch": torch.__version__,
            }
            if args.only != "kdtune":
                ref_t = create_model(args.teacher, bundle.num_classes, bundle.in_channels).to(device)
                ref_t.load_state_dict(teacher.state_dict())
                ref_s = create_model(args.student, bundle.num_classes, bundle.in_channels).to(device)
                secs = reference_loop(
                    bundle, ref_t, ref_s, batch, device, workers, warmup, steps, args.repeats
                )
                row["reference"] = [batch * steps / s for s in secs]
                del ref_t, ref_s
            if args.only != "reference":
                secs = kdtune_loop(
                    bundle, ckpt, args.student, batch, device, False, warmup, steps, args.repeats
                )
                row["kdtune"] = [batch * steps / s for s in secs]
                for name in args.method or []:  # a method's step beside KD's, same pair and batches
                    secs = kdtune_loop(bundle, ckpt, args.student, batch, device, False, warmup, steps, args.repeats,
                                       method=name)  # fmt: skip
                    row[f"method:{name}"] = [batch * steps / s for s in secs]
                if args.compile:
                    secs = kdtune_loop(
                        bundle, ckpt, args.student, batch, device, True, warmup, steps, args.repeats
                    )
                    row["kdtune+compile"] = [batch * steps / s for s in secs]
                if args.store:
                    secs = kdtune_loop(bundle, ckpt, args.student, batch, device, False, warmup, steps, args.repeats,
                                       store_dir=str(Path(tmp) / "store"))  # fmt: skip
                    row["kdtune+store"] = [batch * steps / s for s in secs]
            if fuse is not None and args.only != "reference":
                mode = getattr(args, "fuse_mode", DEFAULT_MODE)
                store = str(Path(tmp) / "store") if args.store else None
                built = {k: fused_steps(bundle, ckpt, args.student, batch, device, k, mode, store)
                         for k in sorted({1, *fuse})}  # fmt: skip
                runners = {k: run_steps for k, (run_steps, _) in built.items()}
                secs_by_k = time_interleaved(runners, warmup, steps, args.repeats, lambda: _sync(device))
                row["fused"] = fused_rows(secs_by_k, batch, steps, {k: m for k, (_, m) in built.items()})
                row["fused_store"] = bool(args.store)
                del runners, built
            row["peak_flops"] = peak
            results.append(row)
    return results


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


LOOP_LABELS = {
    "reference": "reference (DataLoader+PIL, fp32)",
    "kdtune": "kdtune (device-resident, bf16 on GPU)",
    "kdtune+compile": "kdtune + torch.compile",
    "kdtune+store": "kdtune + teacher store",
}


def format_table(results: list[dict]) -> str:
    from kdtune.tables import table

    def indent(text: str) -> list[str]:
        return ["  " + ln for ln in text.splitlines()]

    lines = []
    for row in results:
        gf = row["flops_per_image"] / 1e9
        lines.append(
            f"{row['teacher']} -> {row['student']}, method kd, batch {row['batch']}, {row['device']}, "
            f"torch {row['torch']}; {gf:.3f} GFLOP/image (teacher fwd {row['teacher_flops'] / 1e9:.3f} + "
            f"student fwd+bwd {row['student_flops'] / 1e9:.3f}); median of {row['repeats']} x {row['steps']} steps"
        )
        peak = row.get("peak_flops")
        head = ["loop", "img/s median", "min", "max", "vs ref"] + (["% bf16 peak"] if peak else [])
        ref = statistics.median(row["reference"]) if "reference" in row else None
        body = []
        labels = {**LOOP_LABELS, **{k: f"kdtune, method {k.split(':', 1)[1]}" for k in row if k.startswith("method:")}}
        for key, label in labels.items():
            if key not in row:
                continue
            vals = row[key]
            med = statistics.median(vals)
            if key.startswith("method:") and row.get("kdtune"):
                label += f" (step {statistics.median(row['kdtune']) / med:.2f}x KD's)"
            cells = [label, f"{med:,.0f}", f"{min(vals):,.0f}", f"{max(vals):,.0f}", f"{med / ref:.2f}x" if ref else "-"]
            if peak:
                cells.append(f"{100 * med * row['flops_per_image'] / peak:.1f}%")
            body.append(cells)
        lines += indent(table(head, body, align=["left"] + ["right"] * (len(head) - 1)))
        if row.get("fused"):
            how = "reading the teacher store" if row.get("fused_store") else "one teacher forward per batch"
            lines.append(
                f"  fused bundles of K students, {how} (median / fastest repeat; ratio: total member-images/s vs "
                "K = 1; vs lone: a member's images/s over the lone online kdtune loop's)"
            )
            lone = statistics.median(row["kdtune"]) if row.get("kdtune") else None
            head = ["K", "mode", "member img/s", "total img/s", "vs K=1", "best total", "vs K=1", "vs lone"]
            body = [[str(f["fuse"]), f.get("mode") or "-", f"{f['member_images_per_s']:,.1f}", f"{f['total_images_per_s']:,.1f}",
                     f"{f['ratio_to_1']:.2f}x", f"{f['best_total_images_per_s']:,.1f}", f"{f['best_ratio_to_1']:.2f}x",
                     f"{f['member_images_per_s'] / lone:.2f}x" if lone else "-"]
                    for f in row["fused"]]  # fmt: skip
            lines += indent(table(head, body, align=["right"] * len(head)))
        lines.append("")
    return "\n".join(lines).rstrip()


def main(args) -> int:
    if getattr(args, "sweep", None) is not None or getattr(args, "simulate", None) is not None:
        return scale_main(args)
    if args.exactness:
        return exactness_main(args)
    results = run(args)
    print(format_table(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def exactness_main(args) -> int:
    """``kdtune bench --exactness``: the table of :mod:`kdtune.engine.exactness`, a line per run as it ends."""
    from kdtune.engine.exactness import measure, table

    if any(n < 1 for n in args.exact_epochs):
        raise ConfigError(f"--exact-epochs {args.exact_epochs}: each must be at least 1")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device

    def say(row):
        ran = f" ran {row['ran']}" if row["ran"] and row["ran"] != row["mode"] else ""
        exact = "" if row["exact"] is None else (" exact" if row["exact"] else " not exact")
        print(f"  {row['method']} {row['epochs']} epochs {row['mode']}{ran}{exact}: {row['max_rel']:.1e}", flush=True)

    rows = measure(args.exactness, args.exact_epochs, device=device, progress=say)
    print(table(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- sweep scale
def default_scale_spec() -> Path:
    """``sweeps/scale-toy.yaml`` of the working directory, else of kdtune's checkout."""
    here = Path("sweeps/scale-toy.yaml")
    return here if here.is_file() else Path(__file__).resolve().parents[1] / "sweeps" / "scale-toy.yaml"


def scale_main(args) -> int:
    """``kdtune bench --sweep N`` / ``--simulate N``: the figures of :mod:`kdtune.tune.scale`, printed beside the
    issue's targets; ``--json FILE`` writes them all."""
    from kdtune.tune import scale

    if args.sweep is not None and args.simulate is not None:
        raise ConfigError("--sweep and --simulate are two benchmarks: give one")
    n = args.sweep if args.sweep is not None else args.simulate
    for name, v in (("--sweep/--simulate", n), ("--probes", args.probes), ("--bucket", args.bucket)):
        if v < 1:
            raise ConfigError(f"{name}={v} is out of range; it must be >= 1")
    if args.tpe_window is not None and 0 < args.tpe_window < 250 or (args.tpe_window or 0) < 0:
        raise ConfigError(f"--tpe-window {args.tpe_window}: 0 (unbounded) or at least 250 (TPE's best 25 are a tenth "
                          "of its trials)")  # fmt: skip
    spec = Path(args.spec) if args.spec else default_scale_spec()
    storage = args.storage or tempfile.mkdtemp(prefix="kdtune-scale-")
    try:
        if args.sweep is not None:
            fig = scale.sweep_bench(n, spec, storage, args.concurrency, args.probes)
            text = format_sweep(fig)
        else:
            sizes = args.tpe_sizes if args.tpe_sizes is not None else [s for s in (500, 2000, 5000, 10000) if s <= max(n, 500)]
            fig = scale.simulate(n, spec, storage, args.concurrency, args.bucket, args.tpe_window, args.probes, sizes)
            text = format_simulation(fig)
        print(text, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(fig, indent=2, default=str))
    finally:
        if not args.storage:
            shutil.rmtree(storage, ignore_errors=True)
    return 0


def _ms(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _verdict(v, target) -> str:
    return "-" if v is None else ("ok" if v <= target else "MISSED")


def format_sweep(f: dict) -> str:
    """The figures of ``--sweep``, each beside its target."""
    from kdtune.tables import table
    from kdtune.tune.scale import LOCKED

    o, r, rep, lk, t = f["orchestration"], f["rss"], f["report"], f["locked"], f["targets"]
    lines = [f"kdtune bench --sweep {f['trials']}: a real sweep ({f['spec']}), {f['concurrency']} slots, "
             f"{f['finished']} trials finished in {f['wall_s']:.0f} s ({f['stages_s'] or 0:.0f} s of stages); "
             f"experiment {f['experiment']}", f"per trial, {o['trials'] - o['slots']} trials after the first of each "
             f"of {o['slots']} slots (ms):"]  # fmt: skip
    names = {"orch": "orchestration: slot time - train - eval", "start": "  trial start (open -> start)",
             "epoch": "  the epoch's bookkeeping (start -> epoch - train - eval)", "close": "  close (epoch -> done)",
             "report": "  Tune's report (done -> closed)", "gap": "  between trials on a slot (Tune + driver)",
             "work": "train + eval (not orchestration)"}  # fmt: skip
    body = [[label, _ms(o[k]["median"]), _ms(o[k]["p90"]), f"<= {t['orch_ms']:.0f}" if k == "orch" else "",
             _verdict(o[k]["median"], t["orch_ms"]) if k == "orch" else ""] for k, label in names.items()]  # fmt: skip
    lines += table(["", "median", "p90", "target", "verdict"], body).splitlines()
    util = f"{100 * f['slot_utilisation']:.1f}%" if f["slot_utilisation"] is not None else "-"
    lines.append(f"slot utilisation: {util} (the driver's: trial processes' open -> closed over slots x the fit's wall); "
                 f"held {100 * (o['held'] or 0):.1f}% and training {100 * (o['training'] or 0):.1f}% of first open -> last closed")  # fmt: skip
    lines.append(f"driver RSS: {_ms(r['start_mb'])} MB after the first trial, {_ms(r['end_mb'])} MB at the last, peak "
                 f"{_ms(r['peak_mb'])}; growth {_ms(r['per_1000_trials_mb'])} MB per 1,000 finished trials (least "
                 f"squares over {r['samples']} samples), target <= {t['rss_mb_per_1000']:.0f}: "
                 f"{_verdict(r['per_1000_trials_mb'], t['rss_mb_per_1000'])}")  # fmt: skip
    if f["mlflow"]:
        keys = ["lookup_ms", "create_ms", "log_metrics_ms", "set_tags_ms", "end_ms"]
        lines.append("MLflow on the experiment's store, by trials finished (median of 3 probes, ms; the last: after the sweep):")
        lines += table(["trials", "lookup by trial id", "create_run", "log_metrics", "set_tags", "end"],
                       [[p["trials"], *(_ms(p.get(k)) for k in keys)] for p in f["mlflow"]]).splitlines()  # fmt: skip
    lines += calls_table(f["driver_calls"])
    ok = f["trials"] >= t["report_trials"]
    lines.append(f"kdtune report: {rep['wall_s']:.1f} s, peak RSS {rep['peak_rss_mb']:.0f} MB (exit {rep['rc']}); target <= "
                 f"{t['report_s']:.0f} s on {t['report_trials']:,} trials: "
                 + (_verdict(rep["wall_s"], t["report_s"]) if ok else f"not judged on {f['trials']} trials"))  # fmt: skip
    lines.append(f"\"{LOCKED}\": {lk['count']} (in {lk['files']} files: the experiment folder, the Ray session's logs; "
                 f"and the driver's and the report's output), target 0: {_verdict(lk['count'], 0)}")  # fmt: skip
    return "\n".join(lines)


def calls_table(calls: dict) -> list[str]:
    """The driver's timed calls by buckets (``scale.timed``)."""
    from kdtune.tables import table

    labels = {"ask": "searcher ask", "tell": "Optuna tell", "mirror": "mirror to optuna.db", "snapshot": "Tune snapshot"}
    rows = [[labels.get(k, k), b["calls"], b["n"], _ms(b["median"]), _ms(b["p90"])] for k, bs in calls.items() for b in bs]
    if not rows:
        return []
    return ["the driver's calls, by buckets of calls (the k-th ask sees a study of k - 1 trials; snapshots: every 2 s; ms):",
            *table(["call", "calls", "n", "median", "p90"], rows).splitlines()]


def format_simulation(f: dict) -> str:
    """The figures of ``--simulate``: totals, the trials' figures by buckets, the driver's calls, TPE by study size."""
    from kdtune.tables import table

    w = f["tpe_window"]
    tpe = ("Optuna's TPE reading every trial" if w == 0 else f"TPE windowed to the best 25 + {w} most recent" if w
           else "TPE as kdtune makes it (best 25 + 1000 most recent)")  # fmt: skip
    share = ", ".join(f"{k} {v:.1f}%" for k, v in f["driver_share_pct"].items())
    lines = [f"kdtune bench --simulate {f['trials']}: trials that report at once through the sweep's driver (its Tuner, "
             f"searcher with {tpe}, scheduler, Optuna mirror; an MLflow run per trial), {f['concurrency']} slots",
             f"fit {f['fit_s']:.1f} s, {f['trials_per_s']:.2f} trials/s; a trial's slot time median {_ms(f['slot_ms']['median'])} "
             f"ms (p90 {_ms(f['slot_ms']['p90'])}), between trials on a slot {_ms(f['gap_ms']['median'])} ms (p90 "
             f"{_ms(f['gap_ms']['p90'])})", f"the driver's time in its calls, share of the fit's wall: {share}",
             f"per bucket of {f['bucket']} trials, medians (ms): the trial's record (TrialRecord: its MLflow run and events), "
             "the trial, the time before it on its slot (Tune + driver), and the driver's RSS at the bucket's end:"]  # fmt: skip
    keys = [("trials", "trials"), ("rec_open_run", "open_run (run, params, tags)"), ("rec_epoch", "epoch (hand-off, event)"),
            ("rec_close", "close (metrics, outcome, end)"), ("in_trial", "in trial"), ("gap", "between trials"),
            ("rss_mb", "driver RSS MB")]  # fmt: skip
    rows = [[b.get(k) if k == "trials" else _ms(b.get(k)) for k, _ in keys] for b in f["buckets"]]
    lines += table([h for _, h in keys], rows).splitlines()
    lines += calls_table(f["driver_calls"])
    r = f["rss"]
    lines.append(f"driver RSS: {_ms(r['start_mb'])} -> {_ms(r['end_mb'])} MB (peak {_ms(r['peak_mb'])}); growth "
                 f"{_ms(r['per_1000_trials_mb'])} MB per 1,000 finished trials, target <= {f['targets']['rss_mb_per_1000']:.0f}: "
                 f"{_verdict(r['per_1000_trials_mb'], f['targets']['rss_mb_per_1000'])}")  # fmt: skip
    if f["mlflow"]:
        lines.append("MLflow lookup of a trial id among the experiment's runs, by trials finished (median of 3, ms): "
                     + ", ".join(f"{p['trials']}: {_ms(p.get('lookup_ms'))}" for p in f["mlflow"]))  # fmt: skip
    if f["tpe"]:
        lines.append("TPE's ask (ask + the space; a tell after each) on an in-memory study of N complete trials of the "
                     "space, median of 10 (ms):")
        lines += table(list(f["tpe"][0]), [list(r.values()) for r in f["tpe"]]).splitlines()
    return "\n".join(lines)
