"""``kdtune reproduce disk-toys``: Table 1 of DiSK (Kag et al., "Scaffolding a Student to Instill Knowledge",
ICLR 2023 submission) on its two toy problems, appendix A.1-A.2.

For each problem a teacher is trained once, then a student is trained from many seeds with CE, KD and DiSK,
and the table counts how often each method lands in each minimum, next to the paper's Table 1. Each cell is
the number of runs in that minimum with their mean test accuracy; ``--json FILE`` writes the same numbers and
DiSK's guide statistics at the end of training.

All seeds train at once as one ensemble (parameters with a leading seed dimension, see
:mod:`kdtune.models.toys`); run ``i`` depends only on its seed ``i``, not on how many seeds run. That is
``--protocol fixed`` (the default): fixed hyperparameters. ``--protocol paper`` selects them by the paper's own scan
through ``kdtune sweep`` instead (:mod:`kdtune.reproduce.disk_paper`, which states its contract); each protocol
refuses the other's options.

More: docs/toys.md §Reproduction (the protocol, what the paper leaves open and what kdtune chose, how a
run's minimum is identified).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.data.base import Split
from kdtune.data.toys import GAUSS_CENTRES, GAUSS_STD, INTERVAL_KAPPA, gaussians_splits, intervals_splits
from kdtune.losses.disk import (
    disk_distill,
    fit_student_temperature,
    guide_objective,
    guide_stats,
    lambda_schedule,
    summarize_guide_stats,
)
from kdtune.models.toys import BNMLP, LOG_FLOOR_EPS, STUDENT_WIDTHS, TEACHER_WIDTHS, IntervalNet

METHODS = ("CE", "KD", "DiSK")

# The paper's minima (Figure 1): the student's single interval on the blue cluster [2, 3] (A), spanning both
# blue clusters and the red gap (B), or on the cluster [5, 7] (C, the global minimum).
INTERVAL_MINIMA = {"A": (2.0, 3.0), "B": (2.0, 7.0), "C": (5.0, 7.0)}
INTERVAL_TOL = 0.3

# Table 1 of the paper: runs out of 100 landing in each minimum; the last minimum is the global one.
PAPER = {
    "intervals": {
        "title": "1D Intervals",
        "minima": ("A", "B", "C"),
        "accuracy": (67, 83, 87),
        "rows": {"CE": (35, 64, 1), "KD": (30, 67, 3), "DiSK": (9, 1, 90)},
        "ours": ("A", "B", "C"),
        "rule": f"a run is in a minimum when both end points of its interval lie within {INTERVAL_TOL} of the "
        "minimum's: A = [2, 3], B = [2, 7], C* = [5, 7] (the paper's Figure 1)",
        "note": "",
    },
    "gaussians": {
        "title": "2D Gaussians",
        "minima": ("A", "B", "C", "D"),
        "accuracy": (70, 80, 90, 100),
        "rows": {"CE": (73, 12, 9, 6), "KD": (1, 11, 31, 57), "DiSK": (0, 0, 3, 97)},
        "ours": ("4/6", "5/6", "6/6"),
        "rule": "a run's minimum is the set of clusters it covers (more than half of a cluster's test points "
        "right); runs are counted by how many of the six clusters they cover (6/6* = the global minimum)",
        "note": "the paper's 70/80/90 % minima cannot occur with the appendix's data: six clusters of equal size "
        "(equal classes, two centres each, each point's centre drawn uniformly), so a minimum covers whole "
        "clusters and its accuracy is k/6 (67, 83 or 100 %); 70/80/90 % would need clusters of unequal "
        "sizes, which A.2 does not describe. Compare 4/6 with the paper's A, 5/6 with its B + C, 6/6 with D.",
    },
}


@dataclass
class ToyConfig:
    seeds: int = 100
    first_seed: int = 0
    epochs: int = 200
    batch_size: int = 200
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.01
    teacher_restarts: int = 16
    init: str = "ce"
    data_seed: int = 0
    kappa: float = INTERVAL_KAPPA
    interval_eps: float = LOG_FLOOR_EPS
    gauss_std: float = GAUSS_STD
    kd_T: float = 4.0
    kd_alpha: float = 0.1
    alpha: float = 0.1
    tau_t: float = 7.0
    student_T: float | None = None
    K: int | None = None  # None: the number of classes of each problem (2 and 3)
    target: str = "full"
    lambda_min: float = 0.1
    lambda_max: float = 50.0
    lambda_period: int = 50
    delta: float | None = None  # None: each seed's CE student's training error + delta_offset (A.5)
    delta_offset: float = 0.0
    help_norm: str = "renorm"
    budget_norm: str = "N"
    budget_ce_cap: float = 0.0
    budget_relax: str = "indicator"
    alternate: str = "passes"
    guide_epochs: int = 3
    round_epochs: int = 3
    guide_warmup: int = 0
    guide_steps: int = 3
    guide_lr: float = 0.1
    guide_wd: float = 5e-4
    guide_hidden: tuple[int, ...] = (2,)
    problems: tuple[str, ...] = ("intervals", "gaussians")


@dataclass
class Problem:
    key: str
    train: Split
    test: Split
    num_classes: int
    make_teacher: Callable[[int | None], nn.Module]
    make_student: Callable[[int | None], nn.Module]
    classify: Callable[[nn.Module, Split], tuple[list[str], Tensor]]
    info: dict = field(default_factory=dict)


# -- ensemble training ---------------------------------------------------------------------------------------
def _per_member_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Mean CE per member: logits (S, B, C), y (S, B) -> (S,)."""
    s, b, c = logits.shape
    return F.cross_entropy(logits.reshape(s * b, c), y.reshape(-1), reduction="none").view(s, b).mean(dim=1)


