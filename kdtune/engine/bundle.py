"""A fused bundle: K runs of one group (same student architecture, method, teacher, data and batches) trained
as one stacked model, each member with its own hyperparameters and init seed.

What a bundle shares and what it keeps per member:

- **shared**: the data set, the loaders, the batches and their augmented views (one data seed: every member
  sees the very same batches, which are common random numbers, so the comparison of the members' hyperparameters
  is fairer than across independent runs), the teacher and its forward pass, run **once per batch** for the
  whole bundle, the number of epochs and everything else of the config but the fusable fields;
- **per member** (:data:`FUSABLE_FIELDS`): ``seed`` (the student's init), ``hp`` (the method's T, alpha,
  beta, gamma, loss weights ...), ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, the schedule
  (``schedule``, ``milestones``, ``lr_decay``, ``warmup_epochs``) and the run directory (``out``,
  ``overwrite``, ``resume``); each member keeps its own parameters, BatchNorm statistics, optimiser state,
  method instance (a member's Method object is the one a lone run uses: the loss formulas are not rewritten),
  history and best epoch.

The student is stacked with ``torch.func.stack_module_state``: per-member parameters and BatchNorm statistics
live in ``(K, ...)`` tensors, and one backward serves all K members. Two ways to run it (``mode``):

- ``"loop"`` (default): each member's slice (``unbind`` views of the stacked tensors) runs through
  ``functional_call`` with the lone model's kernels, the K outputs are stacked, and the summed loss is
  back-propagated once (``unbind``'s backward stacks the K gradients in one op). BatchNorm updates its
  running statistics in place in the views. Bit for bit equal to lone runs on the CPU.
- ``"vmap"``: ``vmap(functional_call)`` over the stacked tensors, one batched call for all K (vmap's
  convolution rule issues the grouped convolutions HFTA writes by hand); BatchNorm's stacked buffers are
  updated in place under vmap. Equal to lone runs up to the rounding of the batched kernels.

Chosen by measurement on this CPU (2 cores shared with other jobs; resnet8x4, batch 64, 100 classes,
forward + backward, min of 3 interleaved repeats): 4 separate models 1.41 s, ``loop`` with K = 4 1.53 s,
``vmap`` with K = 4 2.73 s (a resnet32x4 teacher forward: 0.50 s). On the CPU the batched kernels are ~1.9x
slower than K plain ones, so the default is ``loop``; the bundle's gain there is the teacher forward run once
per batch instead of K times (the teacher's forward costs about twice the student's forward and backward) plus
one loader pass for K members. ``vmap`` (one kernel launch for K students) is kept for GPUs, where it has not
been measured yet; both modes are tested for exactness. Hand-written grouped convolutions would need a second
implementation of every model; vmap already generates them.

Optimisers (:class:`StackedOptimizer`): SGD (momentum, Nesterov, weight decay; dampening 0) and AdamW
(betas 0.9/0.999, eps 1e-8) with torch.optim's single-tensor arithmetic applied to each member's slices, with
per-member lr, momentum, Nesterov flag and weight decay; the step and cosine schedules
(:func:`~kdtune.engine.schedule.lr_factor`) are evaluated per member. Members must share the optimiser kind.

Exactness: on the CPU in fp32 member ``i`` ends with the weights of the same config trained alone by
:class:`~kdtune.engine.trainer.Trainer` on the same data seed: bit for bit with ``mode="loop"``, within
``atol 1e-5`` with ``mode="vmap"`` (``tests/test_bundle.py``: two epochs, every fusable method, SGD and AdamW).
For methods with trainable modules (IPWD's extra head) a member reads the teacher (and init) checkpoint again
after creating its student, so the global RNG that initialises the module is where a lone run has it.

Per-member state is kept in the lone Trainer's format (:meth:`Bundle.member_state`): a member's state.pt
resumes in a lone run, and a lone run's state.pt in a bundle. :meth:`Bundle.drop` removes a member (e.g. one
an early-stopping scheduler pruned) and repacks the stacks. Methods that cannot be fused say why in
``Method.unfusable`` (DiSK) and a bundle refuses them.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from kdtune.config import TrainConfig
from kdtune.data import DataBundle
from kdtune.engine.run import as_config
from kdtune.engine.schedule import lr_factor
from kdtune.engine.trainer import (
    Trainer,
    apply_training_state,
    atomic_torch_save,
    diverged_message,
    forward,
    load_init_model,
    load_teacher_model,
    model_meta,
    read_state,
    record_epoch,
    run_result,
    seed_everything,
    training_state,
)
from kdtune.errors import CheckpointError, ConfigError
from kdtune.losses import METHODS, Method, StepOutputs
from kdtune.models import create_model

# Config fields the members of one bundle may set each their own way; all others must be equal.
FUSABLE_FIELDS = (
    "seed",
    "hp",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "milestones",
    "lr_decay",
    "warmup_epochs",
    "out",
    "overwrite",
    "resume",
)
BUNDLE_FORMAT = 1
MODES = (
    "loop",
    "vmap",
)  # how the stacked student runs (module docstring: measured, loop is faster on the CPU)
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


def check_bundle(cfgs: Sequence[TrainConfig]) -> None:
    """Refuse configs that cannot train as one bundle, in one line naming the field."""
    if not cfgs:
        raise ConfigError("a bundle needs at least one config")
    base = cfgs[0].to_dict()
    for i, cfg in enumerate(cfgs[1:], 1):
        d = cfg.to_dict()
        for k, v in base.items():
            if k not in FUSABLE_FIELDS and d[k] != v:
                raise ConfigError(
                    f"config {i} cannot share a bundle with config 0: {k} is {d[k]!r}, not {v!r} "
                    f"(members may differ only in {', '.join(FUSABLE_FIELDS)})"
                )
    method = METHODS.get(cfgs[0].method)
    if method.unfusable:
        raise ConfigError(
            f"method={method.name} cannot be fused into a bundle: {method.unfusable}; train it alone"
        )
    if cfgs[0].compile:
        raise ConfigError(
            "compile=true cannot be fused into a bundle (vmap over the stacked student); drop it"
        )
    seen: dict[str, int] = {}
    for i, cfg in enumerate(cfgs):
        if cfg.out:
            key = str(Path(cfg.out).resolve())
            if key in seen:
                raise ConfigError(
                    f"out={cfg.out} is given to members {seen[key]} and {i}; each needs its own out="
                )
            seen[key] = i


def _per_member(fwd, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, feats: bool):
    """``fwd`` on each member's views of the stacked tensors (``unbind``: one stack of the gradients in the
    backward), outputs stacked to ``(K, ...)`` as vmap returns them. BatchNorm updates the views in place."""
    ps = {n: v.unbind(0) for n, v in params.items()}
    bs = {n: v.unbind(0) for n, v in buffers.items()}
    k = len(next(iter(ps.values())))
    outs = [fwd({n: t[i] for n, t in ps.items()}, {n: t[i] for n, t in bs.items()}, x) for i in range(k)]
    if feats:
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    return torch.stack(outs)


class Member:
    """One run of a bundle: its config, method, history and best epoch (the bundle holds its weights)."""

    def __init__(self, key: Hashable, cfg: TrainConfig, student: nn.Module, method: Method, method_modules):
        self.key = key
        self.cfg = cfg
        self.student = student  # the member's weights are written here on demand (Bundle.sync_member)
        self.method = method
        self.method_modules: nn.ModuleDict = method_modules
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {
            "val_acc": -1.0,
            "test_acc": -1.0,
            "epoch": 0,
            "test_acc_at_best_val": None,
        }
        self.train_time = 0.0
        self.train_images = 0
        self.teacher_info: dict[str, Any] = {}
        self.init_info: dict[str, Any] = {}
        self.diverged: str | None = None
        self.term_means: dict[str, float] = {}


class StackedOptimizer:
    """SGD or AdamW over stacked ``(K, ...)`` parameters and per-member parameters, with per-member values.

    Each member's slices are updated with torch.optim's single-tensor arithmetic, op for op (``SGD``:
    ``g += wd p; buf = m buf + g; d = g + m buf`` if Nesterov else ``buf``; ``p -= lr d``. ``AdamW``:
    ``p *= 1 - lr wd``, moments, bias corrections, ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``), so a
    member's update is bit for bit a lone run's on the CPU. A vectorised update (hyperparameters as tensors of
    the member dimension) was tried first: its different rounding, amplified by training at initialisation,
    cost up to 1e-4 in the weights after 6 steps; the per-member loop costs K x (number of parameter tensors)
    small ops per step, negligible beside the convolutions. Buffers start at zero, which equals torch's first
    step (``buf = g``) exactly.
    """

    def __init__(
        self,
        kind: str,
        stacked: list[Tensor],
        member_params: list[list[Tensor]],
        *,
        momentum: list[float],
        nesterov: list[bool],
        weight_decay: list[float],
    ):
        self.kind = kind
        self.stacked = stacked
        self.member_params = member_params
        self.momentum = list(momentum)
        self.nesterov = list(nesterov)
        self.weight_decay = list(weight_decay)
        self.t = 0  # steps taken (shared by all members)
        names = ("buf",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state_stacked = [{n: torch.zeros_like(p) for n in names} for p in stacked]
        self.state_member = [[{n: torch.zeros_like(p) for n in names} for p in ps] for ps in member_params]

    @property
    def size(self) -> int:
        return len(self.member_params)

    def zero_grad(self) -> None:
        for p in self.stacked:
            p.grad = None
        for ps in self.member_params:
            for p in ps:
                p.grad = None

    @torch.no_grad()
    def step(self, lrs: list[float]) -> None:
        """One step of every member; member ``i``'s slice of each stacked tensor is updated with the very
        operations (and Python-float hyperparameters) of torch.optim's single-tensor path."""
        self.t += 1
        for i, lr in enumerate(lrs):
            slots = [
                (p.grad[i] if p.grad is not None else None, p[i], st)
                for p, st in zip(self.stacked, self.member_slots(i))
            ]
            slots += [(p.grad, p, st) for p, st in zip(self.member_params[i], self.state_member[i])]
            for g, p, st in slots:
                if g is None:
                    continue
                if self.kind == "sgd":
                    self._sgd(p, g, st, lr, self.weight_decay[i], self.momentum[i], self.nesterov[i])
                else:
                    self._adamw(p, g, st, lr, self.weight_decay[i], self.t)

    @staticmethod
    def _sgd(
        p: Tensor, g: Tensor, st: dict[str, Tensor], lr: float, wd: float, m: float, nesterov: bool
    ) -> None:
        if wd != 0:
            g = g.add(p, alpha=wd)
        if m != 0:
            buf = st["buf"]
            buf.mul_(m).add_(g)  # from zero: the first step gives buf = g, torch's clone
            g = g.add(buf, alpha=m) if nesterov else buf
        p.add_(g, alpha=-lr)

    @staticmethod
    def _adamw(p: Tensor, g: Tensor, st: dict[str, Tensor], lr: float, wd: float, t: int) -> None:
        b1, b2 = ADAMW_BETAS
        if wd != 0:
            p.mul_(1 - lr * wd)
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = lr / (1 - b1**t)
        denom = (st["exp_avg_sq"].sqrt() / (1 - b2**t) ** 0.5).add_(ADAMW_EPS)
        p.addcdiv_(st["exp_avg"], denom, value=-step_size)

    # ------------------------------------------------------------------ per-member views
    def member_slots(self, i: int) -> list[dict[str, Tensor]]:
        """Member ``i``'s state per parameter, in the order stacked then member parameters (views)."""
        return [{n: v[i] for n, v in st.items()} for st in self.state_stacked] + self.state_member[i]

    def keep(self, idx: list[int]) -> None:
        """Keep only members ``idx`` (in that order)."""
        sel = torch.tensor(idx, dtype=torch.long, device=self.stacked[0].device if self.stacked else None)
        self.state_stacked = [{n: v.index_select(0, sel) for n, v in st.items()} for st in self.state_stacked]
        self.state_member = [self.state_member[i] for i in idx]
        self.member_params = [self.member_params[i] for i in idx]
        self.momentum = [self.momentum[i] for i in idx]
        self.nesterov = [self.nesterov[i] for i in idx]
        self.weight_decay = [self.weight_decay[i] for i in idx]


