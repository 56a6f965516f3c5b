"""The training loop: one student, optionally one teacher, one method; free of Ray and MLflow.

``Trainer(cfg).run()`` yields one metrics dict per epoch; ``state_dict``/``load_state_dict`` hold everything
needed to resume (model, method modules and state, optimiser, step, epoch, history, RNG), so a run stopped
after epoch k and resumed ends with the same weights as an uninterrupted run. A run with a teacher and a
validation split also records each epoch the student's agreement with the teacher there (``val_agree``,
``val_kl_teacher``: :mod:`kdtune.engine.diagnostics`), from the student logits of the epoch's own validation
pass and the teacher's validation logits made once per run (:meth:`Trainer.teacher_val_logits`).
"""

from __future__ import annotations

import math
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.config import TrainConfig
from kdtune.data import DataBundle, Split, load_data
from kdtune.data.loader import DeviceLoader
from kdtune.engine.diagnostics import epoch_agreement
from kdtune.engine.record import RunRecord, model_meta, record_epoch
from kdtune.engine.schedule import lr_factor
from kdtune.errors import CheckpointError, ConfigError, KdtuneError
from kdtune.losses import METHODS, Method, MethodContext, StepOutputs
from kdtune.losses.base import probe_stage_shapes
from kdtune.models import create_model

STATE_FORMAT = 1


class DivergedError(KdtuneError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda was asked for but no CUDA device is visible; use device=cpu or device=auto"
        )
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_file(source: str) -> str:
    """A run directory stands for its final.pt; URLs and files pass through."""
    if "://" in source:
        return source
    p = Path(source)
    if p.is_dir():
        final = p / "final.pt"
        if not final.is_file():
            raise CheckpointError(
                f"{source} is a directory without final.pt; point at a finished run's directory or a .pt file"
            )
        return str(final)
    return source


def forward(model: nn.Module, x: Tensor, features: bool) -> tuple[Tensor, Tensor | None]:
    if features:
        logits, feats = model(x, return_features=True)
        return logits, feats
    return model(x), None


def teacher_stage_outputs(teacher: nn.Module, x: Tensor):
    """The teacher's (logits, pooled features, Stages) for a stage method: one ``forward_stages`` without a
    graph (no_grad, not inference mode: the maps take part in the student's graph as constants)."""
    with torch.no_grad():
        t_logits, st = teacher.forward_stages(x)
    return t_logits.float(), st.pooled.float(), st