def _per_member_kd(s_logits: Tensor, t_logits: Tensor, T: float) -> Tensor:
    """Hinton et al. 2015: ``T^2 KL(t^T || s^T)`` per member, batch mean: (S, B, C) -> (S,)."""
    log_ps = F.log_softmax(s_logits / T, dim=-1)
    log_pt = F.log_softmax(t_logits / T, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1).mean(dim=-1) * T * T


def _shuffles(seeds: list[int], n: int, tag: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1_000_003 * tag + 7919 * int(s) + 1) for s in seeds]


def train_ensemble(
    model: nn.Module,
    train: Split,
    seeds: list[int],
    cfg: ToyConfig,
    step_loss: Callable[[Tensor, int], Tensor],
    tag: int,
    on_epoch: Callable[[int], None] | None = None,
    tick: Callable[[], None] | None = None,
) -> None:
    """SGD (cfg.lr, momentum, weight decay) over cfg.epochs; each member its own shuffle of the training set.

    ``step_loss(idx, epoch)`` gets the (S, B) indices of the batch and returns the sum over members of each
    member's batch-mean loss, so every member's gradient is its own.
    """
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gens = _shuffles(seeds, len(train), tag)
    n = len(train)
    b = min(cfg.batch_size, n)
    steps = max(n // b, 1)
    model.train()
    for epoch in range(cfg.epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        perm = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for i in range(steps):
            loss = step_loss(perm[:, i * b : (i + 1) * b], epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if tick is not None:
            tick()
    model.eval()


def take_member(ensemble: nn.Module, single: nn.Module, i: int) -> nn.Module:
    """Copy member ``i`` of an ensemble into a single model of the same class."""
    single.load_state_dict({k: v[i].clone() for k, v in ensemble.state_dict().items()})
    return single.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> Tensor:
    model.eval()
    pred = model(split.x).argmax(dim=-1)
    return (pred == split.y).float().mean(dim=-1) * 100


# -- the two problems ------------------------------------------------------------------------------------------
def _classify_intervals(model: nn.Module, test: Split, tol: float = INTERVAL_TOL) -> tuple[list[str], Tensor]:
    """A run is in minimum M when both end points of its interval lie within ``tol`` of M's (else "other")."""
    with torch.no_grad():
        a, b = model.intervals()
    labels = []
    for lo, hi in zip(a[..., 0].reshape(-1).tolist(), b[..., -1].reshape(-1).tolist()):
        near = [m for m, (ma, mb) in INTERVAL_MINIMA.items() if abs(lo - ma) <= tol and abs(hi - mb) <= tol]
        labels.append(near[0] if near else "other")
    return labels, accuracy(model, test)


def _nearest_centre(x: Tensor) -> Tensor:
    centres = torch.tensor([c for c, _ in GAUSS_CENTRES], dtype=x.dtype)
    return torch.cdist(x, centres).argmin(dim=1)


def _classify_gaussians(model: nn.Module, test: Split) -> tuple[list[str], Tensor]:
    """A run's minimum is the set of clusters it covers (more than half of a cluster's test points classified
    right); runs are grouped by how many of the six clusters they cover: "6/6" (the global minimum), "5/6",
    "4/6", and "other" (3 or fewer)."""
    with torch.no_grad():
        model.eval()
        right = model(test.x).argmax(dim=-1) == test.y  # (S, N)
    cluster = _nearest_centre(test.x)
    covered = torch.stack([right[:, cluster == j].float().mean(dim=1) > 0.5 for j in range(len(GAUSS_CENTRES))], 1)
    labels = [f"{n}/6" if n >= 4 else "other" for n in covered.sum(dim=1).tolist()]
    return labels, right.float().mean(dim=-1) * 100


def make_problem(key: str, cfg: ToyConfig) -> Problem:
    if key == "intervals":
        train, _val, test = intervals_splits(cfg.data_seed, kappa=cfg.kappa)
        return Problem(
            key, train, test, 2,
            make_teacher=lambda e: IntervalNet(2, cfg.kappa, ensemble=e, eps=cfg.interval_eps),
            make_student=lambda e: IntervalNet(1, cfg.kappa, ensemble=e, eps=cfg.interval_eps),
            classify=_classify_intervals,
        )  # fmt: skip
    if key == "gaussians":
        train, _val, test = gaussians_splits(cfg.data_seed, std=cfg.gauss_std)
        return Problem(
            key, train, test, 3,
            make_teacher=lambda e: BNMLP(2, TEACHER_WIDTHS, 3, ensemble=e),
            make_student=lambda e: BNMLP(2, STUDENT_WIDTHS, 3, ensemble=e),
            classify=_classify_gaussians,
        )  # fmt: skip
    raise ValueError(f"unknown toy problem {key!r}")


# -- one problem, all methods ------------------------------------------------------------------------------------
@dataclass
class ProblemResult:
    key: str
    teacher_acc: float
    labels: dict[str, list[str]]
    accs: dict[str, Tensor]
    seconds: float
    guide: dict[str, float] = field(default_factory=dict)


def train_teacher(p: Problem, cfg: ToyConfig, tick) -> nn.Module:
    r = max(cfg.teacher_restarts, 1)
    seeds = [10_000 + i for i in range(r)]
    ens = p.make_teacher(r)
    ens.init_members(seeds)
    x, y = p.train.x, p.train.y

    def ce_loss(idx: Tensor, epoch: int) -> Tensor:
        return _per_member_ce(ens(x[idx]), y[idx]).sum()

    train_ensemble(ens, p.train, seeds, cfg, ce_loss, tag=1, tick=tick)
    with torch.no_grad():
        logits = ens(x)  # (R, N, C), eval mode
        loss = torch.stack([F.cross_entropy(logits[i], y) for i in range(r)])
    return take_member(ens, p.make_teacher(None), int(loss.argmin()))


def run_problem(p: Problem, cfg: ToyConfig, tick=None) -> ProblemResult:
    t0 = time.time()
    teacher = train_teacher(p, cfg, tick)
    with torch.no_grad():
        t_logits, t_feats = teacher(p.train.x, return_features=True)
    teacher_acc = float(accuracy(teacher, p.test))
    x, y = p.train.x, p.train.y
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    s = len(seeds)
    labels: dict[str, list[str]] = {}
    accs: dict[str, Tensor] = {}

    # CE from the seeds' random initialisations.
    ce_student = p.make_student(s)
    ce_student.init_members(seeds)
    init_state = {k: v.clone() for k, v in ce_student.state_dict().items()}

    def ce_loss(idx: Tensor, epoch: int) -> Tensor:
        return _per_member_ce(ce_student(x[idx]), y[idx]).sum()

    train_ensemble(ce_student, p.train, seeds, cfg, ce_loss, tag=2, tick=tick)
    labels["CE"], accs["CE"] = p.classify(ce_student, p.test)
    start_state = ce_student.state_dict() if cfg.init == "ce" else init_state

    # KD (Hinton et al. 2015): alpha CE + (1 - alpha) T^2 KL, eq. 1 of the paper.
    kd_student = p.make_student(s)
    kd_student.load_state_dict({k: v.clone() for k, v in start_state.items()})

    def kd_loss(idx: Tensor, epoch: int) -> Tensor:
        logits = kd_student(x[idx])
        ce = _per_member_ce(logits, y[idx])
        kd = _per_member_kd(logits, t_logits[idx], cfg.kd_T)
        return (cfg.kd_alpha * ce + (1 - cfg.kd_alpha) * kd).sum()

    train_ensemble(kd_student, p.train, seeds, cfg, kd_loss, tag=3, tick=tick)
    labels["KD"], accs["KD"] = p.classify(kd_student, p.test)

    # DiSK (Algorithm 1): per round, the guide's passes over the data on (1 - alpha) L_dist + lambda L_budget
    # (student fixed), then the student's epochs on alpha CE + (1 - alpha) L_dist (guide fixed).
    dk_student = p.make_student(s)
    dk_student.load_state_dict({k: v.clone() for k, v in start_state.items()})
    guide = BNMLP(t_feats.shape[-1] + p.num_classes, cfg.guide_hidden, 1, ensemble=s)
    guide.init_members([20_000 + sd for sd in seeds])
    gopt = torch.optim.SGD(guide.parameters(), lr=cfg.guide_lr, momentum=0.9, weight_decay=cfg.guide_wd)
    g_in = torch.cat([t_feats, F.softmax(t_logits, dim=-1)], dim=-1)
    with torch.no_grad():
        dk_student.eval()
        warm_logits = dk_student(x)
        ce_wrong = warm_logits.argmax(dim=-1) != y  # (S, N): the CE student's training mistakes
        if cfg.student_T is not None:
            tau_s: Tensor = torch.full((s,), float(cfg.student_T))
        else:
            tau_s = fit_student_temperature(warm_logits, t_logits, cfg.tau_t)
        dk_student.train()
    if cfg.delta is not None:
        delta: Tensor = torch.full((s,), float(cfg.delta))
    else:  # A.5: the CE-trained student's error (of the warm start, per seed), plus the offset
        delta = (ce_wrong.float().mean(dim=1) + cfg.delta_offset).clamp(0.0, 1.0)
    state = {"lam": cfg.lambda_min}
    k = cfg.K or p.num_classes
    kw = dict(alpha=cfg.alpha, tau_t=cfg.tau_t, k=k, delta=delta, target=cfg.target, help_norm=cfg.help_norm,
              budget_norm=cfg.budget_norm, ce_cap=cfg.budget_ce_cap or None, budget_relax=cfg.budget_relax)  # fmt: skip
    gens = _shuffles(seeds, len(p.train), tag=5)
    n, b = len(p.train), min(cfg.batch_size, len(p.train))

    def guide_pass() -> None:
        with torch.no_grad():
            dk_student.eval()
            s_all = dk_student(x)
            dk_student.train()
        guide.train()
        perm = torch.stack([torch.randperm(n, generator=gg) for gg in gens])
        for i in range(max(n // b, 1)):
            idx = perm[:, i * b : (i + 1) * b]
            g = torch.sigmoid(guide(g_in[idx])).squeeze(-1)
            sb = torch.gather(s_all, 1, idx.unsqueeze(-1).expand(-1, -1, s_all.shape[-1]))
            obj = guide_objective(sb, t_logits[idx], y[idx], g, lam=state["lam"], tau_s=tau_s, **kw).sum()
            gopt.zero_grad(set_to_none=True)
            obj.backward()
            gopt.step()

    def on_epoch(epoch: int) -> None:
        state["lam"] = lambda_schedule(epoch, cfg.epochs, cfg.lambda_min, cfg.lambda_max, cfg.lambda_period)
        if cfg.alternate == "passes" and epoch % cfg.round_epochs == 0:
            for _ in range(cfg.guide_epochs + (cfg.guide_warmup if epoch == 0 else 0)):
                guide_pass()

    def disk_loss(idx: Tensor, epoch: int) -> Tensor:
        logits = dk_student(x[idx])
        tl, yb, gi = t_logits[idx], y[idx], g_in[idx]
        if cfg.alternate == "batch":
            guide.train()
            for _ in range(cfg.guide_steps):
                g = torch.sigmoid(guide(gi)).squeeze(-1)
                obj = guide_objective(logits.detach(), tl, yb, g, lam=state["lam"], tau_s=tau_s, **kw).sum()
                gopt.zero_grad(set_to_none=True)
                obj.backward()
                gopt.step()
        guide.eval()
        with torch.no_grad():
            g = torch.sigmoid(guide(gi)).squeeze(-1)
        ce = _per_member_ce(logits, yb)
        dist = disk_distill(logits, tl, g, cfg.tau_t, tau_s, k, target=cfg.target)
        return (cfg.alpha * ce + (1 - cfg.alpha) * dist).sum()

    train_ensemble(dk_student, p.train, seeds, cfg, disk_loss, tag=4, on_epoch=on_epoch, tick=tick)
    labels["DiSK"], accs["DiSK"] = p.classify(dk_student, p.test)
    guide.eval()
    with torch.no_grad():
        g_final = torch.sigmoid(guide(g_in.expand(s, -1, -1))).squeeze(-1)  # (S, N) on the training set
    stats = summarize_guide_stats(guide_stats(g_final, ce_wrong).sum(dim=0))
    stats["delta"] = float(delta.mean())
    return ProblemResult(p.key, teacher_acc, labels, accs, time.time() - t0, guide=stats)


# -- the table -------------------------------------------------------------------------------------------------
def _classes(key: str) -> list[str]:
    return [*PAPER[key]["ours"], "other"]


def results_json(results: list[ProblemResult], cfg: ToyConfig | None, settings: dict | None = None) -> dict:
    """Counts per method and minimum, mean test accuracy per method and per minimum, DiSK's guide statistics.
    ``settings`` replaces the fixed protocol's (``cfg``) in the output (the paper protocol's)."""
    if settings is None:
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    out: dict = {"settings": settings}
    for r in results:
        paper = PAPER[r.key]
        entry: dict = {"rule": paper["rule"], "note": paper["note"], "teacher_acc": r.teacher_acc,
                       "paper": {"minima": list(paper["minima"]), "accuracy": list(paper["accuracy"]),
                                 "counts": {m.lower(): list(v) for m, v in paper["rows"].items()}}}  # fmt: skip
        for meth in METHODS:
            accs = r.accs[meth].tolist()
            counts = {c: r.labels[meth].count(c) for c in _classes(r.key)}
            acc_by = {
                c: (sum(a for lab, a in zip(r.labels[meth], accs) if lab == c) / n if n else None)
                for c, n in counts.items()
            }
            entry[meth.lower()] = {"counts": counts, "acc": acc_by, "mean_acc": sum(accs) / len(accs)}
        g = r.guide
        if g:  # the fixed protocol's guide statistics (the paper protocol reads no guide back)
            entry["disk"].update({"guide_g_wrong": g.get("g_wrong"), "guide_g_right": g.get("g_right"),
                                  "guide_g_mean": g.get("g_mean"), "guide_helped_frac": g.get("helped_frac"),
                                  "delta": g.get("delta")})  # fmt: skip
        out[r.key] = entry
    return out


def format_table(results: list[ProblemResult], cfg: ToyConfig | None, header: list[str] | None = None,
                 notes: dict[str, list[str]] | None = None) -> str:
    """The table beside the paper's Table 1. ``header`` replaces the fixed protocol's settings lines (``cfg``);
    ``notes[key]`` are lines printed under problem ``key``'s rows (the paper protocol's selection)."""
    if header is not None:
        lines = list(header)
    else:
        delta = "each seed's CE student's training error (A.5)" if cfg.delta is None else f"{cfg.delta}"
        if cfg.delta is None and cfg.delta_offset:
            delta += f" {cfg.delta_offset:+g}"
        lines = [
            f"DiSK toy problems (Kag et al., ICLR 2023 submission, Table 1): {cfg.seeds} runs per method, "
            f"{cfg.epochs} epochs, KD/DiSK start: {cfg.init}",
            f"DiSK: tau_t {cfg.tau_t}, lambda {cfg.lambda_min}..{cfg.lambda_max}, Lambda_T {cfg.lambda_period}, "
            f"delta = {delta}, help {cfg.help_norm}, budget {cfg.budget_relax}/{cfg.budget_norm}, "
            f"{cfg.alternate}: {cfg.guide_epochs} guide passes per {cfg.round_epochs} student epochs",
            "cells: runs in that minimum (their mean test accuracy); * = global minimum; paper: Table 1, 100 runs",
        ]
    for r in results:
        paper = PAPER[r.key]
        classes = _classes(r.key)
        cols = [c + ("*" if j == len(classes) - 2 else "") for j, c in enumerate(classes)]
        pcols = [m + ("*" if j == len(paper["minima"]) - 1 else "") for j, m in enumerate(paper["minima"])]
        w = 11
        lines += ["", f"{paper['title']}  (teacher test accuracy {r.teacher_acc:.1f}%, {r.seconds:.0f} s)",
                  f"rule: {paper['rule']}"]  # fmt: skip
        lines.append(f"{'':<15}" + "".join(f"{c:>{w}}" for c in cols) + "  |  paper" + "".join(f"{c:>6}" for c in pcols))
        lines.append(f"{'':<15}" + " " * (w * len(cols)) + "  |  acc. " + "".join(f"{a:>5}%" for a in paper["accuracy"]))
        for meth in METHODS:
            accs = r.accs[meth].tolist()
            cells = []
            for c in classes:
                got = [a for lab, a in zip(r.labels[meth], accs) if lab == c]
                cells.append(f"{len(got)} ({sum(got) / len(got):.0f}%)" if got else "0")
            mean = sum(accs) / len(accs)
            lines.append(f"{meth:<7}{mean:>6.1f}%  " + "".join(f"{c:>{w}}" for c in cells) + "  |       "
                         + "".join(f"{c:>6}" for c in paper["rows"][meth]))  # fmt: skip
        g = r.guide
        if g:
            lines.append(
                f"DiSK's guide at the end, on the training set: mean g {g['g_wrong']:.2f} on the CE student's "
                f"mistakes, {g['g_right']:.2f} on its right answers; g > 0.5 on {100 * g['helped_frac']:.0f}% of "
                f"the examples (budget delta {100 * g['delta']:.0f}%)"
            )
        lines += (notes or {}).get(r.key, [])
        if paper["note"]:
            lines.append(f"note: {paper['note']}")
    lines += ["", "method rows: mean test accuracy of all runs, then the runs in each minimum."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = ToyConfig()
    p = argparse.ArgumentParser(
        prog="kdtune reproduce disk-toys",
        description="DiSK's Table 1: how often CE, KD and DiSK land in each minimum of the two toy problems.",
        epilog="--protocol paper: per toy one `kdtune sweep` (A.1's scan selected on the validation split, then "
        "--seeds seeds of each method's selection); it reads --seeds, --first-seed, --epochs, --problems, "
        "--batch-size, --teacher-restarts, --data-seed, --json and the options marked (paper). "
        "Full run: kdtune reproduce disk-toys --protocol paper --storage runs/disk-paper (docs/toys.md).",
    )
    p.add_argument("--protocol", choices=("fixed", "paper"), default="fixed",
                   help="fixed: the defaults below, 100 seeds at once (default); paper: the paper's scan through "
                   "kdtune sweep")  # fmt: skip
    p.add_argument("--seeds", type=int, default=d.seeds, help="runs per method (paper: 100)")
    p.add_argument("--first-seed", type=int, default=d.first_seed)
    p.add_argument(
        "--epochs", type=int, default=d.epochs, help="epochs for teacher and students (paper: 200)"
    )
    p.add_argument("--quick", action="store_true", help="4 seeds, 20 epochs: a smoke test, not a result")
    p.add_argument("--problems", default="intervals,gaussians", help="comma list of: intervals, gaussians")
    p.add_argument("--init", choices=("ce", "random"), default=d.init, help="start of KD and DiSK students")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--teacher-restarts", type=int, default=d.teacher_restarts)
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--kappa", type=float, default=d.kappa, help="sigmoid scale of the interval functions")
    p.add_argument(
        "--interval-eps", type=float, default=d.interval_eps, help="floor of the interval probabilities"
    )
    p.add_argument("--gauss-std", type=float, default=d.gauss_std, help="std of the Gaussian clusters")
    p.add_argument("--kd-T", type=float, default=d.kd_T)
    p.add_argument("--kd-alpha", type=float, default=d.kd_alpha, help="KD's CE weight")
    p.add_argument("--alpha", type=float, default=d.alpha, help="DiSK's CE weight")
    p.add_argument("--tau-t", type=float, default=d.tau_t)
    p.add_argument(
        "--student-T", type=float, default=None, help="fixed student temperature (default: fitted)"
    )
    p.add_argument("--K", type=int, default=d.K, help="DiSK's top-K (default: all classes: 2 and 3)")
    p.add_argument(
        "--target", choices=("full", "topk"), default=d.target, help="DiSK's teacher target (eq. 4: full)"
    )
    p.add_argument("--lambda-min", type=float, default=d.lambda_min)
    p.add_argument("--lambda-max", type=float, default=d.lambda_max)
    p.add_argument("--lambda-period", type=int, default=d.lambda_period)
    p.add_argument("--delta", type=float, default=d.delta,
                   help="fixed budget (default: each seed's CE student's training error, A.5)")
    p.add_argument("--delta-offset", type=float, default=d.delta_offset, help="added to the CE error (A.5: +-0.2)")
    p.add_argument("--help-norm", choices=("renorm", "code", "eq4"), default=d.help_norm,
                   help="the guide's L_dist (see kdtune.losses.disk)")
    p.add_argument("--budget-norm", choices=("N", "mistakes"), default=d.budget_norm)
    p.add_argument("--budget-relax", choices=("indicator", "ce"), default=d.budget_relax,
                   help="the guide's budget cost: eq. 2's mistake indicator or eq. 3's CE")
    p.add_argument("--budget-ce-cap", type=float, default=d.budget_ce_cap, help="cap of eq. 3's CE (code: 5)")
    p.add_argument("--alternate", choices=("passes", "batch"), default=d.alternate,
                   help="passes: guide passes over the data, then student epochs (A.5); batch: per batch")
    p.add_argument("--guide-epochs", type=int, default=d.guide_epochs, help="guide passes per round")
    p.add_argument("--round-epochs", type=int, default=d.round_epochs, help="student epochs per round")
    p.add_argument("--guide-warmup", type=int, default=d.guide_warmup, help="guide-only passes before round 1")
    p.add_argument("--guide-steps", type=int, default=d.guide_steps)
    p.add_argument("--guide-lr", type=float, default=d.guide_lr)
    p.add_argument("--guide-hidden", default=",".join(map(str, d.guide_hidden)), help="e.g. '2' or '64,128'")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the counts and accuracies as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for these tiny ops)")
    p.add_argument("--no-progress", action="store_true")
    paper = p.add_argument_group("the paper protocol (--protocol paper)")
    paper.add_argument("--storage", default="runs/sweeps", help="(paper) where the sweeps live (kdtune sweep --storage)")
    paper.add_argument("--name", default="disk-paper", help="(paper) the sweeps are <name>-intervals, <name>-gaussians")
    paper.add_argument("--disk-trials", type=int, default=100, help="(paper) DiSK's TPE trials per toy (default 100)")
    paper.add_argument("--kd-alphas", default="0,0.1,0.5,0.9,1", help="(paper) KD's alpha (CE weight) grid (A.1)")
    paper.add_argument("--kd-temps", default="1,2,4", help="(paper) KD's temperature grid (A.1)")
    paper.add_argument("--concurrency", type=int, default=2, help="(paper) trials at a time, 1 CPU each")
    return p


# The options only the paper protocol reads (kdtune.reproduce.disk_paper), refused by the fixed one.
PAPER_ONLY = ("storage", "name", "disk_trials", "kd_alphas", "kd_temps", "concurrency")


def given_options(argv: list[str]) -> set[str]:
    """The options ``argv`` sets (argparse dests), whatever their values: the parser again, defaults suppressed."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def config_from_args(args: argparse.Namespace) -> ToyConfig:
    from kdtune.errors import ConfigError
    from kdtune.losses.disk import parse_hidden

    problems = tuple(q.strip() for q in args.problems.split(",") if q.strip())
    bad = [q for q in problems if q not in PAPER]
    if bad or not problems:
        raise ConfigError(f"--problems {args.problems!r}: choose from intervals, gaussians")
    cfg = ToyConfig(
        seeds=args.seeds, first_seed=args.first_seed, epochs=args.epochs, batch_size=args.batch_size,
        teacher_restarts=args.teacher_restarts, init=args.init, data_seed=args.data_seed, kappa=args.kappa,
        interval_eps=args.interval_eps,
        gauss_std=args.gauss_std, kd_T=args.kd_T, kd_alpha=args.kd_alpha, alpha=args.alpha, tau_t=args.tau_t,
        student_T=args.student_T, K=args.K, target=args.target, lambda_min=args.lambda_min, lambda_max=args.lambda_max,
        lambda_period=args.lambda_period, delta=args.delta, delta_offset=args.delta_offset, help_norm=args.help_norm,
        budget_norm=args.budget_norm, budget_relax=args.budget_relax, budget_ce_cap=args.budget_ce_cap,
        alternate=args.alternate, guide_epochs=args.guide_epochs,
        round_epochs=args.round_epochs, guide_warmup=args.guide_warmup, guide_steps=args.guide_steps,
        guide_lr=args.guide_lr,
        guide_hidden=parse_hidden(args.guide_hidden), problems=problems,
    )  # fmt: skip
    if args.quick:
        cfg.seeds, cfg.epochs, cfg.teacher_restarts = min(cfg.seeds, 4), min(cfg.epochs, 20), 2
        cfg.lambda_period = min(cfg.lambda_period, 10)
    if cfg.seeds < 1 or cfg.epochs < 1 or cfg.batch_size < 2:
        raise ConfigError("--seeds and --epochs must be >= 1 and --batch-size >= 2")
    if cfg.guide_epochs < 1 or cfg.round_epochs < 1 or cfg.guide_warmup < 0:
        raise ConfigError("--guide-epochs and --round-epochs must be >= 1 and --guide-warmup >= 0")
    if cfg.delta is not None and not 0.0 <= cfg.delta <= 1.0:
        raise ConfigError(f"--delta {cfg.delta} must lie in [0, 1]")
    classes = min({"intervals": 2, "gaussians": 3}[q] for q in problems)
    if cfg.K is not None and not 1 <= cfg.K <= classes:
        raise ConfigError(
            f"--K {cfg.K} must lie in [1, {classes}] (the number of classes of the problems run)"
        )
    if cfg.lambda_max <= cfg.lambda_min:
        raise ConfigError("--lambda-max must exceed --lambda-min")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """The fixed protocol (``--protocol fixed``); ``kdtune reproduce disk-toys`` runs
    :func:`kdtune.reproduce.disk_paper.main`, which hands the fixed protocol here."""
    from kdtune.reproduce import parse_config

    argv = sys.argv[1:] if argv is None else list(argv)
    first = build_parser().parse_args(argv)
    given = given_options(argv)
    if first.protocol == "paper":
        print("kdtune: error: --protocol paper runs through `kdtune reproduce disk-toys --protocol paper` "
              "(kdtune.reproduce.disk_paper.main)", file=sys.stderr)  # fmt: skip
        return 2
    paper_only = [d for d in PAPER_ONLY if d in given]
    if paper_only:
        flag = "--" + paper_only[0].replace("_", "-")
        print(f"kdtune: error: {flag} is an option of --protocol paper; add --protocol paper or drop it",
              file=sys.stderr)  # fmt: skip
        return 2
    parsed = parse_config(build_parser, config_from_args, argv)
    if parsed is None:
        return 2
    args, cfg = parsed
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    per_problem = cfg.epochs * (1 + len(METHODS))
    bar = tqdm(total=per_problem * len(cfg.problems), file=sys.stderr, disable=args.no_progress, unit="epoch",
               desc="disk-toys")  # fmt: skip
    results = []
    try:
        for key in cfg.problems:
            bar.set_postfix_str(key)
            results.append(run_problem(make_problem(key, cfg), cfg, tick=lambda: bar.update(1)))
    finally:
        bar.close()
        torch.set_num_threads(threads)
    print(format_table(results, cfg))
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(results_json(results, cfg), indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
