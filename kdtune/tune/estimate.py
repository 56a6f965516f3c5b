"""A planned sweep's GPU time, before anything runs: ``estimate(plan, ...) -> Estimate`` (``kdtune validate``).

Contract: the sum over the work of a :class:`~kdtune.tune.plan.SweepPlan` (each group's trials and repeats, each
stage: teachers, CE students, HSAKD heads) of epochs x training images per epoch x seconds per training image of
its (teacher, model, method); as an upper bound (every trial to its last epoch) and as the expected figure under
the spec's ASHA (the standard successive-halving budget, :func:`asha_epochs`). Seconds per image are counted
FLOPs per image over a throughput: measured (``--step-times``, a ``kdtune bench --json`` file: its images/s,
scaled to other pairs and methods by counted FLOPs) or assumed (a share of a device's bf16 peak, said so).
FLOPs come from ``step_flops.json`` beside this file (a training step of the engine counted by torch's
FlopCounterMode, one entry per teacher, model, image size, classes and channels; :func:`update_table`, ``python
-m kdtune.tune.estimate SPEC...``); where it lacks an entry they are counted live (teacher forward and model
forward+backward) with the method's ratio from the table. Never reads the data set; imports torch only to count.
More: docs/estimate.md.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kdtune.errors import ConfigError
from kdtune.names import DATASET_IMAGE_SIZES, DATASET_SHAPES

TABLE = Path(__file__).with_name("step_flops.json")
ASSUMED_SHARE = 0.40  # the project's target: 40 % of the device's bf16 dense peak (README, kdtune bench)
# Step time / KD's, measured on the CPU (README, 2026-12-05): a method's cost where no count is at hand.
CPU_STEP_RATIOS = {"crd": 1.11, "reviewkd": 1.48, "hsakd": 7.5}
# Training images before the validation split is carved (the 80 % of digits that is not its test split).
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "digits": 1_437, "tiny-imagenet": 100_000,
                "imagenet": 1_281_167, "disk-intervals": 1_000, "disk-gaussians": 1_000, "mse-gauss": 5_000}  # fmt: skip
# Toys whose validation split is a draw of its own: the training split is used whole.
SEPARATE_VAL = ("disk-intervals", "disk-gaussians", "mse-gauss")


def train_images(data: str, val_fraction: float) -> int:
    """Training images per epoch (the validation split carved per class: within a few images of this)."""
    if data not in TRAIN_IMAGES:
        raise ValueError(f"no training-set size known for data set {data!r} (add it to TRAIN_IMAGES)")
    n = TRAIN_IMAGES[data]
    return n if data in SEPARATE_VAL else round(n * (1 - val_fraction))


def asha_epochs(n: int, max_t: int, grace: int, factor: float) -> float:
    """Epochs that ``n`` trials train under successive halving: all reach ``grace``, then past each rung
    ``grace * factor**k`` (below ``max_t``) go on ``floor(n / factor**(k+1))`` of them, at least one, to ``max_t``."""
    rungs, r = [], float(grace)
    while r < max_t:
        rungs.append(math.ceil(r))
        r *= factor
    ends, total, start = [*rungs, max_t], 0.0, 0
    for k, end in enumerate(ends):
        total += max(1, math.floor(n / factor**k)) * (end - start)
        start = end
    return total


class Work(NamedTuple):
    """Training the sweep will do: ``epochs`` (expected: ``expected`` epochs) of ``model`` with ``method``."""

    name: str
    teacher: str | None
    model: str
    method: str
    batch: int
    epochs: float
    expected: float | None


def plan_work(plan) -> list[Work]:
    """The plan's stages, groups (their trials) and repeats (``repeats - 1`` more full runs of each group)."""
    from kdtune.config import TrainConfig
    from kdtune.spec_model import default_grace_period

    spec, out = plan.spec, []
    arch_of = {}
    for tp in plan.teachers.values():
        arch_of.update({str(p): tp.arch for p in (tp.path, tp.stage and tp.stage.model_path, tp.heads and
                                                  tp.heads.model_path) if p})  # fmt: skip
    for st in plan.stages.values():
        c = TrainConfig.from_dict(st.config)
        out.append(Work(st.name, arch_of.get(str(c.teacher)) if c.teacher else None, c.model, c.method,
                        c.batch_size, c.epochs, c.epochs))  # fmt: skip
    s = spec.scheduler
    grace, more = s.grace_period or default_grace_period(spec.budget.epochs), spec.budget.repeats - 1
    for g in plan.groups:
        c = TrainConfig.from_dict(g.base)
        n, e = g.budget, c.epochs
        expected = {"asha": asha_epochs(n, e, min(grace, e), s.reduction_factor), "none": n * e}.get(s.name)
        out.append(Work(g.name, g.teacher_arch, g.student, g.method, c.batch_size, (n + more) * e,
                        None if expected is None else expected + more * e))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- FLOPs