def teacher_outputs(teacher: nn.Module, x: Tensor, features: bool, i: int, stored=None, writer=None
                    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """The teacher's (logits, features) for batch ``i`` of an epoch, as fp32 copies: read from the teacher
    store's epoch (``stored``) where it has one, else the teacher's forward (recorded by ``writer`` for the
    store). The one teacher forward of the Trainer and the Bundle; call it under the run's autocast."""
    if stored is not None:
        return stored.batch(i, x.shape[0])
    with torch.inference_mode():
        t_logits, t_feats = forward(teacher, x, features)
        if writer is not None:
            writer.add(i, t_logits, t_feats)
    return t_logits.float().clone(), t_feats.float().clone() if t_feats is not None else None


def add_terms(sums: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
    """Add a step's loss terms into an epoch's running sums, on the device (no host sync): the one accumulator
    of the Trainer and the Bundle, so a member's logged terms are the lone run's."""
    for k, v in terms.items():
        v = v.detach().float()
        sums[k] = sums[k] + v if k in sums else v.clone()


class Trainer(RunRecord):
    def __init__(
        self,
        cfg: TrainConfig,
        data: DataBundle | None = None,
        *,
        log: Callable[[str], None] | None = None,
        progress: bool = False,
        teacher_info: dict[str, Any] | None = None,
        init_info: dict[str, Any] | None = None,
    ):
        """``teacher_info`` (``arch``, ``val_acc``, ``test_acc``) and ``init_info`` (``train_error``,
        ``val_error``) are measurements of ``cfg.teacher`` and ``cfg.init`` made before (a sweep's stage
        records them once): given, they are used as they are instead of evaluating those models again."""
        self.cfg = cfg
        self.log = log or (lambda s: None)
        self.progress = progress
        self.device = resolve_device(cfg.device)
        self.amp_dtype = self._amp_dtype()
        self.use_channels_last = cfg.channels_last and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.seed)

        self.data = (
            data
            if data is not None
            else load_data(
                cfg.data,
                root=cfg.data_root,
                download=cfg.download,
                val_fraction=cfg.val_fraction,
                seed=cfg.data_seed,
            )
        )
        d = self.data
        self.method_cls = METHODS.get(cfg.method)
        self.student = create_model(cfg.model, d.num_classes, d.in_channels).to(self.device)
        if self.use_channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)

        self._make_loaders()

        self.teacher: nn.Module | None = None
        self.teacher_heads: nn.Module | None = None  # the teacher's HSAKD branches (methods needing them)
        self.teacher_info: dict[str, Any] = {}
        self.teacher_val: Tensor | None = None  # its validation logits [N_val, C] (teacher_val_logits)
        self._teacher_val_due = False  # to be computed (one pass, at the first epoch's evaluation)
        self._measured_val: Tensor | None = None  # those of the pass measuring its val accuracy
        # a method that extends the teacher itself (hsakd_heads): the teacher is this run's model, frozen
        self.frozen_student = bool(getattr(self.method_cls, "extends_teacher", False))
        if self.frozen_student and cfg.init:
            raise ConfigError(f"method={cfg.method} trains auxiliary heads on the teacher itself (teacher=, model=<its "
                              "architecture>) and takes no init=; drop init=")  # fmt: skip
        if cfg.teacher:
            self._load_teacher(teacher_info)
        if self.frozen_student:
            self._teacher_as_model()
        if self.teacher is not None and self.val_loader is not None:
            self.teacher_val = self._known_teacher_val()
            self._teacher_val_due = self.teacher_val is None
        self._measured_val = None
        self.init_info: dict[str, Any] = {}
        if cfg.init:
            self._load_init(init_info)

        self.store = self._open_store()
        self.store_stats = {"read": 0, "written": 0, "online": 0}

        self.method = self.method_cls(dict(cfg.hp), self.method_context(self.student))
        self.method_modules = nn.ModuleDict(self.method.trainable_modules()).to(self.device)
        params = list(self.student.parameters()) + list(self.method_modules.parameters())
        if self.frozen_student:  # the frozen network is not optimised (nor decayed): only the method's modules
            params = list(self.method_modules.parameters())
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                params,
                lr=cfg.lr,
                momentum=cfg.momentum,
                nesterov=cfg.nesterov and cfg.momentum > 0,
                weight_decay=cfg.weight_decay,
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.student_fwd: nn.Module = torch.compile(self.student) if cfg.compile else self.student

        self.start_record(cfg)  # epochs completed, history, best epoch, timings (kdtune.engine.record)
        self.step = 0  # optimiser steps taken
        self._setup_done = False

    # ------------------------------------------------------------------ construction helpers
    def _amp_dtype(self) -> torch.dtype | None:
        mode = self.cfg.amp
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return None
        return torch.bfloat16

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _make_loaders(self) -> None:
        cfg, d = self.cfg, self.data
        common = dict(
            device=self.device,
            mean=d.mean,
            std=d.std,
            data_seed=cfg.data_seed,
            channels_last=self.use_channels_last,
        )
        if d.in_memory:

            def mk(split: Split, train: bool, bs: int):
                return DeviceLoader(
                    split,
                    bs,
                    train=train,
                    crop_padding=d.crop_padding,
                    flip=d.flip,
                    augment=cfg.augment,
                    **common,
                )
        else:
            from kdtune.data.folder import FolderLoader

            def mk(split, train: bool, bs: int):
                return FolderLoader(
                    split,
                    bs,
                    train=train,
                    device=self.device,
                    mean=d.mean,
                    std=d.std,
                    image_size=d.image_size,
                    data_seed=cfg.data_seed,
                    num_workers=cfg.num_workers,
                )

        self.train_loader = mk(d.train, True, cfg.batch_size)
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"data set {d.name!r} has no training examples; check data_root and val_fraction"
            )
        self.val_loader = mk(d.val, False, cfg.eval_batch_size) if len(d.val) else None
        self.test_loader = mk(d.test, False, cfg.eval_batch_size)
        self._plain_train_loader = mk(d.train, False, cfg.eval_batch_size)

    def method_context(self, student: nn.Module) -> MethodContext:
        """What the method of a run training ``student`` may know (the bundle builds one per member): stage
        shapes probed where the method needs stages (nothing a lone run would notice is touched), the training
        split's size and labels where it needs indices."""
        d, m = self.data, self.method_cls
        shapes = {}
        if m.needs_student_stages:
            shapes["student_stages"] = probe_stage_shapes(student, d.in_channels, d.image_size, self.device)
        if m.needs_teacher_stages and self.teacher is not None:
            shapes["teacher_stages"] = probe_stage_shapes(self.teacher, d.in_channels, d.image_size, self.device)
        if m.needs_indices:
            if not isinstance(self.train_loader, DeviceLoader):
                raise ConfigError(f"method={m.name} needs each sample's index, which the folder loader of "
                                  f"{d.name!r} does not give; use an in-memory data set")  # fmt: skip
            shapes["num_train"] = len(d.train)
            shapes["train_targets"] = self.train_loader.y
        return MethodContext(
            seed=self.cfg.seed,
            **shapes,
            num_classes=d.num_classes,
            epochs=self.cfg.epochs,
            steps_per_epoch=len(self.train_loader),
            device=self.device,
            student=student,
            teacher=self.teacher,
            student_feat_dim=getattr(student, "feat_dim", None),
            teacher_feat_dim=getattr(self.teacher, "feat_dim", None) if self.teacher is not None else None,
            train_batches=self._plain_train_batches,
            init_error=self.init_info.get("train_error"),
            extra={"data": d.name, "init_val_error": self.init_info.get("val_error"), "lr_factor": self._lr_factor,
                   "channels_last": self.use_channels_last, "teacher_heads": self.teacher_heads},  # fmt: skip
        )

    def batches(self, e: int):
        """Epoch ``e``'s training batches as ``(x, y, index or None)``, after the method's batch transform."""
        m = self.method_cls
        transform = m.transform_batch is not Method.transform_batch
        for batch in self.train_loader.epoch(e, with_index=True) if m.needs_indices else self.train_loader.epoch(e):
            x, y = batch[0], batch[1]
            if transform:
                x, y = self.method.transform_batch(x, y)
            yield x, y, batch[2] if m.needs_indices else None

    def _plain_train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._plain_train_loader.epoch(0)

    def _load_teacher(self, known: dict[str, Any] | None = None) -> None:
        cfg = self.cfg
        model, info = load_teacher_model(cfg, self.data)
        if getattr(self.method_cls, "needs_teacher_heads", False):
            self.teacher_heads = self._teacher_heads(model, info)
        model = model.to(self.device).eval()
        if self.use_channels_last:
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.teacher = model
        if known is not None and known.get("test_acc") is not None:
            self.teacher_info = {"arch": info.get("arch"), "source": cfg.teacher, "val_acc": known.get("val_acc"),
                                 "test_acc": known["test_acc"], "measured": "before"}  # fmt: skip
            return
        val = self.evaluate(model, self.val_loader, keep_logits=True) if self.val_loader is not None else {}
        self._measured_val = val.pop("logits", None)
        val.pop("labels", None)
        test = self.evaluate(model, self.test_loader)
        self.teacher_info = {
            "arch": info.get("arch"),
            "source": cfg.teacher,
            "val_acc": val.get("acc"),
            "test_acc": test["acc"],
        }
        self.log(
            f"teacher {info.get('arch')} from {cfg.teacher}: test acc {test['acc']:.2f}%"
            + (f", val acc {val['acc']:.2f}%" if val else "")
        )

    def teacher_val_logits(self) -> Tensor | None:
        """The teacher's logits on the validation split (float32 ``[N_val, C]`` on the device; None without a
        teacher or a validation split), made once per run, never per epoch: read from the ``val_logits.pt``
        beside the teacher's checkpoint (what a sweep's stage writes) when it holds this teacher's logits on this
        split, else those of the pass that measured the teacher's validation accuracy at the start (no
        ``teacher_info`` given), else (a plain checkpoint) one forward pass of the teacher over the validation
        split at the first call (the first epoch's evaluation), in eval mode under the run's autocast, the global
        RNG left as it was (a folder loader draws a seed from it). A resumed run makes them again, once."""
        if self._teacher_val_due:
            self._teacher_val_due = False
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                self.teacher_val = self.evaluate(self.teacher, self.val_loader, keep_logits=True)["logits"]
        return self.teacher_val

    def _known_teacher_val(self) -> Tensor | None:
        """The teacher's validation logits where they are known without a forward pass (the stage's
        ``val_logits.pt`` if it is of this teacher and split: same labels, split checksum and weights; else the
        measuring pass's); None where :meth:`teacher_val_logits` must compute them."""
        from kdtune.engine import diagnostics as dg
        from kdtune.engine.teacher_store import weights_sha

        src, split = self.cfg.teacher, self.data.val
        path = None if "://" in src else Path(checkpoint_file(src)).with_name(dg.VAL_LOGITS)
        if path is not None and path.is_file():
            got, why = dg.load_val_logits(path, labels=dg.split_labels(split), split_sha=dg.split_sha(split),
                                          teacher_sha=weights_sha(self.teacher), num_classes=self.data.num_classes)  # fmt: skip
            if got is not None:
                return got.to(self.device)
            self.log(f"teacher validation logits {path} not used: {why}; computing them once for this run")
        return self._measured_val

    def _teacher_heads(self, model: nn.Module, info: dict[str, Any]) -> nn.Module:
        """The teacher's HSAKD branches from its checkpoint (frozen, eval mode, on the device); a plain teacher
        checkpoint is refused in one line that gives the command making them."""
        from kdtune.models.aux_heads import load_aux_heads, missing_heads_error

        arch = info.get("arch") or type(model).__name__
        if info.get("aux_heads") is None:
            raise missing_heads_error(self.cfg.teacher, arch, self.data.name)
        heads = load_aux_heads(model, info["aux_heads"], self.data.num_classes, self.cfg.teacher)
        heads = heads.to(self.device).eval()
        if self.use_channels_last:
            heads = heads.to(memory_format=torch.channels_last)
        for p in heads.parameters():
            p.requires_grad_(False)
        return heads

    def _teacher_as_model(self) -> None:
        """For a method that extends the teacher (``extends_teacher``: hsakd_heads): the loaded teacher becomes the
        run's model, frozen (eval mode, no gradient, out of the optimiser), and the run has no separate teacher
        (no second forward, no teacher store). ``model=`` must name the teacher's architecture."""
        arch = self.teacher_info.get("arch")
        if self.teacher is None:
            raise ConfigError(f"method={self.cfg.method} trains on a teacher: pass teacher=<checkpoint>")
        if arch is not None and arch != self.cfg.model:
            raise ConfigError(f"method={self.cfg.method} trains the auxiliary heads of the teacher itself: model= must "
                              f"be the teacher's architecture, model={arch} (got model={self.cfg.model})")  # fmt: skip
        self.student, self.teacher = self.teacher, None

    # ------------------------------------------------------------------ teacher store
    def _open_store(self):
        """The teacher store this run reads and writes (kdtune.engine.teacher_store), or None: ``off``, no
        teacher, ``auto`` without a store folder, or ``auto`` where it cannot serve or fit (said in one line);
        ``on`` where it cannot is refused in one line."""
        from kdtune.engine import teacher_store as ts

        cfg, d = self.cfg, self.data
        if self.teacher is None or cfg.teacher_store == "off" or (cfg.teacher_store == "auto" and not cfg.teacher_store_dir):
            return None
        m = self.method_cls
        if m.transform_batch is not Method.transform_batch or self.teacher_heads is not None:
            # the store keeps the teacher's outputs on the loader's views; a transformed batch (HSAKD's rotations)
            # is another input, and a teacher's auxiliary heads are outputs the store does not keep
            if cfg.teacher_store == "on":
                raise ConfigError(f"teacher_store=on cannot serve method={cfg.method}: it transforms the batch (or "
                                  "reads the teacher's auxiliary heads), which the store does not keep; use "
                                  "teacher_store=off or auto")  # fmt: skip
            return None
        if self.method_cls.needs_teacher_stages:  # its maps come from the teacher's forward anyway
            if cfg.teacher_store == "on":
                raise ConfigError(f"teacher_store=on cannot serve method={cfg.method}: it reads the teacher's stage "
                                  "maps, which the store does not keep; use teacher_store=off or auto")  # fmt: skip
            return None
        loader = self.train_loader
        root = Path(cfg.teacher_store_dir) if cfg.teacher_store_dir else ts.default_root()
        why = None
        if not isinstance(loader, DeviceLoader):
            why = f"data set {d.name!r} is read from folders; the store serves in-memory data sets"
        feat_dim = getattr(self.teacher, "feat_dim", None) if self.method_cls.needs_teacher_features else None
        rows = len(loader) * loader.batch_size if loader.drop_last else loader.n
        itemsize = 2 if self.amp_dtype is not None else 4
        per_epoch = ts.TeacherStore.epoch_bytes(rows, d.num_classes, feat_dim, itemsize)
        store = None
        if why is None:
            key = ts.store_key(
                teacher=self.teacher, teacher_arch=self.teacher_info.get("arch") or "teacher", data=d.name,
                data_sha=ts.data_sha(d.train), val_fraction=cfg.val_fraction, data_seed=cfg.data_seed,
                augment=f"crop{loader.crop_padding}-flip{int(loader.flip)}", batch_size=loader.batch_size, rows=rows,
                features=feat_dim is not None, device=self.device, amp=str(self.amp_dtype),
                channels_last=self.use_channels_last,
            )  # fmt: skip
            try:
                store = ts.TeacherStore(root, key, log=self.log)
            except OSError as e:
                why = f"cannot write under {root} ({e.strerror})"
        if store is not None:
            have = set(store.epochs())
            need = per_epoch * sum(1 for e in range(cfg.epochs) if e not in have)
            free = ts.free_bytes(root)
            if need > free - ts.RESERVE_BYTES:
                why = (f"it needs {_size(need)} more under {root} ({_size(per_epoch)} an epoch, {cfg.epochs - len(have)} "
                       f"epochs to store) but {_size(free)} are free")  # fmt: skip
            else:
                self.log(f"teacher store {store.dir}: {len(have & set(range(cfg.epochs)))} of {cfg.epochs} epochs "
                         f"stored, {_size(need)} to write ({_size(per_epoch)} an epoch)")  # fmt: skip
        if why is not None:
            if cfg.teacher_store == "on":
                raise ConfigError(f"teacher_store=on cannot be used: {why}; free space, set teacher_store_dir, "
                                  "or use teacher_store=off")  # fmt: skip
            self.log(f"teacher store off: {why}")
            return None
        return store

    def store_epoch(self, e: int, steps: int):
        """(the store's published epoch ``e`` or None, a writer for it or None) for a pass of ``steps``
        batches: only a whole epoch is written."""
        if self.store is None:
            return None, None
        stored = self.store.read(e, self.device)
        if stored is not None:
            self.store_stats["read"] += 1
            return stored, None
        self.store_stats["online"] += 1
        return None, self.store.writer(e) if steps == len(self.train_loader) else None

    def store_publish(self, writer) -> None:
        """Publish the epoch ``writer`` recorded (it does so only when every row of the epoch was recorded)."""
        if writer is not None and writer.publish():
            self.store_stats["written"] += 1

    def _load_init(self, known: dict[str, Any] | None = None) -> None:
        cfg = self.cfg
        model, info = load_init_model(cfg, self.data)
        self.student.load_state_dict(model.state_dict())
        if known is not None and known.get("train_error") is not None:
            self.init_info = {"source": cfg.init, "train_error": float(known["train_error"]),
                              "val_error": known.get("val_error"), "measured": "before"}  # fmt: skip
            return
        train = self.evaluate(self.student, self._plain_train_loader)
        val = self.evaluate(self.student, self.val_loader) if self.val_loader is not None else {}
        self.init_info = {
            "source": cfg.init,
            "train_error": 1.0 - train["acc"] / 100.0,
            "val_error": (1.0 - val["acc"] / 100.0) if val else None,
        }
        self.log(f"student initialised from {cfg.init}: train error {self.init_info['train_error']:.4f}")

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def evaluate(self, model: nn.Module, loader, keep_logits: bool = False) -> dict[str, Any]:
        """Accuracy (%) and mean cross-entropy of ``model`` on ``loader`` in eval mode; ``keep_logits``: also
        the pass's float32 ``logits`` ``[N, C]`` and ``labels`` ``[N]``, on the device (no second pass)."""
        was_training = model.training
        model.eval()
        correct = torch.zeros((), device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        n = 0
        kept: list[Tensor] = []
        labels: list[Tensor] = []
        for x, y in loader.epoch(0):
            with self.autocast():
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            n += y.shape[0]
            if keep_logits:
                kept.append(logits)
                labels.append(y)
        model.train(was_training)
        n = max(n, 1)
        out: dict[str, Any] = {"acc": 100.0 * correct.item() / n, "loss": loss_sum.item() / n}
        if keep_logits:
            c, dev = self.data.num_classes, self.device
            out["logits"] = torch.cat(kept) if kept else torch.empty(0, c, device=dev)
            out["labels"] = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=dev)
        return out

    # ------------------------------------------------------------------ training
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _lr_factor(self, epoch_float: float) -> float:
        """The student's lr multiplier at a fractional epoch (methods with an optimiser of their own follow it)."""
        cfg = self.cfg
        return lr_factor(
            epoch_float,
            epochs=cfg.epochs,
            schedule=cfg.schedule,
            milestones=cfg.milestones,
            lr_decay=cfg.lr_decay,
            warmup_epochs=cfg.warmup_epochs,
        )

    def _set_lr(self) -> None:
        cfg = self.cfg
        f = lr_factor(
            self.step / len(self.train_loader),
            epochs=cfg.epochs,
            schedule=cfg.schedule,
            milestones=cfg.milestones,
            lr_decay=cfg.lr_decay,
            warmup_epochs=cfg.warmup_epochs,
        )
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.lr * f

    def run(self) -> Iterator[dict[str, Any]]:
        """Train the remaining epochs, yielding one metrics dict per epoch."""
        if not self._setup_done and self.epoch == 0:
            self.method.setup()
        self._setup_done = True
        while self.epoch < self.cfg.epochs:
            yield self.train_epoch()

    def train_pass(self, e: int, max_steps: int | None = None) -> tuple[dict[str, Tensor], int, int, float]:
        """Optimiser steps over epoch ``e``'s batches (at most ``max_steps``).

        Returns (summed loss terms as device tensors, steps, images, seconds). Loss values are not synced to
        the host inside the loop: one sync at the end.
        """
        cfg, m = self.cfg, self.method_cls
        self.student.train(not self.frozen_student)  # a frozen network keeps its BN statistics (eval mode)
        self.method_modules.train()
        sums: dict[str, Tensor] = {}
        n_img = steps = 0
        total = len(self.train_loader) if max_steps is None else min(max_steps, len(self.train_loader))
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                desc=f"epoch {e + 1}/{cfg.epochs}",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        stored, writer = self.store_epoch(e, total)
        views = int(getattr(m, "views_per_image", 1))
        self._sync()
        t0 = time.perf_counter()
        for i, (x, y, index) in enumerate(self.batches(e)):
            if i >= total:
                break
            self._set_lr()
            t_logits = t_feats = t_stages = s_stages = None
            with self.autocast():
                if self.teacher is not None:
                    if m.needs_teacher_stages:
                        t_logits, t_feats, t_stages = teacher_stage_outputs(self.teacher, x)
                    else:
                        t_logits, t_feats = teacher_outputs(self.teacher, x, m.needs_teacher_features, i, stored, writer)
                if m.needs_student_stages:
                    s_logits, s_stages = self.student_fwd.forward_stages(x)
                    s_feats = s_stages.pooled
                else:
                    s_logits, s_feats = forward(self.student_fwd, x, m.needs_student_features)
            out = StepOutputs(
                student_logits=s_logits.float(),
                targets=y,
                epoch=e,
                step=i,
                teacher_logits=t_logits,
                student_features=s_feats.float() if s_feats is not None else None,
                teacher_features=t_feats,
                images=x,
                student_stages=s_stages,
                teacher_stages=t_stages,
                indices=index,
            )
            terms = self.method.losses(out)
            loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            steps += 1
            n_img += y.shape[0] // views  # source images (HSAKD's batch holds four rotations of each)
            add_terms(sums, terms)
            if bar is not None:
                bar.update(1)
        self._sync()
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        self.store_publish(writer)
        return sums, steps, n_img, seconds

    def train_epoch(self) -> dict[str, Any]:
        e = self.epoch
        self.method.on_epoch_start(e)
        sums, steps, n_img, train_s = self.train_pass(e)
        steps = max(steps, 1)
        term_means = {k: v.item() / steps for k, v in sums.items()}
        msg = diverged_message(e + 1, term_means)
        if msg is not None:
            raise DivergedError(msg)
        self.epoch += 1
        self.train_time += train_s
        self.train_images += n_img
        t1 = time.perf_counter()
        val = agree = None
        if self.val_loader is not None:
            teacher_val = self.teacher_val_logits()  # made once per run
            val = self.evaluate(self.student, self.val_loader, keep_logits=teacher_val is not None)
            agree = epoch_agreement(teacher_val, val.pop("logits", None))  # this pass's student logits
            val.pop("labels", None)
        test = self.evaluate(self.student, self.test_loader)
        eval_s = time.perf_counter() - t1
        return record_epoch(
            self,
            lr=self.current_lr(),
            term_means=term_means,
            val=val,
            test=test,
            n_img=n_img,
            train_s=train_s,
            eval_s=eval_s,
            method_metrics=self.method.epoch_metrics(),
            teacher_agreement=agree,
        )

    def data_resident_bytes(self) -> int:
        """Bytes of data held on the device by the train, validation and test loaders (0 for folder data)."""
        loaders = (self.train_loader, self.val_loader, self.test_loader)
        return sum(getattr(ld, "resident_bytes", 0) for ld in loaders if ld is not None)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ results
    def result(self) -> dict[str, Any]:
        return run_result(self, data_resident_bytes=self.data_resident_bytes(), device=self.device)

    def store_report(self) -> dict[str, Any] | None:
        """Where the teacher's outputs came from: the store's folder and the epochs read from it, written to
        it, and run with the online teacher (None without a store)."""
        if self.store is None:
            return None
        return {"path": str(self.store.dir), "epochs_read": self.store_stats["read"],
                "epochs_written": self.store_stats["written"], "epochs_online": self.store_stats["online"]}  # fmt: skip

    def model_meta(self) -> dict[str, Any]:
        return model_meta(self, self.data.name)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return training_state(self, step=self.step, optimizer=self.optimizer.state_dict(), device=self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        apply_training_state(self, state, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self._setup_done = True

    def save_state(self, path: str | Path) -> None:
        atomic_torch_save(self.state_dict(), Path(path))

    def load_state(self, path: str | Path) -> None:
        self.load_state_dict(read_state(path, self.device))

    def save_model(self, path: str | Path, durable: bool = True) -> None:
        from kdtune.models.checkpoint import save_model

        d = self.data
        meta, heads = self.model_meta(), None
        export = getattr(self.method, "export_heads", None)
        if export is not None:  # hsakd_heads: the network and its auxiliary heads, in one file
            from kdtune.models.aux_heads import heads_meta

            heads = export()
            meta["hsakd_heads"] = heads_meta(heads)
        save_model(path, self.student, self.cfg.model, d.num_classes, d.in_channels, meta, durable=durable,
                   aux_heads=heads.state_dict() if heads is not None else None)  # fmt: skip


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def load_teacher_model(cfg: TrainConfig, data: DataBundle) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher of ``cfg`` read onto the CPU (``load_model`` with the config's architecture and data)."""
    return _load_for(cfg.teacher, cfg.teacher_model, data, "teacher checkpoint")


def load_init_model(cfg: TrainConfig, data: DataBundle) -> tuple[nn.Module, dict[str, Any]]:
    """The warm-start student of ``cfg`` (``init=``) read onto the CPU."""
    return _load_for(cfg.init, cfg.model, data, "init checkpoint")


def _load_for(source: str, arch: str | None, data: DataBundle, role: str) -> tuple[nn.Module, dict[str, Any]]:
    from kdtune.models.checkpoint import load_model

    return load_model(checkpoint_file(source), arch=arch, num_classes=data.num_classes,
                      in_channels=data.in_channels, map_location="cpu", role=role, data=data.name)  # fmt: skip


def check_resume_config(cfg: TrainConfig, state: dict[str, Any]) -> None:
    """Refuse a training state saved by another computation (any identity field but ``epochs`` differs)."""
    if state.get("kdtune_state") != STATE_FORMAT:
        raise CheckpointError(
            "this file is not a kdtune training state (state.pt); resume from a run directory"
        )
    saved = TrainConfig(**{k: v for k, v in state["config"].items()})
    mine, theirs = cfg.identity(), saved.identity()
    diff = sorted(k for k in mine if mine[k] != theirs.get(k) and k != "epochs")
    if diff:
        k = diff[0]
        raise ConfigError(
            f"cannot resume: {k} was {theirs.get(k)!r} in the saved run but is {mine[k]!r} now; "
            f"use the saved config or start a new run in another out= directory"
        )


def diverged_message(epoch: int, term_means: dict[str, float]) -> str | None:
    """The DivergedError text when the summed loss of an epoch (1-based ``epoch``) is not finite, else None."""
    train_loss = sum(term_means.values())
    if math.isfinite(train_loss):
        return None
    return (
        f"training loss became {train_loss} in epoch {epoch}; lower lr or the method's weights "
        f"(terms: {', '.join(f'{k}={v:.4g}' for k, v in term_means.items())})"
    )


def run_result(run: Any, *, data_resident_bytes: int, device: torch.device) -> dict[str, Any]:
    """What result.json holds for ``run`` (a :class:`Trainer` or a bundle member)."""
    last = run.history[-1] if run.history else {}
    return {
        "test_acc": last.get("test_acc"),
        "test_loss": last.get("test_loss"),
        "val_acc": last.get("val_acc"),
        "val_loss": last.get("val_loss"),
        "best_test_acc": run.best.get("test_acc"),
        "best_val_acc": run.best.get("val_acc") if last.get("val_acc") is not None else None,
        "best_epoch": run.best.get("epoch"),
        "test_acc_at_best_val": run.best.get("test_acc_at_best_val"),
        "epochs": run.epoch,
        "seed": run.cfg.seed,
        "train_images_per_s": run.train_images / max(run.train_time, 1e-9),
        "train_s": run.train_time,
        "teacher": run.teacher_info or None,
        "teacher_store": getattr(run, "store_report", lambda: None)(),
        "init": run.init_info or None,
        "num_params": sum(p.numel() for p in run.student.parameters()),
        "data_resident_mb": data_resident_bytes / 1e6,
        "environment": environment(device),
        "config": run.cfg.to_dict(),
        "history": run.history,
    }


def training_state(run: Any, *, step: int, optimizer: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The resumable state (state.pt) of ``run`` (a :class:`Trainer` or a bundle member) with its optimiser's
    ``state_dict`` in ``torch.optim`` form: a bundle member's state resumes in a lone Trainer and back."""
    state = {
        "kdtune_state": STATE_FORMAT,
        "config": run.cfg.to_dict(),
        "epoch": run.epoch,
        "step": step,
        "model": run.student.state_dict(),
        "method_modules": run.method_modules.state_dict(),
        "method": run.method.state_dict(),
        "optimizer": optimizer,
        "history": run.history,
        "best": run.best,
        "train_time": run.train_time,
        "train_images": run.train_images,
        "teacher_info": run.teacher_info,
        "init_info": run.init_info,
        "rng": {"torch": torch.get_rng_state()},
    }
    if device.type == "cuda":
        state["rng"]["cuda"] = torch.cuda.get_rng_state(device)
    return state


def apply_training_state(run: Any, state: dict[str, Any], device: torch.device) -> None:
    """Load everything of :func:`training_state` but the optimiser and the step into ``run``."""
    check_resume_config(run.cfg, state)
    run.student.load_state_dict(state["model"])
    run.method_modules.load_state_dict(state["method_modules"])
    run.method.load_state_dict(state["method"])
    run.epoch = int(state["epoch"])
    run.history = list(state["history"])
    run.best = dict(state["best"])
    run.train_time = float(state.get("train_time", 0.0))
    run.train_images = int(state.get("train_images", 0))
    run.teacher_info = state.get("teacher_info") or run.teacher_info
    run.init_info = state.get("init_info") or run.init_info
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)


def read_state(path: str | Path, device: torch.device) -> dict[str, Any]:
    """A state.pt read onto ``device``; a missing or unreadable file raises CheckpointError."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no training state at {path}; nothing to resume") from None
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file
        raise CheckpointError(
            f"cannot read training state {path}: {type(e).__name__}; start a new run"
        ) from None


def atomic_torch_save(obj: Any, path: Path) -> None:
    """The training state, rewritten every epoch: all or nothing if the process is killed (no fsync)."""
    from kdtune.storage import atomic_write

    with atomic_write(path, "wb", durable=False) as f:
        torch.save(obj, f)


def environment(device: torch.device) -> dict[str, Any]:
    from kdtune.version import __version__

    env = {
        "kdtune": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env
