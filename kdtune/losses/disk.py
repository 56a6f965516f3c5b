"""DiSK: distilling selective knowledge (Kag, Acar, Gangrade & Saligrama, "Scaffolding a Student to Instill
Knowledge", ICLR 2023 submission; section 3.2, Algorithm 1, eqs. 3-5, appendix A.4-A.5).

A guide ``g(x) in [0, 1]`` -- a small MLP on the teacher's penultimate features and soft predictions -- adds
help to the student's tempered probabilities on the teacher's top-K classes, so that the student may give up
on examples it cannot learn; a budget keeps the help to about ``delta`` of the data. The guide and the student
are trained alternately (Algorithm 1): the guide on ``(1 - alpha) L_dist + lambda L_budget`` (the part of eq. 5
that depends on ``g``), the student on ``alpha L_CE + (1 - alpha) L_dist`` (not on the budget, section 3.2).

The formulas are their functions' (:func:`disk_distill` eq. 4, :func:`budget_loss` eq. 3,
:func:`lambda_schedule`, :func:`fit_student_temperature`); every function here takes any leading dimensions
``(..., B, C)`` and reduces over the batch dimension ``B``. The defaults (``help_norm="renorm"``,
``budget_relax="indicator"``, ``alternate="passes"``) make a guide that selects; the paper's literal forms and
the official code's are options. More: docs/methods.md §DiSK (why, as measured on the toys; every option).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses.base import HParam, Method, MethodContext, StepOutputs, register_method

HELP_NORMS = ("renorm", "code", "eq4")

WARM_START_HINT = (
    "DiSK needs a CE-trained student: run `kdtune train method=ce model=<student> out=runs/ce` "
    "and pass init=runs/ce/final.pt"
)


def _lead(x: float | Tensor, like: Tensor, extra: int) -> Tensor:
    """``x`` as a tensor shaped to broadcast against ``like``'s leading dimensions plus ``extra`` trailing ones."""
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return t.reshape(*t.shape, *([1] * extra))


def topk_mask(teacher_logits: Tensor, k: int) -> Tensor:
    """``1[y in topK(t(x))]`` as a float mask shaped like ``teacher_logits`` (ties broken by ``torch.topk``)."""
    c = teacher_logits.shape[-1]
    if not 1 <= k <= c:
        raise ConfigError(f"DiSK K={k} must lie in [1, number of classes={c}]; lower K")
    idx = torch.topk(teacher_logits, k, dim=-1).indices
    return torch.zeros_like(teacher_logits, dtype=torch.float32).scatter_(-1, idx, 1.0)


def helped_probs(
    student_logits: Tensor,
    teacher_logits: Tensor,
    g: Tensor,
    tau_s: float | Tensor,
    k: int,
    normalize: bool = False,
) -> Tensor:
    """The student's helped prediction of eq. 4: ``s^{tau_s}(x) + 1[y in topK(t(x))] g(x)``.

    ``g`` has the shape of the logits without the class dimension. With ``g = 0`` this is ``s^{tau_s}``; the
    classes outside the teacher's top K are never changed; the entries are non-negative and sum to
    ``1 + K g``. ``normalize=True`` divides by ``1 + K g``: the same help as a probability distribution (the
    student's gradient of eq. 4 is the same either way, since ``1 + K g`` does not depend on the student).
    """
    s = F.softmax(student_logits.float() / _lead(tau_s, student_logits.float(), 2), dim=-1)
    gf = g.float().unsqueeze(-1)
    helped = s + topk_mask(teacher_logits, k) * gf
    return helped / (1.0 + k * gf) if normalize else helped