def entry_key(teacher: str | None, model: str, data: str) -> str:
    classes, channels = DATASET_SHAPES[data]
    pair = f"{teacher}->{model}" if teacher else model
    return f"{pair}@{DATASET_IMAGE_SIZES.get(data) or 'vector'}/{classes}c/{channels}ch"


def load_table(path: Path = TABLE) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"entries": {}}


def _inputs(data: str, n: int):
    import torch

    classes, channels = DATASET_SHAPES[data]
    size = DATASET_IMAGE_SIZES.get(data)
    g = torch.Generator().manual_seed(0)
    if size is None:  # a vector data set (the toys)
        return torch.randn(n, channels, generator=g), torch.randint(0, classes, (n,), generator=g)
    return (torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, classes, (n,), generator=g))  # fmt: skip


def count_models(teacher: str | None, model: str, data: str) -> tuple[float, float]:
    """(teacher forward, model forward + backward) FLOPs per image, as ``kdtune bench`` counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kdtune.models import create_model

    classes, channels = DATASET_SHAPES[data]
    x = _inputs(data, 2)[0].float()
    with torch.random.fork_rng():
        t_flops = 0.0
        if teacher:
            t = create_model(teacher, classes, channels).eval()
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                t(x)
            t_flops = fc.get_total_flops() / 2
        m = create_model(model, classes, channels).train()
        with FlopCounterMode(display=False) as fc:
            m(x).sum().backward()
    return float(t_flops), float(fc.get_total_flops() / 2)


def count_step(
    teacher: str | None, model: str, method: str, data: str, batch: int, hp: dict | None = None
) -> float:
    """FLOPs per source image of one training step of the engine (``Trainer.train_pass``) on synthetic data of
    ``data``'s shape: teacher, model, the method's own modules and transforms (HSAKD's rotations), backward."""
    import tempfile

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kdtune.config import TrainConfig
    from kdtune.data.base import DataBundle, Split
    from kdtune.engine.trainer import Trainer
    from kdtune.losses import METHODS
    from kdtune.models import create_model
    from kdtune.models.aux_heads import build_aux_heads
    from kdtune.models.checkpoint import save_model

    classes, channels = DATASET_SHAPES[data]
    size = DATASET_IMAGE_SIZES.get(data)
    cls = METHODS.get(method)
    x, y = _inputs(data, train_images(data, 0.1) if cls.needs_indices else 2 * batch)
    norm = {"mean": (0.5,) * channels, "std": (0.25,) * channels} if size else {}
    bundle = DataBundle(name=data, num_classes=classes, in_channels=channels, image_size=size, train=Split(x, y),
                        val=Split(x[:0], y[:0]), test=Split(x[:batch], y[:batch]), **norm)  # fmt: skip
    cfg: dict[str, Any] = {"data": data, "model": model, "method": method, "batch_size": batch, "epochs": 1,
                           "device": "cpu", "val_fraction": 0.0, "teacher_store": "off", "hp": dict(hp or {})}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        torch.manual_seed(0)
        if teacher:
            t = create_model(teacher, classes, channels)
            heads = build_aux_heads(t, classes).state_dict() if cls.needs_teacher_heads else None
            save_model(f"{tmp}/t.pt", t, teacher, classes, channels, {}, aux_heads=heads)
            cfg["teacher"] = f"{tmp}/t.pt"
        if cls.needs_init:
            save_model(f"{tmp}/s.pt", create_model(model, classes, channels), model, classes, channels, {})
            cfg["init"] = f"{tmp}/s.pt"
        trainer = Trainer(TrainConfig.from_dict(cfg), data=bundle)
        trainer.method.setup()  # before epoch 0, as Trainer.run does (DiSK fits its temperature): not a step
        with FlopCounterMode(display=False) as fc:
            _, steps, _, _ = trainer.train_pass(0, max_steps=1)
    return fc.get_total_flops() / (batch * steps)


def method_key(spec, method: str) -> tuple[str, dict]:
    """A method's name in the table, with the spec's fixed integer and string hyperparameters (the ones that can
    change the FLOPs: CRD's ``nce_k``, ``embed_dim``...): ``crd`` or ``crd[nce_k=512]``; and those values."""
    try:
        space = spec.method(method).space
    except KeyError:  # a stage's method (ce, mse, hsakd_heads)
        return method, {}
    hp = {k: o.value for k, o in sorted(space.items()) if o.kind == "fixed" and isinstance(o.value, (int, str))
          and not isinstance(o.value, bool)}  # fmt: skip
    return (f"{method}[{','.join(f'{k}={v}' for k, v in hp.items())}]" if hp else method), hp


@dataclass
class Flops:
    """FLOPs per source image of (teacher, model, method) on a data set: the table's, else counted live."""

    table: dict = field(default_factory=load_table)
    live: set = field(default_factory=set)  # "<entry key> <method>" of the runs not in the table
    models: dict = field(default_factory=dict)  # live model counts of this process

    def ratio(self, method: str) -> float:
        """A method's step FLOPs over teacher forward + model forward/backward: the median of the table's counts,
        else its CPU step-time ratio to KD (1 where none was measured)."""
        name = method.split("[")[0]
        rs = [e["step"][m] / (e["teacher_forward"] + e["model_train"]) for e in self.table["entries"].values()
              for m in e["step"] if m.split("[")[0] == name and e["teacher"]]  # fmt: skip
        return statistics.median(rs) if rs else CPU_STEP_RATIOS.get(name, 1.0)

    def of(self, teacher: str | None, model: str, method: str, data: str) -> float:
        key = entry_key(teacher, model, data)
        e = self.table["entries"].get(key)
        if e is not None and method in e["step"]:
            return float(e["step"][method])
        if e is None:
            if key not in self.models:
                self.models[key] = count_models(teacher, model, data)
            t, m = self.models[key]
        else:
            t, m = e["teacher_forward"], e["model_train"]
        self.live.add(f"{key} {method}")
        return (t + m) * (self.ratio(method) if teacher else 1.0)


# ---------------------------------------------------------------------------------------------- step times
def load_step_times(path: str) -> list[dict]:
    """The rows of a ``kdtune bench --json`` file that measured images/s: teacher, student, batch, device, the
    bench's FLOPs per image (KD's), and per method the median images/s (``kd`` from the kdtune loop)."""
    where = f"--step-times {path}"
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: no such file (write one on the GPU with kdtune bench --json FILE)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: not a kdtune bench --json file ({type(e).__name__}: {e})") from None
    rows = []
    for r in raw if isinstance(raw, list) else []:
        if not isinstance(r, dict) or not {"teacher", "student", "batch", "flops_per_image"} <= r.keys():
            continue
        speeds = {("kd" if k == "kdtune" else k.split(":", 1)[1]): v for k, v in r.items()
                  if k == "kdtune" or k.startswith("method:")}  # fmt: skip
        speeds = {m: statistics.median(v) for m, v in speeds.items()
                  if isinstance(v, list) and v and all(isinstance(x, (int, float)) and x > 0 for x in v)}  # fmt: skip
        if speeds:
            rows.append({"teacher": r["teacher"], "student": r["student"], "batch": r["batch"],
                         "device": str(r.get("device", "?")), "flops": float(r["flops_per_image"]), "speeds": speeds})  # fmt: skip
    if not rows:
        raise ConfigError(f"{where}: no measured images/s in it (kdtune bench --json FILE on the GPU writes them; "
                          "the --exactness output has none)")  # fmt: skip
    return rows


def measured_throughputs(rows: list[dict], flops: Flops, data: str) -> list[tuple[str, str, str, int, float]]:
    """(teacher, student, method, batch, FLOP/s) per measured row and method: its images/s times its FLOPs per
    image (the bench's count for KD; times the method's counted FLOP ratio to KD on ``data`` for another)."""
    out = []
    for r in rows:
        kd = flops.of(r["teacher"], r["student"], "kd", data)
        for m, ips in r["speeds"].items():
            f = r["flops"] * flops.of(r["teacher"], r["student"], m, data) / kd
            out.append((r["teacher"], r["student"], m, int(r["batch"]), ips * f))
    return out


# ---------------------------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    groups: int
    trials: int
    upper_s: float  # device-seconds, every trial to its last epoch
    expected_s: float | None  # under the spec's scheduler (None: not modelled, HyperBand)
    epochs: int
    scheduler: str
    source: str
    device: str = "GPU"  # what the time is of: GPU, or CPU (step times measured on a CPU)
    live: int = 0

    def lines(self) -> list[str]:
        s = self.scheduler
        g, t = self.groups, self.trials
        head = (f"estimate: {g} group{'s' * (g != 1)}, {t} trial{'s' * (t != 1)}: {_amount(self.upper_s, self.device)} "
                f"upper bound (every trial to {self.epochs} epochs)")  # fmt: skip
        if s == "none":
            head += " (scheduler none: no trial stops early)"
        elif self.expected_s is not None:
            head += f", ~{_amount(self.expected_s, self.device)} expected with {s}"
        else:
            head += f" ({s}: its expected budget is not estimated)"
        head += "; stages and repeats included"
        live = (f"; {self.live} run(s) not in the FLOP table: from live counts of their models and the methods' "
                "ratios (docs/estimate.md)" if self.live else "")  # fmt: skip
        return [head, self.source + live]


def _amount(seconds: float, device: str) -> str:
    """``1,234 GPU-hours``, ``2.5 GPU-hours``; a small sweep in minutes or seconds."""
    h = seconds / 3600
    if h >= 0.1:
        return f"{h:,.0f} {device}-hours" if h >= 10 else f"{h:.1f} {device}-hours"
    return f"{seconds / 60:.0f} {device}-minutes" if seconds >= 60 else f"{seconds:.2g} {device}-seconds"


def estimate(
    plan,
    *,
    step_times: list[dict] | None = None,
    source: str = "",
    peak_flops: float | None = None,
    peak_name: str = "H100",
    share: float = ASSUMED_SHARE,
    flops: Flops | None = None,
) -> Estimate:
    """The plan's device time: measured step times when given (rows of :func:`load_step_times`, ``source``
    names their file), else counted FLOPs at ``share`` of ``peak_flops`` (``peak_name``'s bf16 dense peak)."""
    from kdtune.spec_model import default_grace_period

    spec = plan.spec
    flops = flops or Flops()
    n = train_images(spec.data, spec.val_fraction)
    live = set(flops.live)
    speeds = measured_throughputs(step_times, flops, "cifar100") if step_times else []  # the bench's data
    flops.live = live  # the bench's own pairs are not runs of the sweep
    if not speeds and not peak_flops:
        raise ValueError("estimate needs step times or an assumed peak")
    upper = expected = 0.0
    for w in plan_work(plan):
        f = flops.of(w.teacher, w.model, method_key(spec, w.method)[0], spec.data)
        rate = _rate(speeds, w) if speeds else share * peak_flops
        upper += w.epochs * n * f / rate
        expected = None if expected is None or w.expected is None else expected + w.expected * n * f / rate
    s = spec.scheduler
    grace = s.grace_period or default_grace_period(spec.budget.epochs)
    how = {"asha": f"ASHA (grace {grace}, factor {s.reduction_factor:g}: successive halving)"}.get(
        s.name, s.name
    )
    if speeds:
        devices = sorted({r["device"] for r in step_times})
        pairs = sorted({f"{r['teacher']}->{r['student']}" for r in step_times})
        src = (f"from step times measured on {', '.join(devices)} ({source}: {', '.join(pairs)}), scaled to other pairs "
               "and methods by counted FLOPs")  # fmt: skip
        device = "CPU" if all(d.startswith("cpu") for d in devices) else "GPU"
    else:
        src = (
            f"from counted FLOPs at {share:.0%} of {peak_name} bf16 dense peak ({peak_flops / 1e12:,.0f} TFLOP/s) "
            "(assumed: no GPU step times measured yet; small CIFAR networks at batch 64 run well below that share, so "
            "read it as a lower bound; pass --step-times FILE from `kdtune bench --json`)"
        )
        device = "GPU"
    return Estimate(len(plan.groups), plan.total_trials, upper, expected, spec.budget.epochs,
                    how if s.name == "asha" else s.name, src, device, len(flops.live))  # fmt: skip


def _rate(speeds: list, w: Work) -> float:
    """FLOP/s for ``w``: the measured rows of its method (else KD's), preferring its pair, then its batch."""
    rows = (
        [r for r in speeds if r[2] == w.method.split("[")[0]] or [r for r in speeds if r[2] == "kd"] or speeds
    )
    rows = [r for r in rows if (r[0], r[1]) == (w.teacher, w.model)] or rows
    rows = [r for r in rows if r[3] == w.batch] or rows
    return statistics.median(r[4] for r in rows)


# ---------------------------------------------------------------------------------------------- the table
def update_table(spec_paths: list[str], path: Path = TABLE, recount: bool = False, log=print) -> dict:
    """Count (engine step, FlopCounterMode, on this machine's CPU) what the specs' plans train and the table
    lacks, and write the table (after each spec). Minutes for a sweep of many CIFAR pairs."""
    from kdtune.spec import load_spec
    from kdtune.tune.plan import plan as make_plan

    entries = {} if recount else load_table(path).get("entries", {})
    for sp in spec_paths:
        p = make_plan(load_spec(sp))
        data = p.spec.data
        for w in plan_work(p):
            key, (mkey, hp) = entry_key(w.teacher, w.model, data), method_key(p.spec, w.method)
            if key not in entries:
                t, m = count_models(w.teacher, w.model, data)
                classes, channels = DATASET_SHAPES[data]
                entries[key] = {"teacher": w.teacher, "model": w.model, "image_size": DATASET_IMAGE_SIZES.get(data),
                                "classes": classes, "channels": channels, "teacher_forward": t, "model_train": m,
                                "batch": w.batch, "step": {}}  # fmt: skip
            if mkey not in entries[key]["step"]:
                t0 = time.time()
                entries[key]["step"][mkey] = count_step(w.teacher, w.model, w.method, data, w.batch, hp)
                log(
                    f"{key} {mkey}: {entries[key]['step'][mkey] / 1e9:.3f} GFLOP/image ({time.time() - t0:.1f} s)"
                )
        _write_table(path, entries)
    return load_table(path)


def _write_table(path: Path, entries: dict) -> None:
    import torch

    about = ("FLOPs per source image of one training step of kdtune's engine (Trainer.train_pass) counted by "
             "torch.utils.flop_counter.FlopCounterMode on the CPU with synthetic data of the data set's shape; "
             "teacher_forward and model_train as kdtune bench counts them (batch 2). Made by python -m "
             "kdtune.tune.estimate SPEC... (docs/estimate.md).")  # fmt: skip
    table = {"about": about, "torch": torch.__version__, "entries": dict(sorted(entries.items()))}
    Path(path).write_text(json.dumps(table, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kdtune.tune.estimate", description=update_table.__doc__)
    ap.add_argument("specs", nargs="+", help="sweep specs whose pairs and methods to count")
    ap.add_argument("--table", default=str(TABLE), help=f"the table to update (default {TABLE})")
    ap.add_argument("--recount", action="store_true", help="count every entry again")
    args = ap.parse_args(argv)
    update_table(args.specs, Path(args.table), args.recount)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