class Bundle:
    """K members trained as one stacked student with one teacher forward per batch.

    ``Bundle(cfgs, data=None, keys=None)``; ``run()`` yields, per epoch, one metrics dict per member (the lone
    Trainer's keys plus ``member``, the member's key, and ``bundle_size``); a member whose loss became NaN or
    infinite gets ``{"member", "epoch", "diverged": True, "error"}`` instead and is dropped. ``drop(key)``
    removes a member, ``state_dict()``/``load_state_dict()`` checkpoint the whole bundle,
    ``member_state(key)``/``load_member_state(key, state)`` one member in the lone Trainer's state.pt format.
    """

    def __init__(
        self,
        cfgs: Sequence[TrainConfig | dict],
        data: DataBundle | None = None,
        *,
        keys: Sequence[Hashable] | None = None,
        mode: str = "loop",
        log: Callable[[str], None] | None = None,
        progress: bool = False,
        teacher_info: dict[str, Any] | None = None,
        init_info: dict[str, Any] | None = None,
    ):
        cfgs = [as_config(c) for c in cfgs]
        check_bundle(cfgs)
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not valid; choose one of {', '.join(MODES)}")
        self.mode = mode
        keys = list(range(len(cfgs))) if keys is None else list(keys)
        if len(keys) != len(cfgs) or len(set(keys)) != len(keys):
            raise ConfigError(f"keys={keys} must be {len(cfgs)} distinct names, one per config")
        self.log = log or (lambda s: None)
        self.progress = progress
        # The lead Trainer is member 0 and holds what the bundle shares: data, loaders, teacher, devices.
        lead = Trainer(cfgs[0], data=data, log=self.log, teacher_info=teacher_info, init_info=init_info)
        self.shared = lead
        self.device = lead.device
        self.method_cls = lead.method_cls
        self.members = [self._lead_member(keys[0], lead)]
        for key, cfg in zip(keys[1:], cfgs[1:]):
            self.members.append(self._make_member(key, cfg))
        self.epochs = cfgs[0].epochs
        self.epoch = 0
        self.step = 0
        self.lrs = [m.cfg.lr for m in self.members]
        self._setup_done = False
        self._stack()

    # ------------------------------------------------------------------ construction
    def _lead_member(self, key: Hashable, lead: Trainer) -> Member:
        m = Member(key, lead.cfg, lead.student, lead.method, lead.method_modules)
        m.teacher_info, m.init_info = lead.teacher_info, lead.init_info
        return m

    def _make_member(self, key: Hashable, cfg: TrainConfig) -> Member:
        """Create a member's student and method in the RNG order of a lone Trainer with ``cfg``."""
        lead, d = self.shared, self.shared.data
        seed_everything(cfg.seed)
        student = create_model(cfg.model, d.num_classes, d.in_channels).to(self.device)
        if lead.use_channels_last:
            student = student.to(memory_format=torch.channels_last)
        replay = self.method_cls.trainable_modules is not Method.trainable_modules
        if replay and cfg.teacher:
            load_teacher_model(cfg, d)  # advances the global RNG as the lone run's teacher load does
        if cfg.init:
            if replay:
                student.load_state_dict(load_init_model(cfg, d)[0].state_dict())
            else:
                student.load_state_dict(lead.student.state_dict())  # the same file, read once
        method = self.method_cls(dict(cfg.hp), lead.method_context(student))
        modules = nn.ModuleDict(method.trainable_modules()).to(self.device)
        m = Member(key, cfg, student, method, modules)
        m.teacher_info, m.init_info = dict(lead.teacher_info), dict(lead.init_info)
        return m

    def _stack(self) -> None:
        students = [m.student for m in self.members]
        params, buffers = stack_module_state(students)
        self.param_names = list(params)
        self.params = params
        self.buffers = buffers
        self.base = copy.deepcopy(students[0]).to("meta")
        cfgs = [m.cfg for m in self.members]
        self.optimizer = StackedOptimizer(
            cfgs[0].optimizer,
            [params[n] for n in self.param_names],
            [list(m.method_modules.parameters()) for m in self.members],
            momentum=[c.momentum for c in cfgs],
            nesterov=[c.nesterov for c in cfgs],
            weight_decay=[c.weight_decay for c in cfgs],
        )
        feats = self.method_cls.needs_student_features

        def fwd(p, b, x):
            return functional_call(self.base, (p, b), (x,), {"return_features": True} if feats else {})

        def fwd_eval(p, b, x):
            return functional_call(self.base, (p, b), (x,))

        if self.mode == "vmap":
            self._forward = vmap(fwd, in_dims=(0, 0, None), randomness="different")
            self._forward_eval = vmap(fwd_eval, in_dims=(0, 0, None), randomness="different")
        else:
            self._forward = lambda p, b, x: _per_member(fwd, p, b, x, feats)
            self._forward_eval = lambda p, b, x: _per_member(fwd_eval, p, b, x, False)

    # ------------------------------------------------------------------ members
    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def keys(self) -> list[Hashable]:
        return [m.key for m in self.members]

    def index(self, key: Hashable) -> int:
        for i, m in enumerate(self.members):
            if m.key == key:
                return i
        raise ConfigError(f"the bundle has no member {key!r}; its members: {self.keys}")

    def member(self, key: Hashable) -> Member:
        return self.members[self.index(key)]

    def drop(self, key: Hashable) -> Member:
        """Remove member ``key`` (e.g. pruned by early stopping) and repack the stacks; returns it, weights
        synced into its ``student`` (take its :meth:`member_state` or :meth:`save_model` first if they are
        wanted). Dropping the last member leaves an empty bundle whose ``run()`` ends at once."""
        i = self.index(key)
        member = self.sync_member(key)
        keep = [j for j in range(self.size) if j != i]
        self.members = [self.members[j] for j in keep]
        self.lrs = [self.lrs[j] for j in keep]
        if keep:
            sel = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.params = {
                n: v.detach().index_select(0, sel).requires_grad_(True) for n, v in self.params.items()
            }
            self.buffers = {n: v.index_select(0, sel) for n, v in self.buffers.items()}
            self.optimizer.stacked = [self.params[n] for n in self.param_names]
            self.optimizer.keep(keep)
        return member

    @torch.no_grad()
    def sync_member(self, key: Hashable) -> Member:
        """Write member ``key``'s stacked weights and BN statistics into its own ``student`` module."""
        i = self.index(key)
        m = self.members[i]
        own = dict(m.student.named_parameters())
        own.update(dict(m.student.named_buffers()))
        for n, v in list(self.params.items()) + list(self.buffers.items()):
            own[n].copy_(v[i])
        return m

    # ------------------------------------------------------------------ training
    def _set_lrs(self) -> None:
        n = len(self.shared.train_loader)
        self.lrs = [
            c.lr
            * lr_factor(
                self.step / n,
                epochs=c.epochs,
                schedule=c.schedule,
                milestones=c.milestones,
                lr_decay=c.lr_decay,
                warmup_epochs=c.warmup_epochs,
            )
            for c in (m.cfg for m in self.members)
        ]

    def train_pass(
        self, e: int, max_steps: int | None = None
    ) -> tuple[list[dict[str, Tensor]], int, int, float]:
        """Optimiser steps of every member over epoch ``e``'s batches (at most ``max_steps``).

        Returns (per member: summed loss terms as device tensors, steps, images per member, seconds).
        """
        lead, mcls = self.shared, self.method_cls
        self.base.train()
        for m in self.members:
            m.method_modules.train()
        sums: list[dict[str, Tensor]] = [{} for _ in self.members]
        n_img = steps = 0
        loader = lead.train_loader
        total = len(loader) if max_steps is None else min(max_steps, len(loader))
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"bundle of {self.size}, epoch {e + 1}/{self.epochs}", leave=False,
                       file=sys.stderr, dynamic_ncols=True, mininterval=0.5)  # fmt: skip
        lead._sync()
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader.epoch(e)):
            if i >= total or not self.members:
                break
            self._set_lrs()
            t_logits = t_feats = None
            with lead.autocast():
                if lead.teacher is not None:
                    with torch.inference_mode():
                        t_out = forward(lead.teacher, x, mcls.needs_teacher_features)
                    t_logits = t_out[0].float().clone()
                    t_feats = t_out[1].float().clone() if t_out[1] is not None else None
                s_out = self._forward(self.params, self.buffers, x)
            s_logits, s_feats = s_out if mcls.needs_student_features else (s_out, None)
            total_loss = None
            for k, m in enumerate(self.members):
                out = StepOutputs(
                    student_logits=s_logits[k].float(),
                    targets=y,
                    epoch=e,
                    step=i,
                    teacher_logits=t_logits,
                    student_features=s_feats[k].float() if s_feats is not None else None,
                    teacher_features=t_feats,
                    images=x,
                )
                terms = m.method.losses(out)
                loss = sum(terms.values())
                total_loss = loss if total_loss is None else total_loss + loss
                for name, v in terms.items():
                    v = v.detach().float()
                    sums[k][name] = sums[k][name] + v if name in sums[k] else v.clone()
            self.optimizer.zero_grad()
            total_loss.backward()
            self.optimizer.step(self.lrs)
            self.step += 1
            steps += 1
            n_img += y.shape[0]
            if bar is not None:
                bar.update(1)
        lead._sync()
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        return sums, steps, n_img, seconds

    @torch.no_grad()
    def evaluate(self, loader) -> list[dict[str, float]]:
        """Accuracy (%) and mean cross-entropy of every member on ``loader``, one vmapped forward per batch."""
        self.base.eval()
        k = self.size
        correct = torch.zeros(k, device=self.device)
        loss_sum = torch.zeros(k, device=self.device)
        n = 0
        for x, y in loader.epoch(0):
            with self.shared.autocast():
                logits = self._forward_eval(self.params, self.buffers, x)
            logits = logits.float()
            b = y.shape[0]
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, b).sum(1)
            correct += (logits.argmax(-1) == y).sum(1)
            n += b
        self.base.train()
        n = max(n, 1)
        return [{"acc": 100.0 * c / n, "loss": s / n} for c, s in zip(correct.tolist(), loss_sum.tolist())]

    def run(self) -> Iterator[list[dict[str, Any]]]:
        """Train the remaining epochs, yielding per epoch one metrics dict per member."""
        if not self._setup_done and self.epoch == 0:
            for m in self.members:
                m.method.setup()
        self._setup_done = True
        while self.epoch < self.epochs and self.members:
            yield self.train_epoch()

    def train_epoch(self) -> list[dict[str, Any]]:
        e, lead = self.epoch, self.shared
        for m in self.members:
            m.method.on_epoch_start(e)
        sums, steps, n_img, train_s = self.train_pass(e)
        steps = max(steps, 1)
        self.epoch += 1
        out: list[dict[str, Any]] = []
        for m, s in list(zip(self.members, sums)):
            term_means = {k: v.item() / steps for k, v in s.items()}
            m.diverged = diverged_message(e + 1, term_means)
            m.term_means = term_means
            if m.diverged:
                out.append({"member": m.key, "epoch": self.epoch, "diverged": True, "error": m.diverged})
                self.drop(m.key)
        if not self.members:
            return out
        t1 = time.perf_counter()
        vals = self.evaluate(lead.val_loader) if lead.val_loader is not None else [None] * self.size
        tests = self.evaluate(lead.test_loader)
        eval_s = time.perf_counter() - t1
        for k, m in enumerate(self.members):
            m.epoch = self.epoch
            m.train_time += train_s
            m.train_images += n_img
            metrics = record_epoch(
                m,
                lr=self.lrs[k],
                term_means=m.term_means,
                val=vals[k],
                test=tests[k],
                n_img=n_img,
                train_s=train_s,
                eval_s=eval_s,
            )
            metrics["member"] = m.key
            metrics["bundle_size"] = self.size
            out.append(metrics)
        return out

    # ------------------------------------------------------------------ results and checkpoints
    def result(self, key: Hashable) -> dict[str, Any]:
        """What member ``key``'s result.json holds (the lone Trainer's result, plus ``bundle_size``)."""
        m = self.sync_member(key)
        res = run_result(m, data_resident_bytes=self.shared.data_resident_bytes(), device=self.device)
        res["bundle_size"] = self.size
        return res

    def save_model(self, key: Hashable, path: str | Path) -> None:
        from kdtune.models.checkpoint import save_model

        m, d = self.sync_member(key), self.shared.data
        save_model(path, m.student, m.cfg.model, d.num_classes, d.in_channels, model_meta(m, d.name))

    def member_state(self, key: Hashable) -> dict[str, Any]:
        """Member ``key``'s resumable state in the lone Trainer's state.pt format (optimiser in torch form)."""
        i = self.index(key)
        m = self.sync_member(key)
        params = list(m.student.parameters()) + list(m.method_modules.parameters())
        c = m.cfg
        if c.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lrs[i], momentum=c.momentum,
                                  nesterov=c.nesterov and c.momentum > 0, weight_decay=c.weight_decay)  # fmt: skip
        else:
            opt = torch.optim.AdamW(params, lr=self.lrs[i], weight_decay=c.weight_decay)
        if self.optimizer.t > 0:
            for p, slot in zip(params, self.optimizer.member_slots(i)):
                if c.optimizer == "sgd":
                    if c.momentum > 0:
                        opt.state[p] = {"momentum_buffer": slot["buf"].detach().clone()}
                else:
                    opt.state[p] = {
                        "step": torch.tensor(float(self.optimizer.t)),
                        "exp_avg": slot["exp_avg"].detach().clone(),
                        "exp_avg_sq": slot["exp_avg_sq"].detach().clone(),
                    }
        return training_state(m, step=self.step, optimizer=opt.state_dict(), device=self.device)

    @torch.no_grad()
    def load_member_state(self, key: Hashable, state: dict[str, Any]) -> None:
        """Load a state.pt (of a lone run or a bundle member) into member ``key``; its epoch and step must be the
        bundle's, unless this is the first state loaded into a fresh bundle (which then takes them)."""
        i = self.index(key)
        m = self.members[i]
        epoch, step = int(state["epoch"]), int(state["step"])
        if self._setup_done and (epoch, step) != (self.epoch, self.step):
            raise CheckpointError(
                f"cannot load member {key!r}: its state is at epoch {epoch} (step {step}) but the bundle is at "
                f"epoch {self.epoch} (step {self.step}); resume members saved together"
            )
        apply_training_state(m, state, self.device)
        own = dict(m.student.named_parameters())
        own.update(dict(m.student.named_buffers()))
        for n, v in list(self.params.items()) + list(self.buffers.items()):
            v[i].copy_(own[n])
        opt_state = state["optimizer"]["state"]
        names = {"buf": "momentum_buffer", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
        for j, slot in enumerate(self.optimizer.member_slots(i)):
            saved = opt_state.get(j, opt_state.get(str(j), {}))
            for n, v in slot.items():
                src = saved.get(names[n])
                v.copy_(src) if src is not None else v.zero_()  # no buffer: momentum 0 or not stepped yet
        self.epoch, self.step = epoch, step
        self.optimizer.t = step
        self._setup_done = True

    def state_dict(self) -> dict[str, Any]:
        """The whole bundle: its format, epoch and step, and each member's :meth:`member_state` with its key."""
        return {
            "kdtune_bundle": BUNDLE_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "keys": list(self.keys),
            "members": [self.member_state(k) for k in self.keys],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kdtune_bundle") != BUNDLE_FORMAT:
            raise CheckpointError(
                "this file is not a kdtune bundle state; pass the file Bundle.save_state wrote"
            )
        if list(state["keys"]) != self.keys:
            raise CheckpointError(
                f"the saved bundle holds members {list(state['keys'])} but this one {self.keys}; "
                "build the bundle from the saved members' configs"
            )
        self._setup_done = False
        for key, st in zip(state["keys"], state["members"]):
            self.load_member_state(key, st)

    def save_state(self, path: str | Path) -> None:
        atomic_torch_save(self.state_dict(), Path(path))

    def load_state(self, path: str | Path) -> None:
        self.load_state_dict(read_state(path, self.device))
