"""A fused bundle: K runs of one group (same student architecture, method, teacher, data and batches) trained
as one stacked model, each member with its own hyperparameters and init seed.

Shared: the data, the batches and their augmented views (one data seed), the teacher's forward pass (once per
batch) and validation logits, the config but :data:`FUSABLE_FIELDS`; per member: those fields (seed, hp, lr,
optimiser, schedule, run directory), its parameters, BatchNorm statistics, optimiser state, Method instance
(the lone run's), history and best epoch. Modes (``mode``): ``"grouped"`` (:func:`widen`), ``"loop"``,
``"loop_cl"``, ``"vmap"``; ``"auto"`` (:data:`DEFAULT_MODE`) keeps the fastest exact one of :data:`AUTO_CANDIDATES`.

**Exactness.** A member must end with the weights of the same config trained alone by
:class:`~kdtune.engine.trainer.Trainer` on the same data seed, bit for bit (:meth:`Bundle.probe_exact` decides
per mode; ``loop`` always is). A mode asked for by name that is inexact runs only with ``allow_inexact=True``
(``bundle_exact: false`` in its results); without it, it is refused in one line. A member's state is the
lone Trainer's (:meth:`Bundle.member_state`); a method with ``Method.unfusable`` is refused.
More: docs/bundle.md (the modes, the probe, the optimisers, resume), docs/exactness.md (why bit for bit).
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from kdtune.config import TrainConfig, as_config
from kdtune.data import DataBundle
from kdtune.engine.diagnostics import epoch_agreement
from kdtune.engine.record import RunRecord, model_meta, record_epoch
from kdtune.engine.schedule import lr_factor
from kdtune.engine.trainer import (
    Trainer,
    add_terms,
    apply_training_state,
    diverged_message,
    load_init_model,
    load_teacher_model,
    run_result,
    seed_everything,
    teacher_outputs,
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
MODES = ("auto", "grouped", "loop", "loop_cl", "vmap")  # how the stacked student runs (the module docstring)
DEFAULT_MODE = "auto"
# what "auto" times (loop_cl only where the lone run is not channels-last already); vmap is slower than the loop
# on the CPU (measured)
AUTO_CANDIDATES = ("grouped", "loop", "loop_cl")
AUTO_CLEAR = 1.2  # "auto": a ratio of step times that one timed step each decides
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
            "compile=true cannot be fused into a bundle (the stacked student is not compiled); drop it"
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


def _quiet(fwd):
    """``fwd`` without torch.func's "performance drop ... batching rule" warning (a known fallback of vmap for
    some ops, measured: vmap is the slowest mode on the CPU), which would print on every bundle built."""

    def run(*args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            return fwd(*args)

    return run


def _channels_last(fwd):
    """``fwd`` with an image batch in channels-last layout (the convolutions then run channels-last)."""

    def run(p, b, x):
        return fwd(p, b, x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)

    return run


class GroupedLinear(nn.Module):
    """K linear layers side by side, one ``bmm``: ``(B, K*F)`` (member-major channels) or ``(K, B, F)`` in,
    ``(K, B, O)`` out; ``weight`` ``(K, O, F)`` and ``bias`` ``(K, O)`` are the stacked members' own."""

    def __init__(self, k: int, lin: nn.Linear):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(k, lin.out_features, lin.in_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(k, lin.out_features, device="meta")) if lin.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], self.k, -1).transpose(0, 1)
        out = torch.bmm(x, self.weight.transpose(1, 2))
        return out if self.bias is None else out + self.bias.unsqueeze(1)