def disk_distill(
    student_logits: Tensor,
    teacher_logits: Tensor,
    g: Tensor,
    tau_t: float,
    tau_s: float | Tensor,
    k: int,
    reduction: str = "mean",
    target: str = "full",
    normalize: bool = False,
) -> Tensor:
    """Eq. 4: ``-tau_t tau_s sum_y t^{tau_t}_y log(s^{tau_s}_y + 1[y in topK] g)``, mean over the batch.

    ``L_dist = -(tau_t tau_s / N) sum_i sum_y t^{tau_t}_y(x_i) log(s^{tau_s}_y(x_i) + 1[y in topK(t(x_i))] g(x_i))``
    -- the cross-entropy form the paper writes (it differs from the KL form by the teacher's entropy, a
    constant in ``s`` and ``g``). The helped vector ``s + 1_K g`` sums to ``1 + K g``.

    ``normalize=True`` uses the helped vector renormalised, ``(s + 1_K g) / (1 + K g)``: the same as adding
    ``tau_t tau_s log(1 + K g)`` per example (the target sums to 1), the official code's extra guide term. It
    leaves the student's gradient unchanged and changes only the guide's.

    ``target="full"`` sums over every class as eq. 4 writes it. ``target="topk"`` keeps only the teacher's
    top-K classes in the target (renormalised over them), in the spirit of the official code's masked
    teacher target: with ``K < C`` and the full target, a helped example's only unhelped terms pull the
    student towards the teacher's *least* likely classes. ``reduction="none"`` returns the per-example values
    ``(..., B)``; ``"mean"`` averages over ``B``. ``tau_s`` may be a tensor of the leading (ensemble)
    dimensions. Computed in float32.
    """
    t = F.softmax(teacher_logits.float() / tau_t, dim=-1)
    if target == "topk":
        t = t * topk_mask(teacher_logits, k)
        t = t / t.sum(dim=-1, keepdim=True)
    elif target != "full":
        raise ConfigError(f"DiSK target={target!r} is not one of full, topk")
    helped = helped_probs(student_logits, teacher_logits, g, tau_s, k, normalize=normalize)
    per = -(t * torch.log(helped.clamp_min(1e-12))).sum(dim=-1)
    per = per * (tau_t * _lead(tau_s, per, 1))
    return per.mean(dim=-1) if reduction == "mean" else per


