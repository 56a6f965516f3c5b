"""``kdtune reproduce mse-teacher``: the synthetic experiment of the teacher-training seed (Hamidi et al., "How
to Train the Teacher Model for Effective Knowledge Distillation", ECCV 2024), CPU-sized.

Per seed ``i``: data set ``mse-gauss`` drawn with data seed ``i`` (K = 3 Gaussians in 30-D, p* known); three
``toy_mlp128`` teachers from init seed ``i`` (``ce``; ``mse`` with ``reduction=sum``, the paper's; ``mean``, the
code's); from each a student by pure KD (``kd``, T = 1, no CE: the authors' code) from init seed 1000 + i; the
authors' recipe. Each phase (teachers, students) trains its members as one stacked model with the engine's init,
batches and the registered methods' losses; ``--engine`` trains six Trainer runs a seed instead (same numbers,
~15x slower: tests/test_mse_teacher.py compares them). Printed: each teacher's E||p - p*||^2, KL(p* || p), ECE
(15 bins) on train and test and test accuracy, the Bayes accuracy, each student's test accuracy (mean +- std over
seeds) and a verdict line computed from them; ``--out`` writes them (``.md``, ``.json``). The same command (same
``--threads``) prints the same numbers; ``--help`` imports no torch.
More: docs/mse_teacher.md (the protocol, what the authors' code fixes, what was shrunk, a measured table).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

# The authors' ToyGuassian-MSEKD code (setting.py, toyKD.py) and its plotted run (K = 3, DELTA_MU = 4); the data
# constants repeat kdtune.data.toys' MSE_GAUSS_* (importing it imports torch; tests/test_mse_teacher.py checks).
CLASSES, DIM, SIGMA2, DELTA_MU = 3, 30, 6.0, 4.0
SIZES = (5000, 5000, 90000)
EPOCHS, BATCH, LR, MOMENTUM = 100, 32, 5e-4, 0.9
KD_T = 1.0
STUDENT_SEED_OFFSET = 1000  # student i starts from init seed 1000 + i (teacher i from seed i)
DEFAULT_SEEDS = 6  # what fits 5 minutes on 2 shared CPU cores (docs/mse_teacher.md: measured)
AUTHORS_SEEDS = 10
ECE_BINS = 15
# teacher key -> (method, hyperparameters, label)
TEACHERS = {
    "ce": ("ce", {}, "CE"),
    "mse-sum": ("mse", {"reduction": "sum"}, "MSE, sum over classes (paper)"),
    "mse-mean": ("mse", {"reduction": "mean"}, "MSE, mean over classes (code)"),
}


@dataclass
class MseTeacherConfig:
    seeds: int = DEFAULT_SEEDS
    first_seed: int = 0
    data_seed: int | None = None  # None: seed i draws data set i
    epochs: int = EPOCHS
    batch_size: int = BATCH
    lr: float = LR
    momentum: float = MOMENTUM
    kd_T: float = KD_T
    classes: int = CLASSES
    delta_mu: float = DELTA_MU
    sigma2: float = SIGMA2
    threads: int = 1
    engine: bool = False  # six Trainer runs a seed instead of the stacked loop


# -- metrics (float64) ---------------------------------------------------------------------------------------------
def prob_metrics(logits, p_star, y) -> dict[str, float]:
    """A model's softmax ``p`` against ``p*`` on one split: ``mse_pstar`` = mean_i ||p_i - p*_i||^2 (summed over
    classes), ``kl_pstar`` = mean_i KL(p*_i || p_i) (terms with p* = 0 count 0), ``ece`` (15 equal-width bins of the
    top-1 confidence, |accuracy - confidence| weighted by the bin's share) and ``acc`` (%)."""
    import torch

    log_p = torch.log_softmax(logits.double(), dim=1)
    p, ps = log_p.exp(), p_star.double()
    mse = (p - ps).pow(2).sum(1).mean()
    kl = (
        torch.where(ps > 0, ps * (torch.log(ps.clamp_min(1e-300)) - log_p), torch.zeros_like(ps))
        .sum(1)
        .mean()
    )
    return {"mse_pstar": float(mse), "kl_pstar": float(kl), "ece": ece(p, y), "acc": accuracy(p, y)}


def ece(p, y, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence: bins (b/B, (b+1)/B], sum over bins of
    (n_b / N) |accuracy_b - mean confidence_b| (Guo et al. 2017)."""
    import torch

    conf, pred = p.max(1)
    right = (pred == y).double()
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    n = torch.bincount(idx, minlength=bins).double()
    gap = (
        torch.bincount(idx, right, minlength=bins) - torch.bincount(idx, conf.double(), minlength=bins)
    ).abs()
    return float(gap.sum() / n.sum()) if n.sum() > 0 else 0.0


def accuracy(p, y) -> float:
    return 100.0 * float((p.argmax(1) == y).double().mean())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# -- scoring (both paths) ----------------------------------------------------------------------------------------
def score_seed(seed: int, data, teachers: dict, students: dict, best: dict) -> dict:
    """One seed's numbers: ``teachers``/``students``/``best`` map a teacher key to a single model (eval mode):
    the teacher, its student at the last epoch, and its student at its best validation epoch."""
    import torch

    p_star, splits = data.info["p_star"], {"train": data.train, "test": data.test}
    out: dict = {"seed": seed, "data_seed": data.info["seed"], "bayes_test_acc": accuracy(p_star["test"], data.test.y),
                 "teachers": {}, "students": {}}  # fmt: skip

    def logits(model, x):  # in chunks: a 90,000 x 128 activation at once is several times slower
        with torch.inference_mode():
            return torch.cat([model(c) for c in x.split(8192)])

    with torch.no_grad():
        for key in TEACHERS:
            out["teachers"][key] = {n: prob_metrics(logits(teachers[key], s.x), p_star[n], s.y)
                                    for n, s in splits.items()}  # fmt: skip
            final = prob_metrics(logits(students[key], data.test.x), p_star["test"], data.test.y)
            best_acc = accuracy(logits(best[key], data.test.x), data.test.y)
            out["students"][key] = {"test_acc": final["acc"], "test_acc_best_val": best_acc,
                                    "mse_pstar_test": final["mse_pstar"]}  # fmt: skip
    return out


def _data(cfg: MseTeacherConfig, seeds: list[int]) -> dict:
    """The data set of each seed (``seed i`` draws data set ``i``, or all share ``--data-seed``)."""
    from kdtune.data.toys import MSE_GAUSS_DIM, mse_gauss_bundle

    keys = {s: (s if cfg.data_seed is None else cfg.data_seed) for s in seeds}
    made = {ds: mse_gauss_bundle(ds, SIZES, cfg.classes, MSE_GAUSS_DIM, cfg.delta_mu, cfg.sigma2)
            for ds in sorted(set(keys.values()))}  # fmt: skip
    return {s: made[ds] for s, ds in keys.items()}


def _method(name: str, hp: dict, classes: int, cfg: MseTeacherConfig, model):
    """The registered kdtune method (its hyperparameters resolved and checked as a TrainConfig's would be)."""
    import torch

    from kdtune.losses import METHODS, MethodContext

    cls = METHODS.get(name)
    ctx = MethodContext(num_classes=classes, epochs=cfg.epochs, steps_per_epoch=SIZES[0] // cfg.batch_size,
                        device=torch.device("cpu"), student=model)  # fmt: skip
    return cls(cls.resolve(hp), ctx)


# -- the default path: all members of a phase as one stacked model ----------------------------------------------------
def _stacked_cls():
    import torch
    from torch import nn

    class StackedMLP(nn.Module):
        """``S`` independent ``toy_mlp128`` networks as one: layer ``j``'s weights ``(S, out, in)``; input
        ``(S, B, D)`` -> logits ``(S, B, C)``. Member ``i`` starts as ``models[i]`` and is read back with
        :meth:`member`; each member's arithmetic is its lone network's (a batched matmul per layer)."""

        def __init__(self, models):
            super().__init__()
            layers = [[*m.hidden, m.fc] for m in models]
            self.weights = nn.ParameterList(
                nn.Parameter(torch.stack([ls[j].weight.detach() for ls in layers]))
                for j in range(len(layers[0]))
            )
            self.biases = nn.ParameterList(
                nn.Parameter(torch.stack([ls[j].bias.detach() for ls in layers]))
                for j in range(len(layers[0]))
            )

        def forward(self, x):
            h = x
            last = len(self.weights) - 1
            for j, (w, b) in enumerate(zip(self.weights, self.biases)):
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                if j < last:
                    h = torch.relu(h)
            return h

        @torch.no_grad()
        def member(self, i: int, like, params=None):
            """Member ``i`` copied into ``like`` (a ``toy_mlp128``), from ``params`` (weights, biases) if given."""
            ws, bs = params if params is not None else (list(self.weights), list(self.biases))
            for layer, w, b in zip([*like.hidden, like.fc], ws, bs):
                layer.weight.copy_(w[i])
                layer.bias.copy_(b[i])
            return like.eval()

    return StackedMLP


def _init(seed: int, classes: int):
    """A ``toy_mlp128`` as the engine initialises it: global RNG seeded with the run's seed, then the factory."""
    import torch

    from kdtune.data.toys import MSE_GAUSS_DIM
    from kdtune.models import create_model

    torch.manual_seed(seed)
    return create_model("toy_mlp128", classes, MSE_GAUSS_DIM)


def train_stacked(model, X, Y, data_seeds, cfg, step_loss, tick, val=None):
    """SGD (lr, momentum, no weight decay, constant lr) over ``cfg.epochs``; member ``i`` sees the engine's batches
    of its data seed (``epoch_permutation``, full batches only). ``step_loss(logits, idx)`` returns the sum of the
    members' batch-mean losses. ``val = (Xv, Yv)``: returns each member's parameters at its best validation accuracy
    (first epoch of the maximum, as the engine's ``is_best``), else None."""
    import torch

    from kdtune.data.loader import epoch_permutation

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    S, n = X.shape[0], X.shape[1]
    b = cfg.batch_size
    steps = n // b
    rows = torch.arange(S)[:, None]
    best = None
    if val is not None:
        best_correct = torch.full((S,), -1, dtype=torch.long)
        best = ([w.detach().clone() for w in model.weights], [c.detach().clone() for c in model.biases])
    for e in range(cfg.epochs):
        perms = {ds: epoch_permutation(n, ds, e) for ds in set(data_seeds)}
        perm = torch.stack([perms[ds] for ds in data_seeds])
        model.train()
        for i in range(steps):
            idx = perm[:, i * b : (i + 1) * b]
            loss = step_loss(model(X[rows, idx]), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val is not None:
            with torch.no_grad():
                correct = (model(val[0]).argmax(-1) == val[1]).sum(1)
                up = correct > best_correct
                best_correct = torch.where(up, correct, best_correct)
                for dst, src in zip(best[0] + best[1], list(model.weights) + list(model.biases)):
                    dst[up] = src.detach()[up]
        tick()
    return best


def run_stacked(cfg: MseTeacherConfig, seeds: list[int], tick) -> list[dict]:
    """Phase 1: the 3N teachers as one stacked model; phase 2: the 3N students. Member order: teacher key, then
    seed. Each member's loss is its registered method's ``losses()`` on its own batch (CE, MSE, KD are batch means:
    the method applied to the S x B rows, times S, is the sum of the members' losses)."""
    import torch

    from kdtune.losses import StepOutputs

    StackedMLP = _stacked_cls()
    data = _data(cfg, seeds)
    members = [(key, s) for key in TEACHERS for s in seeds]
    S, N, C = len(members), len(seeds), cfg.classes
    X = torch.stack([data[s].train.x for _, s in members])
    Y = torch.stack([data[s].train.y for _, s in members])
    dseeds = [data[s].info["seed"] for _, s in members]
    teachers = StackedMLP([_init(s, C) for _, s in members])
    methods = [_method(TEACHERS[k][0], TEACHERS[k][1], C, cfg, teachers) for k in TEACHERS]
    rows = torch.arange(S)[:, None]

    def teacher_loss(logits, idx):
        yb, total = Y[rows, idx], 0.0
        for j, m in enumerate(methods):
            blk = slice(j * N, (j + 1) * N)
            terms = m.losses(StepOutputs(logits[blk].reshape(-1, C), yb[blk].reshape(-1), 0, 0))
            total = total + sum(terms.values()) * N
        return total

    train_stacked(teachers, X, Y, dseeds, cfg, teacher_loss, tick)
    t_models = [teachers.member(i, _init(0, C)) for i in range(S)]
    with torch.no_grad():  # each teacher's logits on its own training set
        T = torch.stack([m(X[i]) for i, m in enumerate(t_models)])
    students = StackedMLP([_init(s + STUDENT_SEED_OFFSET, C) for _, s in members])
    kd = _method("kd", {"T": cfg.kd_T, "w_ce": 0.0, "w_kd": 1.0}, C, cfg, students)

    def student_loss(logits, idx):
        out = StepOutputs(
            logits.reshape(-1, C), Y[rows, idx].reshape(-1), 0, 0, teacher_logits=T[rows, idx].reshape(-1, C)
        )
        return sum(kd.losses(out).values()) * S

    Xv = torch.stack([data[s].val.x for _, s in members])
    Yv = torch.stack([data[s].val.y for _, s in members])
    best = train_stacked(students, X, Y, dseeds, cfg, student_loss, tick, val=(Xv, Yv))
    out = []
    for j, s in enumerate(seeds):
        at = {key: k * N + j for k, key in enumerate(TEACHERS)}
        out.append(score_seed(s, data[s], {key: t_models[i] for key, i in at.items()},
                              {key: students.member(i, _init(0, C)) for key, i in at.items()},
                              {key: students.member(i, _init(0, C), best) for key, i in at.items()}))  # fmt: skip
    return out


# -- the --engine path: every model one run of kdtune's Trainer ---------------------------------------------------
def _engine_config(
    cfg: MseTeacherConfig, data_seed: int, seed: int, method: str, hp: dict, teacher=None
) -> dict:
    d = dict(data="mse-gauss", model="toy_mlp128", method=method, hp=dict(hp), epochs=cfg.epochs,
             batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0, schedule="constant",
             optimizer="sgd", seed=seed, data_seed=data_seed, device="cpu", amp="off", teacher_store="off")  # fmt: skip
    if teacher is not None:
        d["teacher"] = str(teacher)
    return d


def _train(cfg_dict: dict, data, tick, keep_best: bool = False):
    """One engine run; returns (the Trainer, the student's state dict at its best validation epoch or None)."""
    from kdtune.config import TrainConfig
    from kdtune.engine.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg_dict), data=data)
    best = None
    for m in trainer.run():
        if keep_best and m["is_best"]:
            best = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}
        tick()
    trainer.student.eval()
    return trainer, best


def run_engine(cfg: MseTeacherConfig, seeds: list[int], workdir, tick) -> list[dict]:
    """Six Trainer runs per seed: the three teachers (saved), then a KD student from each checkpoint."""
    import copy
    import dataclasses
    from pathlib import Path

    data = _data(cfg, seeds)
    out = []
    for s in seeds:
        d = data[s]
        ds = d.info["seed"]
        # The engine scores its "test" split every epoch; the 90,000-point test split is scored once per model at
        # the end (score_seed), so the engine's per-epoch "test" is the validation split (40 % of a run's time).
        engine_data = dataclasses.replace(d, test=d.val)
        teachers, students, best = {}, {}, {}
        for key, (method, hp, _label) in TEACHERS.items():
            trainer, _ = _train(_engine_config(cfg, ds, s, method, hp), engine_data, tick)
            ckpt = Path(workdir) / f"teacher-{s}-{key}.pt"
            trainer.save_model(ckpt, durable=False)
            teachers[key] = trainer.student
            kd_hp = {"T": cfg.kd_T, "w_ce": 0.0, "w_kd": 1.0}
            st, state = _train(_engine_config(cfg, ds, s + STUDENT_SEED_OFFSET, "kd", kd_hp, ckpt), engine_data, tick,
                               keep_best=True)  # fmt: skip
            students[key] = st.student
            best[key] = copy.deepcopy(st.student)
            if state is not None:
                best[key].load_state_dict(state)
        out.append(score_seed(s, d, teachers, students, best))
    return out


# -- summary, verdict, tables ----------------------------------------------------------------------------------------
def summarize(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of every number, keyed like one seed's."""
    summ: dict = {
        "bayes_test_acc": mean_std([r["bayes_test_acc"] for r in per_seed]),
        "teachers": {},
        "students": {},
    }
    for key in TEACHERS:
        summ["teachers"][key] = {split: {m: mean_std([r["teachers"][key][split][m] for r in per_seed])
                                         for m in per_seed[0]["teachers"][key][split]}
                                 for split in ("train", "test")}  # fmt: skip
        summ["students"][key] = {m: mean_std([r["students"][key][m] for r in per_seed])
                                 for m in per_seed[0]["students"][key]}  # fmt: skip
    return summ


def paired_p(d: list[float]) -> float | None:
    """Two-sided p of a paired t-test on per-seed differences (seeds share data, init and batches); None with
    fewer than 2 seeds or when every difference is 0; 0.0 when every seed differs by the same nonzero amount."""
    if len(d) < 2 or not any(d):
        return None
    if all(x == d[0] for x in d):
        return 0.0
    from scipy import stats

    return float(stats.ttest_1samp(d, 0.0).pvalue)


ALPHA = 0.05  # a difference counts when its paired t-test over seeds gives p < ALPHA


def verdict(per_seed: list[dict], summ: dict) -> dict:
    """Per MSE variant: is its teacher closer to p* than the CE teacher (test E||p - p*||^2), are its students more
    accurate (final test accuracy) — each a mean difference of the right sign with a paired t-test over seeds at
    p < 0.05, else "no" (a difference within the seeds' noise is no evidence) — in how many seeds, and so does the
    seed's claim hold (both), hold in part (one) or not hold (neither)."""
    out: dict = {}
    for key in ("mse-sum", "mse-mean"):
        d = [r["teachers"][key]["test"]["mse_pstar"] - r["teachers"]["ce"]["test"]["mse_pstar"] for r in per_seed]
        a = [r["students"][key]["test_acc"] - r["students"]["ce"]["test_acc"] for r in per_seed]
        pd, pa = paired_p(d), paired_p(a)
        closer = sum(d) < 0 and pd is not None and pd < ALPHA
        better = sum(a) > 0 and pa is not None and pa < ALPHA
        out[key] = {"closer": bool(closer), "closer_p": pd, "closer_seeds": sum(x < 0 for x in d),
                    "students_better": bool(better), "better_p": pa, "better_seeds": sum(x > 0 for x in a),
                    "worse_seeds": sum(x < 0 for x in a), "tied_seeds": sum(x == 0 for x in a),
                    "seeds": len(per_seed),
                    "claim": ("holds" if closer and better else "holds in part" if closer or better
                              else "does not hold")}  # fmt: skip
    return out


def _p(p: float | None) -> str:
    return "p n/a" if p is None else f"p={p:.2g}"


def verdict_line(v: dict, summ: dict) -> str:
    """The one line: each MSE variant against CE, teacher distance to p* and student accuracy, and the claim."""
    t = {k: summ["teachers"][k]["test"]["mse_pstar"][0] for k in TEACHERS}
    a = {k: summ["students"][k]["test_acc"][0] for k in TEACHERS}
    closer = ", ".join(f"{k[4:]}: {'yes' if v[k]['closer'] else 'no'} ({t[k]:.3g} vs {t['ce']:.3g}; closer in "
                       f"{v[k]['closer_seeds']}/{v[k]['seeds']} seeds, {_p(v[k]['closer_p'])})"
                       for k in ("mse-sum", "mse-mean"))  # fmt: skip
    better = ", ".join(f"{k[4:]}: {'yes' if v[k]['students_better'] else 'no'} ({a[k]:.4f} vs {a['ce']:.4f} %; "
                       f"better/worse/tied in {v[k]['better_seeds']}/{v[k]['worse_seeds']}/{v[k]['tied_seeds']} "
                       f"seeds, {_p(v[k]['better_p'])})" for k in ("mse-sum", "mse-mean"))  # fmt: skip
    return (f"verdict: MSE teacher closer to p* than CE (test E||p-p*||²)? {closer}. Its KD students more accurate? "
            f"{better}. The seed's claim {v['mse-sum']['claim']} for the paper's MSE (sum), {v['mse-mean']['claim']} "
            f"for the code's (mean). (yes: the claimed sign and a paired t-test over seeds at p < {ALPHA})")


def _pm(ms: tuple[float, float], fmt: str) -> str:
    return f"{ms[0]:{fmt}} ± {ms[1]:{fmt}}"


def tables(summ: dict, fmt: str = "simple") -> str:
    from kdtune.tables import table

    rows = []
    for key, (_m, _hp, label) in TEACHERS.items():
        t = summ["teachers"][key]
        rows.append([label, *(_pm(t[s][m], ".3g") for m in ("mse_pstar", "kl_pstar") for s in ("train", "test")),
                     _pm(t["train"]["ece"], ".2g"), _pm(t["test"]["ece"], ".2g")])  # fmt: skip
    head = ["teacher", "E||p-p*||² train", "E||p-p*||² test", "KL(p*||p) train", "KL(p*||p) test", "ECE train",
            "ECE test"]  # fmt: skip
    first = table(head, rows, fmt=fmt, align=["left"] + ["right"] * 6)
    rows = []
    for key, (_m, _hp, label) in TEACHERS.items():
        t, s = summ["teachers"][key], summ["students"][key]
        rows.append([label, _pm(t["test"]["acc"], ".4f"), _pm(s["test_acc"], ".4f"), _pm(s["test_acc_best_val"], ".4f"),
                     _pm(s["mse_pstar_test"], ".3g")])  # fmt: skip
    head = [
        "teacher",
        "teacher test acc %",
        "student test acc %",
        "student acc % (best val)",
        "student E||p-p*||²",
    ]
    second = table(head, rows, fmt=fmt, align=["left"] + ["right"] * 4)
    return first + "\n\n" + second


def header(cfg: MseTeacherConfig) -> list[str]:
    shrunk = [f"{cfg.seeds} seeds (the authors: {AUTHORS_SEEDS})"] if cfg.seeds < AUTHORS_SEEDS else []
    if cfg.epochs < EPOCHS:
        shrunk.append(f"{cfg.epochs} epochs (the authors: {EPOCHS})")
    data = (
        "seed i draws data set i"
        if cfg.data_seed is None
        else f"one data set for all seeds (data seed {cfg.data_seed})"
    )
    how = ("kdtune's engine, one Trainer run per model" if cfg.engine else
           "all seeds stacked, kdtune's losses, the engine's init and batch order")  # fmt: skip
    return [
        f"Hamidi et al. (ECCV 2024), synthetic experiment: K = {cfg.classes} Gaussians in {DIM}-D, sigma^2 = "
        f"{cfg.sigma2:g}, delta_mu = {cfg.delta_mu:g}, {SIZES[0]}/{SIZES[1]}/{SIZES[2]} train/val/test ({data})",
        f"MLP {DIM}-128-128-{cfg.classes} (toy_mlp128) for teachers and students: SGD lr {cfg.lr:g}, momentum "
        f"{cfg.momentum:g}, no weight decay, constant lr, batch {cfg.batch_size}, {cfg.epochs} epochs (the authors' "
        f"code); {how}",
        f"students: pure KD, KL(teacher || student) at T = {cfg.kd_T:g}, no CE (the authors' code), from each teacher's "
        f"last epoch; student seed = {STUDENT_SEED_OFFSET} + teacher seed",
        "shrunk for the CPU: " + (", ".join(shrunk) if shrunk else "nothing"),
    ]


# -- command line ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = MseTeacherConfig()
    p = argparse.ArgumentParser(
        prog="kdtune reproduce mse-teacher",
        description="The teacher-training seed's synthetic experiment: CE vs MSE teachers against the known p*, and "
        "the accuracy of their pure-KD students (Hamidi et al., ECCV 2024).",
    )
    p.add_argument("--seeds", type=int, default=d.seeds,
                   help=f"seeds per teacher (default {d.seeds}: fits 5 minutes on 2 CPU cores; the authors: 10)")  # fmt: skip
    p.add_argument("--first-seed", type=int, default=d.first_seed)
    p.add_argument("--data-seed", type=int, default=None,
                   help="one data set for all seeds (the authors' protocol); default: seed i draws data set i")  # fmt: skip
    p.add_argument(
        "--epochs", type=int, default=d.epochs, help="epochs of every teacher and student (authors: 100)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(authors: 32)")
    p.add_argument("--lr", type=float, default=d.lr, help="constant SGD learning rate (authors: 5e-4)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument(
        "--kd-T", type=float, default=d.kd_T, help="KD temperature of the students (authors' code: 1)"
    )
    p.add_argument("--classes", type=int, default=d.classes, help="K (the plotted run: 3; setting.py: 10)")
    p.add_argument("--delta-mu", type=float, default=d.delta_mu, help="scale of the means (plotted run: 4)")
    p.add_argument("--sigma2", type=float, default=d.sigma2, help="variance of each Gaussian (authors: 6)")
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="also write the tables (FILE.md) or every number (FILE.json)",
    )
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch threads (1: fastest for these tiny ops)"
    )
    p.add_argument("--engine", action="store_true",
                   help="train every model as one run of kdtune's Trainer (6 runs a seed; about 15x slower)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> MseTeacherConfig:
    from kdtune.errors import ConfigError

    cfg = MseTeacherConfig(seeds=args.seeds, first_seed=args.first_seed, data_seed=args.data_seed, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, kd_T=args.kd_T,
                           classes=args.classes, delta_mu=args.delta_mu, sigma2=args.sigma2, threads=args.threads,
                           engine=args.engine)  # fmt: skip
    checks = [
        (cfg.seeds >= 1, f"--seeds {cfg.seeds} must be >= 1"),
        (cfg.first_seed >= 0, f"--first-seed {cfg.first_seed} must be >= 0"),
        (cfg.data_seed is None or cfg.data_seed >= 0, f"--data-seed {cfg.data_seed} must be >= 0"),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs} must be >= 1"),
        (1 <= cfg.batch_size <= SIZES[0], f"--batch-size {cfg.batch_size} must lie in [1, {SIZES[0]}]"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr {cfg.lr} must be > 0"),
        (0 <= cfg.momentum < 1, f"--momentum {cfg.momentum} must lie in [0, 1)"),
        (cfg.kd_T > 0 and math.isfinite(cfg.kd_T), f"--kd-T {cfg.kd_T} must be > 0"),
        (cfg.classes >= 2, f"--classes {cfg.classes} must be >= 2"),
        (cfg.delta_mu > 0 and math.isfinite(cfg.delta_mu), f"--delta-mu {cfg.delta_mu} must be > 0"),
        (cfg.sigma2 > 0 and math.isfinite(cfg.sigma2), f"--sigma2 {cfg.sigma2} must be > 0"),
        (cfg.threads >= 0, f"--threads {cfg.threads} must be >= 0 (0: torch's default)"),
        (args.out is None or args.out.endswith((".md", ".json")), f"--out {args.out}: name a .md or .json file"),
        (args.out is None or os.path.isdir(os.path.dirname(args.out) or "."),
         f"--out {args.out}: its folder does not exist"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    from kdtune.reproduce import parse_config

    parsed = parse_config(build_parser, config_from_args, argv)
    if parsed is None:
        return 2
    args, cfg = parsed
    import tempfile

    import torch
    from tqdm import tqdm

    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    epochs = cfg.epochs * (len(seeds) * 2 * len(TEACHERS) if cfg.engine else 2)
    bar = tqdm(total=epochs, file=sys.stderr, disable=args.no_progress, unit="epoch", desc="mse-teacher")
    try:
        if cfg.engine:
            with tempfile.TemporaryDirectory(prefix="kdtune-mse-teacher-") as work:
                per_seed = run_engine(cfg, seeds, work, tick=lambda: bar.update(1))
        else:
            per_seed = run_stacked(cfg, seeds, tick=lambda: bar.update(1))
    finally:
        bar.close()
        torch.set_num_threads(threads)
    summ = summarize(per_seed)
    v = verdict(per_seed, summ)
    bayes = summ["bayes_test_acc"]
    bayes_line = (
        f"Bayes accuracy of p* on test: {_pm(bayes, '.4f')} %  (tables: mean ± std over {len(seeds)} seeds)"
    )
    print("\n".join([*header(cfg), bayes_line, "", tables(summ), "", verdict_line(v, summ)]))
    wall = time.time() - t0
    print(f"wall time {wall:.0f} s")
    if args.out:
        from pathlib import Path

        path = Path(args.out)
        if path.suffix == ".json":
            import json

            doc = {"settings": asdict(cfg), "teachers": {k: {"method": m, "hp": hp, "label": lab}
                                                         for k, (m, hp, lab) in TEACHERS.items()},
                   "per_seed": per_seed, "summary": summ, "verdict": v, "verdict_line": verdict_line(v, summ),
                   "wall_s": wall}  # fmt: skip
            path.write_text(json.dumps(doc, indent=2) + "\n")
        else:
            md = [*(f"{h}  " for h in header(cfg)), bayes_line, "", tables(summ, fmt="github"), "",
                  verdict_line(v, summ)]  # fmt: skip
            path.write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