def widen(model: nn.Module, k: int) -> nn.Module | str:
    """``model``'s K members as one module on the meta device (HFTA's fusion): each ``Conv2d`` with K times
    the channels in K times the groups, each ``BatchNorm2d`` over K times the channels (the statistics of
    channel c of member i are those of channel i*C + c: per member, as K lone models keep them), each
    ``Linear`` a :class:`GroupedLinear`. Returns why not (a string) when ``model`` holds another module with
    parameters or buffers, or a dropout (its masks would not be the lone runs' draws)."""
    wide = copy.deepcopy(model).to("meta")
    for mod in list(wide.modules()):
        for cn, c in list(mod.named_children()):
            if isinstance(c, nn.Conv2d):
                setattr(mod, cn, nn.Conv2d(k * c.in_channels, k * c.out_channels, c.kernel_size, c.stride, c.padding,
                                           c.dilation, k * c.groups, c.bias is not None, c.padding_mode,
                                           device="meta"))  # fmt: skip
            elif isinstance(c, nn.BatchNorm2d):
                setattr(mod, cn, nn.BatchNorm2d(k * c.num_features, c.eps, c.momentum, c.affine,
                                                c.track_running_stats, device="meta"))  # fmt: skip
            elif isinstance(c, nn.Linear):
                setattr(mod, cn, GroupedLinear(k, c))
    for name, mod in wide.named_modules():
        if isinstance(mod, nn.Dropout | nn.Dropout2d) and mod.p > 0:
            return f"its {name} is a dropout"
        if not isinstance(mod, nn.Conv2d | nn.BatchNorm2d | GroupedLinear) and (
            any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False))
        ):
            return f"its {name} ({type(mod).__name__}) has no grouped form"
    return wide


def grouped_forward(wide: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
                    feats: bool):  # fmt: skip
    """The K members' forward in one call of :func:`widen`'s module: their stacked tensors seen as the wide
    module's (views: gradients and BatchNorm's in-place updates reach the stacks), the batch repeated once per
    member along the channels, channels-last (mkldnn's grouped convolutions are fastest so). Returns
    ``(K, B, classes)`` logits (and ``(K, B, F)`` features), as vmap does."""
    k = next(iter(params.values())).shape[0]
    mods = dict(wide.named_modules())
    p = {n: v if isinstance(mods[n.rpartition(".")[0]], GroupedLinear) else v.view(-1, *v.shape[2:])
         for n, v in params.items()}  # fmt: skip
    b = {n: v[0] if v.dim() == 1 else v.view(-1, *v.shape[2:]) for n, v in buffers.items()}
    xs = x.repeat(1, k, 1, 1)
    if xs.dim() == 4:
        xs = xs.contiguous(memory_format=torch.channels_last)
    out = functional_call(wide, (p, b), (xs,), {"return_features": True} if feats else {})
    with torch.no_grad():  # num_batches_tracked: member 0's counter was the one passed; every member's moves
        for v in buffers.values():
            if v.dim() == 1 and v.shape[0] > 1:
                v[1:].copy_(v[0])
    if feats:
        logits, f = out
        return logits, f.view(f.shape[0], k, -1).transpose(0, 1)
    return out