def student_ce(student_logits: Tensor, targets: Tensor, cap: float | None = None) -> Tensor:
    """Per-example ``-log s^1_y(x)`` ``(..., B)``, optionally capped at ``cap`` (the official code's 5)."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return ce.clamp(max=cap) if cap else ce


def budget_loss(
    student_logits: Tensor,
    targets: Tensor,
    g: Tensor,
    delta: float | Tensor,
    ce_cap: float | None = None,
    norm: str = "N",
    relax: str = "ce",
) -> Tensor:
    """Eq. 3: ``( (1/N) sum_i g(x_i) (-log s^1_{y_i}(x_i)) - delta )_+`` over the batch (the last dimension of g).

    The indicator of a student mistake in the constraint of eq. 2 relaxed to the student's cross-entropy with
    the label.

    ``norm="mistakes"`` divides the sum by the number of the student's mistakes in the batch instead of ``N``
    (the official code; at least 1), which makes ``delta`` a share of the mistakes rather than of the data.
    """
    if relax == "ce":
        cost = student_ce(student_logits, targets, ce_cap)
    elif relax == "indicator":
        cost = (student_logits.argmax(dim=-1) != targets).float()
    else:
        raise ConfigError(f"DiSK budget_relax={relax!r} is not one of ce, indicator")
    helped = (g.float() * cost).sum(dim=-1)
    if norm == "N":
        denom = torch.full_like(helped, float(g.shape[-1]))
    elif norm == "mistakes":
        denom = (student_logits.argmax(dim=-1) != targets).float().sum(dim=-1).clamp_min(1.0)
    else:
        raise ConfigError(f"DiSK budget_norm={norm!r} is not one of N, mistakes")
    d = _lead(delta, helped, 0) if isinstance(delta, Tensor) else delta
    return F.relu(helped / denom - d)


def helped_mistakes(student_logits: Tensor, targets: Tensor, g: Tensor) -> Tensor:
    """The unrelaxed budget of eq. 2: ``(1/N) sum_i g(x_i) 1[y_i != argmax s(x_i)]`` over the batch."""
    wrong = (student_logits.argmax(dim=-1) != targets).float()
    return (g.float() * wrong).mean(dim=-1)


def guide_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    g: Tensor,
    *,
    alpha: float,
    lam: float,
    tau_t: float,
    tau_s: float | Tensor,
    k: int,
    delta: float | Tensor,
    ce_cap: float | None = None,
    target: str = "full",
    help_norm: str = "renorm",
    budget_norm: str = "N",
    budget_relax: str = "indicator",
) -> Tensor:
    """The part of eq. 5 that depends on ``g``: ``(1 - alpha) L_dist + lambda L_budget`` (student detached).

    ``help_norm`` (see the module docstring): ``"renorm"`` evaluates ``L_dist`` on the renormalised helped
    distribution; ``"code"`` adds the official code's ``mean log(1 + K g)`` with weight ``1 - alpha`` (its
    ``l_nll``) to eq. 4 as written; ``"eq4"`` is eq. 4 as written, whose unnormalised help lowers ``L_dist``
    on every example, so only the budget limits it. Reduces over the batch (last) dimension of ``g``.
    """
    if help_norm not in HELP_NORMS:
        raise ConfigError(f"DiSK help_norm={help_norm!r} is not one of {', '.join(HELP_NORMS)}")
    s = student_logits.detach()
    t = teacher_logits.detach()
    dist = disk_distill(s, t, g, tau_t, tau_s, k, target=target, normalize=help_norm == "renorm")
    obj = (1.0 - alpha) * dist + lam * budget_loss(s, targets, g, delta, ce_cap, budget_norm, budget_relax)
    if help_norm == "code":
        obj = obj + (1.0 - alpha) * torch.log1p(k * g.float()).mean(dim=-1)
    return obj


def lambda_schedule(epoch: int, epochs: int, lambda_min: float, lambda_max: float, period: int) -> float:
    """Algorithm 1 line 8, with a monotone final period (see the module docstring). ``epoch`` counts from 0.

    ``lambda = lambda_min + (lambda_max - lambda_min) (1 - cos(pi (r mod Lambda_T) / Lambda_T)) / 2``
    per epoch ``r``; "for the final period, we increase lambda monotonically": the final period starts at the
    last period boundary ``r_0`` that leaves a whole period (``r_0 = Lambda_T (R // Lambda_T - 1)``) and rises
    as ``(1 - cos(pi (r - r_0) / (R - 1 - r_0))) / 2`` to exactly ``lambda_max`` on the last epoch, with no
    drop.

    The final period starts at the last period boundary that leaves at least one whole period, so lambda
    restarts only where the cosine schedule restarts anyway and then rises without a drop to the end.
    """
    if epochs < 1 or period < 1:
        raise ValueError("epochs and period must be >= 1")
    final_start = period * max(epochs // period - 1, 0)
    if epoch >= final_start:
        span = epochs - 1 - final_start
        frac = 1.0 if span <= 0 else min((epoch - final_start) / span, 1.0)
    else:
        frac = (epoch % period) / period
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * frac)) / 2.0


@torch.no_grad()
def fit_student_temperature(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tau_t: float,
    t_min: float = 0.05,
    t_max: float = 100.0,
    iters: int = 80,
) -> Tensor:
    """``argmin_T sum_i KL(t^{tau_t}(x_i) || s^T(x_i))`` (section 3.2), over ``[t_min, t_max]``.

    Inputs ``(..., N, C)``; returns ``T`` with the leading shape (a 0-d tensor for ``(N, C)``). With
    ``beta = 1/T`` the objective is ``sum_i [-beta <t_i, z_i> + logsumexp(beta z_i)] + const``, convex in beta
    with derivative ``sum_i (E_{softmax(beta z_i)}[z_i] - <t_i, z_i>)``, non-decreasing: bisection on its sign in
    ``log beta``. If the minimum lies outside the range, the nearer end is returned.
    """
    z = student_logits.double()
    z = z - z.mean(dim=-1, keepdim=True)
    t = F.softmax(teacher_logits.double() / tau_t, dim=-1)
    target = (t * z).sum(dim=-1).sum(dim=-1)  # (...)

    def deriv(beta: Tensor) -> Tensor:
        p = F.softmax(z * beta.unsqueeze(-1).unsqueeze(-1), dim=-1)
        return (p * z).sum(dim=-1).sum(dim=-1) - target

    lead = target.shape
    lo = torch.full(lead, math.log(1.0 / t_max), dtype=torch.float64, device=z.device)
    hi = torch.full(lead, math.log(1.0 / t_min), dtype=torch.float64, device=z.device)
    for _ in range(iters):
        mid = (lo + hi) / 2
        pos = deriv(mid.exp()) > 0
        hi = torch.where(pos, mid, hi)
        lo = torch.where(pos, lo, mid)
    beta = ((lo + hi) / 2).exp()
    return (1.0 / beta).to(student_logits.dtype if student_logits.is_floating_point() else torch.float32)


class Guide(nn.Module):
    """The guide of appendix A.4: an MLP (default 64 and 128 units, batch norm and ReLU between layers) on the
    teacher's penultimate features concatenated with its soft predictions ``t^1``, one sigmoid output."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for w in hidden:
            layers += [nn.Linear(d, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
            d = w
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, teacher_features: Tensor, teacher_logits: Tensor) -> Tensor:
        x = torch.cat([teacher_features.float().flatten(1), F.softmax(teacher_logits.float(), dim=1)], dim=1)
        return torch.sigmoid(self.net(x)).squeeze(1)


def parse_hidden(text: str) -> tuple[int, ...]:
    """``"64,128"`` -> ``(64, 128)``; ``""`` -> ``()`` (a logistic guide). ConfigError when malformed."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        widths = (0,)
    if any(w < 1 for w in widths):
        raise ConfigError(
            f"disk.guide_hidden={text!r} must be comma-separated positive widths, e.g. '64,128'"
        )
    return widths


def guide_stats(g: Tensor, wrong: Tensor) -> Tensor:
    """Sums over the last dimension for the guide's epoch statistics, stacked last:
    ``[n, sum g, sum g on mistakes, mistakes, sum g on right answers, count of g > 0.5]``. No host sync."""
    gf, w = g.detach().float(), wrong.float()
    n = torch.full_like(gf[..., 0], float(gf.shape[-1]))
    return torch.stack(
        [n, gf.sum(-1), (gf * w).sum(-1), w.sum(-1), (gf * (1 - w)).sum(-1), (gf > 0.5).float().sum(-1)], dim=-1
    )


def summarize_guide_stats(acc: Tensor) -> dict[str, float]:
    """Means from :func:`guide_stats` sums: ``g_mean``, ``g_wrong``, ``g_right``, ``helped_frac`` (g > 0.5)."""
    n, gs, gw, nw, gr, helped = acc.double().tolist()
    nan = float("nan")
    return {
        "g_mean": gs / n if n else nan,
        "g_wrong": gw / nw if nw else nan,
        "g_right": gr / (n - nw) if n - nw else nan,
        "helped_frac": helped / n if n else nan,
        "wrong_frac": nw / n if n else nan,
    }


@register_method
class DiSK(Method):
    name = "disk"
    summary = "Kag et al. 2023: guide-helped distillation on the teacher's top-K with a budget (needs init=CE student)"
    needs_teacher = True
    needs_teacher_features = True
    needs_init = True
    unfusable = "its guide steps its own optimiser inside losses() and setup() fits a per-student temperature"
    hparams = {
        "alpha": HParam(0.1, "weight of CE with the labels; (1 - alpha) weighs L_dist (eq. 5)", float, 0.0, 1.0),
        "tau_t": HParam(7.0, "teacher temperature (paper text 7; official script 4; scan {1,2,4})", float, 0.0, None,
                        low_open=True),
        "student_T": HParam(None, "fixed student temperature (official code 3.5); None: fitted in setup()",
                            float, 0.0, None, low_open=True),
        "target": HParam("full", "teacher target of L_dist: full (eq. 4) or topk (official code's masked target)",
                         str, choices=("full", "topk")),
        "K": HParam(20, "the guide helps the teacher's top-K classes (paper scan {1,3,5,10,20,50})", int, 1, None),
        "help_norm": HParam("renorm", "guide's L_dist: renorm (helped vector renormalised, default), code (eq. 4 + "
                            "the official mean log(1+K g)), eq4 (as written: helps everything)", str,
                            choices=HELP_NORMS),
        "budget_norm": HParam("N", "budget's normaliser: N (eq. 3) or mistakes (official code)", str,
                              choices=("N", "mistakes")),
        "budget_relax": HParam("indicator", "the guide's budget cost per example: indicator (eq. 2's student "
                               "mistake, default) or ce (eq. 3's relaxation)", str, choices=("indicator", "ce")),
        "lambda_min": HParam(0.1, "lower end of the lambda cosine schedule", float, 0.0, None),
        "lambda_max": HParam(50.0, "upper end of the lambda schedule (> lambda_min)", float, 0.0, None),
        "lambda_period": HParam(50, "Lambda_T: period of the lambda schedule in epochs ({20, 50})", int, 1, None),
        "delta": HParam(None, "absolute budget delta in [0, 1]; None: init_error + delta_offset", float, 0.0, 1.0),
        "delta_offset": HParam(0.0, "budget = CE student's error + this (paper scans within +-0.2)", float, -1.0,
                               1.0),
        "budget_ce_cap": HParam(0.0, "cap on the budget's per-sample CE; 0: none (paper), 5: official code",
                                float, 0.0, None),
        "alternate": HParam("passes", "passes: the guide's passes over the data, then the student's epochs (A.5); "
                            "batch: guide_steps guide steps before each student step", str,
                            choices=("passes", "batch")),
        "guide_epochs": HParam(3, "passes of the guide over the training set per round (A.5: three)", int, 1, None),
        "round_epochs": HParam(3, "student epochs per round, after the guide's passes (official code: 3)", int, 1,
                               None),
        "guide_warmup": HParam(0, "extra guide-only passes before the first round (official code: 5)", int, 0,
                               None),
        "guide_steps": HParam(3, "alternate=batch: guide optimiser steps per student step", int, 0, None),
        "guide_opt": HParam("sgd", "the guide's own optimiser", str, choices=("sgd", "adam")),
        "guide_lr": HParam(0.1, "learning rate of the guide's optimiser", float, 0.0, None, low_open=True),
        "guide_schedule": HParam("student", "guide lr schedule: student (the student's, A.5: cosine throughout) "
                                 "or constant", str, choices=("student", "constant")),
        "guide_momentum": HParam(0.9, "SGD momentum of the guide's optimiser", float, 0.0, 1.0, high_open=True),
        "guide_wd": HParam(5e-4, "weight decay of the guide's optimiser", float, 0.0, None),
        "guide_hidden": HParam("64,128", "hidden widths of the guide MLP (A.4: 64, 128)", str),
    }  # fmt: skip

    @classmethod
    def check_combination(cls, hp: dict[str, Any]) -> None:
        if hp["lambda_max"] <= hp["lambda_min"]:
            raise ConfigError(
                f"disk.lambda_max={hp['lambda_max']} must exceed disk.lambda_min={hp['lambda_min']}; "
                "raise lambda_max (paper default 50) or lower lambda_min (0.1)"
            )
        parse_hidden(hp["guide_hidden"])

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        self.check_combination(hp)
        if hp["K"] > ctx.num_classes:
            raise ConfigError(
                f"disk.K={hp['K']} exceeds the number of classes ({ctx.num_classes}); set K <= {ctx.num_classes}"
            )
        if hp["delta"] is not None:
            self.delta = float(hp["delta"])
        elif ctx.init_error is not None:
            self.delta = min(max(float(ctx.init_error) + hp["delta_offset"], 0.0), 1.0)
        else:
            raise ConfigError(WARM_START_HINT + " (or give disk.delta explicitly)")
        if ctx.teacher_feat_dim is None:
            raise ConfigError(
                "DiSK's guide reads the teacher's features: the teacher model must expose feat_dim"
            )
        if hp["alternate"] == "passes" and ctx.train_batches is None:
            raise ConfigError("disk.alternate=passes needs the training data for the guide; set disk.alternate=batch")
        self.guide = Guide(ctx.teacher_feat_dim + ctx.num_classes, parse_hidden(hp["guide_hidden"])).to(
            ctx.device
        )
        params = self.guide.parameters()
        if hp["guide_opt"] == "adam":
            self.guide_opt: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=hp["guide_lr"], weight_decay=hp["guide_wd"]
            )
        else:
            self.guide_opt = torch.optim.SGD(
                params, lr=hp["guide_lr"], momentum=hp["guide_momentum"], weight_decay=hp["guide_wd"]
            )
        self.tau_s: float | None = None if hp["student_T"] is None else float(hp["student_T"])
        self.lam = self._lambda(0)
        self._stats = torch.zeros(6, device=ctx.device)
        self.last_stats: dict[str, float] = {}

    # -- schedules and setup --------------------------------------------------------------------------------
    def _lambda(self, epoch: int) -> float:
        hp = self.hp
        return lambda_schedule(
            epoch, max(self.ctx.epochs, 1), hp["lambda_min"], hp["lambda_max"], hp["lambda_period"]
        )

    def _guide_lr(self, epoch_float: float) -> float:
        """The guide's lr at a fractional epoch: the student's schedule (ctx.extra["lr_factor"], else cosine)."""
        if self.hp["guide_schedule"] == "constant":
            return self.hp["guide_lr"]
        f = self.ctx.extra.get("lr_factor")
        if f is None:
            t = min(max(epoch_float / max(self.ctx.epochs, 1), 0.0), 1.0)
            factor = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            factor = float(f(epoch_float))
        return self.hp["guide_lr"] * factor

    def _set_guide_lr(self, epoch_float: float) -> None:
        for group in self.guide_opt.param_groups:
            group["lr"] = self._guide_lr(epoch_float)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.lam = self._lambda(epoch)
        self._stats.zero_()
        self._set_guide_lr(float(epoch))
        if self.hp["alternate"] == "passes" and epoch % self.hp["round_epochs"] == 0:
            passes = self.hp["guide_epochs"] + (self.hp["guide_warmup"] if epoch == 0 else 0)
            self.train_guide(passes)

    def _step_kw(self) -> dict[str, Any]:
        hp = self.hp
        return dict(alpha=hp["alpha"], lam=self.lam, tau_t=hp["tau_t"], tau_s=self.tau_s, k=hp["K"],
                    delta=self.delta, ce_cap=hp["budget_ce_cap"] or None, target=hp["target"],
                    help_norm=hp["help_norm"], budget_norm=hp["budget_norm"],
                    budget_relax=hp["budget_relax"])  # fmt: skip

    def _guide_step(self, s: Tensor, t: Tensor, tf: Tensor, y: Tensor) -> Tensor:
        g = self.guide(tf, t)
        obj = guide_objective(s.detach().float(), t, y, g, **self._step_kw())
        self.guide_opt.zero_grad(set_to_none=True)
        obj.backward()
        self.guide_opt.step()
        return obj.detach()

    def train_guide(self, passes: int) -> None:
        """``passes`` SGD passes of the guide over the training set, student and teacher fixed (A.5's arg min)."""
        if self.tau_s is None or self.ctx.train_batches is None or self.ctx.teacher is None:
            raise RuntimeError("DiSK.setup() must run before training (it fits the student temperature)")
        student, teacher = self.ctx.student, self.ctx.teacher
        modes = student.training, teacher.training
        student.eval()
        teacher.eval()
        try:
            for _ in range(passes):
                for x, y in self.ctx.train_batches():
                    if len(y) < 2:  # batch norm needs two examples in training mode
                        continue
                    with torch.no_grad():
                        s = student(x).float()
                        t, tf = teacher(x, return_features=True)
                    self.guide.train()
                    with torch.enable_grad(), torch.autocast(device_type=s.device.type, enabled=False):
                        self._guide_step(s, t.float(), tf.float(), y)
        finally:
            student.train(modes[0])
            teacher.train(modes[1])

    @torch.no_grad()
    def setup(self, max_samples: int = 50_000) -> None:
        """Fit ``tau_s`` on (up to ``max_samples`` of) the training set with the warm-started student."""
        if self.hp["student_T"] is not None:
            return
        if self.ctx.train_batches is None or self.ctx.teacher is None:
            raise ConfigError(
                "DiSK cannot fit the student temperature without training data; set disk.student_T"
            )
        student, teacher = self.ctx.student, self.ctx.teacher
        was_training = student.training, teacher.training
        student.eval()
        teacher.eval()
        s_all, t_all, n = [], [], 0
        try:
            for x, _ in self.ctx.train_batches():
                s_all.append(student(x).float())
                t_all.append(teacher(x).float())
                n += len(x)
                if n >= max_samples:
                    break
        finally:
            student.train(was_training[0])
            teacher.train(was_training[1])
        if not s_all:
            raise ConfigError("DiSK found an empty training set while fitting the student temperature")
        s = torch.cat(s_all)[:max_samples]
        t = torch.cat(t_all)[:max_samples]
        self.tau_s = float(fit_student_temperature(s, t, self.hp["tau_t"]))

    # -- one training step ----------------------------------------------------------------------------------
    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        hp = self.hp
        if self.tau_s is None:
            raise RuntimeError("DiSK.setup() must run before training (it fits the student temperature)")
        if out.teacher_logits is None or out.teacher_features is None:
            raise RuntimeError("DiSK needs the teacher's logits and features in StepOutputs")
        t = out.teacher_logits.detach().float()
        tf = out.teacher_features.detach().float()
        s = out.student_logits
        if hp["alternate"] == "batch":
            steps = self.ctx.steps_per_epoch or 1
            self._set_guide_lr(out.epoch + out.step / steps)
            with torch.enable_grad(), torch.autocast(device_type=s.device.type, enabled=False):
                self.guide.train(t.shape[0] >= 2)  # batch norm needs two examples in training mode
                for _ in range(hp["guide_steps"]):
                    self._guide_step(s, t, tf, out.targets)
        self.guide.eval()
        with torch.no_grad():
            g = self.guide(tf, t)
        s32 = s.float()
        terms = {
            "ce": hp["alpha"] * F.cross_entropy(s32, out.targets),
            "disk": (1.0 - hp["alpha"])
            * disk_distill(s32, t, g, hp["tau_t"], self.tau_s, hp["K"], target=hp["target"]),
        }
        with torch.no_grad():
            self._stats += guide_stats(g, s32.argmax(dim=-1) != out.targets)
        return terms

    def epoch_metrics(self) -> dict[str, float]:
        """The guide's statistics over the epoch's student steps (one host sync, here): mean g, mean g on the
        examples the student gets wrong and right, the fraction with g > 0.5, lambda and delta."""
        out = summarize_guide_stats(self._stats)
        out.update({"lambda": self.lam, "delta": self.delta, "guide_lr": self.guide_opt.param_groups[0]["lr"]})
        self.last_stats = out
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "guide": {k: v.detach().clone() for k, v in self.guide.state_dict().items()},
            "guide_opt": copy.deepcopy(self.guide_opt.state_dict()),
            "tau_s": self.tau_s,
            "lam": self.lam,
            "epoch": self.epoch,
            "delta": self.delta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guide.load_state_dict(state["guide"])
        self.guide_opt.load_state_dict(state["guide_opt"])
        self.tau_s = state["tau_s"]
        self.lam = state["lam"]
        self.epoch = state["epoch"]
        self.delta = state["delta"]