class Member(RunRecord):
    """One run of a bundle: its record (config, history, best epoch), method and modules (the bundle holds its
    weights)."""

    def __init__(self, key: Hashable, cfg: TrainConfig, student: nn.Module, method: Method, method_modules):
        self.key = key
        self.start_record(cfg)
        self.student = student  # the member's weights are written here on demand (Bundle.sync_member)
        self.method = method
        self.method_modules: nn.ModuleDict = method_modules
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
        mode: str = DEFAULT_MODE,
        log: Callable[[str], None] | None = None,
        progress: bool = False,
        teacher_info: dict[str, Any] | None = None,
        init_info: dict[str, Any] | None = None,
        allow_inexact: bool = False,
    ):
        cfgs = [as_config(c) for c in cfgs]
        check_bundle(cfgs)
        self.allow_inexact = allow_inexact
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not valid; choose one of {', '.join(MODES)}")
        self.requested_mode = mode
        self.mode = mode  # the mode in use ("auto" resolved by _stack)
        self.mode_timings: dict[str, float] = {}  # "auto": seconds of one student step per exact candidate
        self.mode_exact: dict[str, bool] = {}  # "auto": each candidate's probe verdict (probe_exact)
        self.exact = True  # whether the mode in use is bit for bit the lone kernels' (probe_exact)
        self._reference_probe: list[Tensor] | None = None
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
        if self.requested_mode == "auto":
            self._choose_mode()
        else:
            self._build_forward(self.requested_mode)
            self.exact, worst = self.probe_exact()
            self.mode_exact = {self.mode: self.exact}
            if not self.exact and not self.allow_inexact:
                raise ConfigError(
                    f"mode={self.mode} is not exact here: its probe differs from the lone kernels by {worst:.1e} "
                    "(relative), so its members would not train what their lone runs train; use mode=auto (the "
                    "fastest exact mode) or loop"
                )
            if not self.exact:
                self.log(f"bundle: mode={self.mode} is not exact here ({worst:.1e} relative after its probe): "
                         "its members will not end with their lone runs' weights (allowed: allow_inexact)")
        self._reference_probe = None  # only the decision needed it

    def _choose_mode(self) -> None:
        """``mode="auto"``: of the candidates (:data:`AUTO_CANDIDATES`) that are exact here (:meth:`_probe`:
        bit for bit the lone kernels' results over two training steps with an evaluation between), the one
        whose student forward and backward (a batch of the training shape, on copies of the stacks: nothing is
        trained) is the fastest, timed interleaved after the probe's warm-up, best of 2 unless the first timed
        step of each already differs by :data:`AUTO_CLEAR`. ``loop`` is exact by construction, so there is
        always a candidate. A resumed bundle decides again, among exact modes only."""
        timings: dict[str, float] = {}
        forwards = {}
        exact = {}
        for mode in AUTO_CANDIDATES:
            if mode == "loop_cl" and self.shared.use_channels_last:
                continue  # the lone model runs channels-last already: loop_cl is loop
            self._build_forward(mode)
            if self.mode != mode:  # grouped may have fallen back to the loop
                continue
            exact[mode] = self.probe_exact()
            if exact[mode][0]:
                forwards[mode] = (self._forward, self.wide)
        if len(forwards) > 1:
            for _ in range(2):  # the probe warmed each candidate up
                for mode, (fwd, wide) in forwards.items():
                    timings[mode] = min(timings.get(mode, math.inf), self._step_seconds(fwd, wide))
                if max(timings.values()) > AUTO_CLEAR * min(timings.values()):
                    break  # clear after one timed step each: a second is not worth its time
        best = min(timings, key=timings.get) if timings else "loop"
        self._build_forward(best)
        self.mode_timings = timings
        self.mode_exact = {m: e for m, (e, _) in exact.items()}
        self.exact = True
        notes = [f"{m} {1e3 * t:.1f} ms" for m, t in timings.items()]
        notes += [f"{m} not exact here ({d:.1e} relative after its probe)" for m, (e, d) in exact.items() if not e]
        if notes:
            self.log(f"bundle: {self.size} x {self.members[0].cfg.model} run {best} (one student step: "
                     f"{', '.join(notes)})")  # fmt: skip

    def probe_exact(self) -> tuple[bool, float]:
        """Whether the current mode computes bit for bit what the lone kernels (``loop``) compute, on this
        device and the training batch's shape: (exact, largest relative difference). The probe
        (:meth:`_probe`) trains copies of the stacks two steps with an evaluation pass between, as an epoch
        boundary does; a mode that rounds differently anywhere differs there. Any difference counts: training
        amplifies one rounding difference into a different model (a ReLU input within 1e-7 of zero flips its
        sign; measured, docs/exactness.md)."""
        if self.mode == "loop":
            return True, 0.0
        mode, fwd, fwd_eval, wide = self.mode, self._forward, self._forward_eval, self.wide
        if self._reference_probe is None:
            self._build_forward("loop")
            self._reference_probe = self._probe(self._forward, self._forward_eval, None)
            self._forward, self._forward_eval, self.wide, self.mode = fwd, fwd_eval, wide, mode
        got = self._probe(fwd, fwd_eval, wide)
        want = self._reference_probe
        if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
            return False, math.inf
        worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                    for a, b in zip(got, want))  # fmt: skip
        return all(torch.equal(a, b) for a, b in zip(got, want)), worst

    def _probe(self, fwd, fwd_eval, wide) -> list[Tensor]:
        """Two training steps (forward, backward, an SGD update) of copies of the stacks through ``fwd``, with
        an evaluation forward through ``fwd_eval`` between, on a random batch of the training shape: the
        outputs, gradients and BatchNorm statistics along the way. The global RNG is left as it was."""
        lead = self.shared
        x, params, buffers = self._probe_inputs()
        seen: list[Tensor] = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for step in range(2):
                self._train_mode(True, wide)
                with lead.autocast():
                    out = fwd(params, buffers, x)
                outs = list(out) if isinstance(out, tuple) else [out]
                sum(o.float().logsumexp(-1).sum() for o in outs).backward()
                seen += [o.detach() for o in outs] + [p.grad for p in params.values()]
                seen += [b.clone() for b in buffers.values()]
                with torch.no_grad():
                    for p in params.values():
                        p.sub_(0.01 * p.grad)
                        p.grad = None
                if step == 0:
                    self._train_mode(False, wide)
                    with torch.no_grad(), lead.autocast():
                        seen.append(fwd_eval(params, buffers, x))
        self._train_mode(True, wide)
        return seen

    def _step_seconds(self, fwd, wide=None) -> float:
        """Seconds of one forward and backward of the stacked student through ``fwd``, on a random batch of
        the training batch's shape and copies of the stacked tensors (the bundle's own are not touched)."""
        lead = self.shared
        x, params, buffers = self._probe_inputs()
        self._train_mode(True, wide)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            lead._sync()
            t0 = time.perf_counter()
            with lead.autocast():
                out = fwd(params, buffers, x)
            logits = out[0] if isinstance(out, tuple) else out
            logits.float().logsumexp(-1).sum().backward()
            lead._sync()
        return time.perf_counter() - t0

    def _probe_inputs(self) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """A random batch of the training shape and layout, and copies of the stacks (the bundle's own are not
        touched): what the exactness probe and the timing step run on."""
        lead = self.shared
        x = self._probe_batch(max(1, min(lead.cfg.batch_size, len(lead.data.train.y))))
        if lead.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        return x, params, {k: v.clone() for k, v in self.buffers.items()}

    def _probe_batch(self, n: int) -> Tensor:
        """``n`` random inputs of the data's shape (images, or vectors for the toys) from a generator of their
        own (the global RNG is the runs')."""
        d = self.shared.data
        shape = (n, d.in_channels, d.image_size, d.image_size) if d.image_size else (n, d.in_channels)
        return torch.randn(*shape, device=self.device, generator=torch.Generator(self.device).manual_seed(0))

    def _build_forward(self, mode: str) -> None:
        """The stacked student's forward in ``mode`` for the current members (again after :meth:`drop`: K
        changed); sets :attr:`mode` (``"grouped"`` falls back to ``"loop"`` when it cannot run)."""
        feats = self.method_cls.needs_student_features
        self.wide = None
        if mode == "grouped":
            self.wide = widen(self.base, self.size)
            why = self.wide if isinstance(self.wide, str) else None
            if why is None and not self._grouped_agrees():
                why = "its grouped forward differs from the lone model's on a probe batch"
            if why is not None:
                self.log(f"bundle: {self.members[0].cfg.model} runs its members one after another (mode loop): {why}")
                mode, self.wide = "loop", None
        self.mode = mode

        def fwd(p, b, x):
            return functional_call(self.base, (p, b), (x,), {"return_features": True} if feats else {})

        def fwd_eval(p, b, x):
            return functional_call(self.base, (p, b), (x,))

        if mode == "loop_cl":
            fwd, fwd_eval = _channels_last(fwd), _channels_last(fwd_eval)
        if mode == "grouped":
            wide = self.wide
            self._forward = lambda p, b, x: grouped_forward(wide, p, b, x, feats)
            self._forward_eval = lambda p, b, x: grouped_forward(wide, p, b, x, False)
        elif mode == "vmap":
            self._forward = _quiet(vmap(fwd, in_dims=(0, 0, None), randomness="different"))
            self._forward_eval = _quiet(vmap(fwd_eval, in_dims=(0, 0, None), randomness="different"))
        else:
            self._forward = lambda p, b, x: _per_member(fwd, p, b, x, feats)
            self._forward_eval = lambda p, b, x: _per_member(fwd_eval, p, b, x, False)

    def _train_mode(self, on: bool, wide: nn.Module | None = None) -> None:
        for module in (self.base, wide if wide is not None else self.wide):
            if module is not None:
                module.train(on)

    @torch.no_grad()
    def _grouped_agrees(self) -> bool:
        """Whether the grouped student computes what K lone students compute, on one random batch in eval mode
        (no statistic changes): a model whose forward mixes channels (a concatenation, a channel shuffle) would
        mix the members' channels, and is run in the loop instead."""
        x = self._probe_batch(2)
        self.wide.eval(), self.base.eval()

        def lone(p, b, x):
            return functional_call(self.base, (p, b), (x,))

        try:
            want = _per_member(lone, self.params, self.buffers, x, False)
            got = grouped_forward(self.wide, self.params, self.buffers, x, False)
        except (RuntimeError, ValueError):
            return False
        finally:
            self.wide.train(), self.base.train()
        # A mixed channel changes the logits by their own size; rounding (TF32 convolutions on a GPU: ~1e-3
        # relative) stays far below this bound.
        scale = want.abs().max().clamp_min(1.0)
        return got.shape == want.shape and bool(((got - want).abs().max() <= 1e-2 * scale).item())

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
            if self.mode == "grouped":
                self._build_forward("grouped")  # K changed: a narrower wide module
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
        self._train_mode(True)
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
        stored, writer = lead.store_epoch(e, total)
        lead._sync()
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader.epoch(e)):
            if i >= total or not self.members:
                break
            self._set_lrs()
            t_logits = t_feats = None
            with lead.autocast():
                if lead.teacher is not None:
                    t_logits, t_feats = teacher_outputs(lead.teacher, x, mcls.needs_teacher_features, i, stored, writer)
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
                add_terms(sums[k], terms)
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
        lead.store_publish(writer)
        return sums, steps, n_img, seconds

    @torch.no_grad()
    def evaluate(self, loader, keep_logits: bool = False) -> list[dict[str, Any]]:
        """Accuracy (%) and mean cross-entropy of every member on ``loader``, one vmapped forward per batch;
        ``keep_logits``: also each member's float32 ``logits`` ``[N, C]`` of that pass (as the lone Trainer's)."""
        self._train_mode(False)
        k = self.size
        correct = torch.zeros(k, device=self.device)
        loss_sum = torch.zeros(k, device=self.device)
        n = 0
        kept: list[Tensor] = []
        for x, y in loader.epoch(0):
            with self.shared.autocast():
                logits = self._forward_eval(self.params, self.buffers, x)
            logits = logits.float()
            b = y.shape[0]
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, b).sum(1)
            correct += (logits.argmax(-1) == y).sum(1)
            n += b
            if keep_logits:
                kept.append(logits)
        self._train_mode(True)
        n = max(n, 1)
        out = [{"acc": 100.0 * c / n, "loss": s / n} for c, s in zip(correct.tolist(), loss_sum.tolist())]
        if keep_logits and kept:
            stacked = torch.cat(kept, dim=1)  # (K, N, C)
            for i, o in enumerate(out):
                o["logits"] = stacked[i]
        return out

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
        teacher_val = lead.teacher_val_logits()  # made once (the lone run's, the same for every member)
        keep = teacher_val is not None
        vals = self.evaluate(lead.val_loader, keep) if lead.val_loader is not None else [None] * self.size
        agree = [epoch_agreement(teacher_val, v.pop("logits", None)) if v else None for v in vals]
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
                teacher_agreement=agree[k],
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
        res["bundle_mode"] = self.mode
        res["bundle_exact"] = self.exact
        res["teacher_store"] = self.shared.store_report()
        return res

    def save_model(self, key: Hashable, path: str | Path, durable: bool = True) -> None:
        from kdtune.models.checkpoint import save_model

        m, d = self.sync_member(key), self.shared.data
        save_model(path, m.student, m.cfg.model, d.num_classes, d.in_channels, model_meta(m, d.name),
                   durable=durable)  # fmt: skip

    @property
    def data(self):
        return self.shared.data

    def history(self, key: Hashable) -> list[dict[str, Any]]:
        return self.member(key).history

    def student(self, key: Hashable) -> nn.Module:
        """Member ``key``'s own student module, its weights synced from the stacks."""
        return self.sync_member(key).student

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
                "this file is not a kdtune bundle state; pass a state Bundle.state_dict returned"
            )
        if list(state["keys"]) != self.keys:
            raise CheckpointError(
                f"the saved bundle holds members {list(state['keys'])} but this one {self.keys}; "
                "build the bundle from the saved members' configs"
            )
        self._setup_done = False
        for key, st in zip(state["keys"], state["members"]):
            self.load_member_state(key, st)
