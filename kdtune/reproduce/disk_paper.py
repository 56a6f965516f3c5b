"""``kdtune reproduce disk-toys --protocol paper``: Table 1 of DiSK (Kag et al., "Scaffolding a Student to Instill
Knowledge", ICLR 2023 submission) by the paper's own protocol, run through ``kdtune sweep``.

Contract:

- Per toy (``intervals``: data ``disk-intervals``, ``toy_interval_teacher -> toy_interval_student``;
  ``gaussians``: ``disk-gaussians``, ``toy_mlp_teacher -> toy_mlp_student``) one sweep spec
  ``<storage>/<name>-<toy>.yaml`` is written and run as ``kdtune sweep SPEC --storage STORAGE``
  (:func:`kdtune.cli.main`, the very command a user types): one sweep, one MLflow experiment ``<name>-<toy>``,
  one run per trial. Methods ``ce``, ``kd``, ``disk``; the reproduction's recipe (SGD lr 0.1, momentum 0.9,
  weight decay 0.01, constant lr, batch 200, ``--epochs`` epochs, CPU); ``scheduler: none``; 2 trials at a time,
  1 CPU each; selection by ``val_acc`` (last epoch) on the toy's 100-point validation draw. A rerun with the same
  storage and options reuses a finished sweep (kdtune prints its results) and resumes an unfinished one; other
  options on the same storage are refused by kdtune (give ``--name``).
- The A.1 scan. KD: the grid alpha in {0, 0.1, 0.5, 0.9, 1} x T in {1, 2, 4}, alpha the CE weight of eq. 1
  (``alpha L_CE + (1 - alpha) L_KD``, as the fixed protocol's ``--kd-alpha``): ``w_ce = alpha``,
  ``w_kd = 1 - alpha``, ``logit_std: false``; kdtune has no grid searcher, so the grid is the method's
  ``starts:`` with ``trials:`` its size and the space narrowed to its values: every trial is a grid point.
  CE: no hyperparameters, one trial. DiSK: A.1's sets as ``choices`` (tau_t {1, 2, 4}, K {1, 2, 3} up to the
  number of classes, lambda_min {0.01, 0.1, 1, 5, 10}, lambda_max {1, ..., 1000} kept above lambda_min by the
  space's declared constraint, the absolute budget delta {0.1, 0.05, 0}, Lambda_T {20, 50}, alpha as KD's),
  sampled by TPE for ``--disk-trials`` trials, the first at A.1's defaults (tau_t 4: A.1's default 7 is not in
  its own scan); the guide has the student's capacity (A.1): ``guide_hidden: "2"``.
- ``budget.repeats = --seeds`` (at most 100, the paper's 100 by default): each method's selected configuration
  runs on seeds ``s, s + 1, ..., s + seeds - 1`` (``s = --first-seed``, the spec's seed): the search's trial on
  seed ``s`` and ``seeds - 1`` repeats. A seed sets the run's initialisation (CE, KD: random; DiSK: its guide's);
  the batch order is the data seed's in every run (kdtune's trials see the same views, which the teacher store
  shares). DiSK's selected trial starts from the sweep's CE-student stage (seed ``s``), and each DiSK repeat from
  the CE student of its own seed (``budget.repeat_warm_start: seed``).
- Teacher: ``intervals`` a teacher stage of the spec (every seed's teacher recovers f*); ``gaussians`` the best
  of ``--teacher-restarts`` restarts by training loss (:func:`kdtune.reproduce.disk_toys.train_teacher`; single
  seeds end at 70-91 % test accuracy with this recipe), saved once under ``<storage>/<name>-teachers/`` in
  kdtune's checkpoint format and given as ``teacher: {checkpoint: ...}``.
- After each sweep the ``final.pt`` of each method's runs (the selected trial and its repeats, from
  ``state.json`` and the sweep's Tune folder ``tune/repeats``) are classified into the paper's minima on the test
  split of the data set the sweep trained on, read back through :func:`kdtune.data.load_data` with the sweep's
  ``data_seed``, and the table is printed beside the paper's (:func:`kdtune.reproduce.disk_toys.format_table`),
  with each method's selected configuration and validation accuracy, the trial count and the wall time.
- Exit status: 0; 2 for bad options (one line); the sweep's own status when it fails; 1 when a check of the
  protocol fails (the KD trials are not exactly the grid, a method has not ``--seeds`` runs on distinct seeds, a
  run's recomputed test accuracy differs from the sweep's), after the table.

More: docs/toys.md §Paper protocol (the grids, how alpha is read, the teachers, the time).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdtune.errors import ConfigError

# The options the paper protocol reads (argparse dests of kdtune.reproduce.disk_toys.build_parser); the others
# belong to the fixed protocol and are refused with --protocol paper.
PAPER_OPTIONS = ("protocol", "seeds", "first_seed", "epochs", "problems", "batch_size", "teacher_restarts",
                 "data_seed", "json", "storage", "name", "disk_trials", "kd_alphas", "kd_temps", "concurrency")  # fmt: skip
MAX_SEEDS = 100  # budget.repeats' bound (kdtune.spec_model.Budget)

TOYS = {
    "intervals": {"data": "disk-intervals", "teacher": "toy_interval_teacher", "student": "toy_interval_student",
                  "classes": 2},
    "gaussians": {"data": "disk-gaussians", "teacher": "toy_mlp_teacher", "student": "toy_mlp_student",
                  "classes": 3},
}  # fmt: skip
METHOD_ROWS = {"ce": "CE", "kd": "KD", "disk": "DiSK"}

# Appendix A.1: "For both, KD and DiSK, we scan the alpha hyper-parameter over the range {0.0, 0.1, 0.5, 0.9, 1.0}.
# Similarly, we scan the temperature in the range {1, 2, 4}", and DiSK's ranges (a)-(f).
KD_ALPHAS = (0.0, 0.1, 0.5, 0.9, 1.0)
KD_TEMPS = (1.0, 2.0, 4.0)
DISK_TAU_T = (1.0, 2.0, 4.0)
DISK_K = (1, 2, 3)
DISK_LAMBDA_MIN = (0.01, 0.1, 1.0, 5.0, 10.0)
DISK_LAMBDA_MAX = (1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)
DISK_DELTA = (0.1, 0.05, 0.0)
DISK_PERIOD = (20, 50)
DISK_ALPHA = KD_ALPHAS
# A.1's defaults ("tau_t = 7, K = 2, lambda_min = 0.1, lambda_max = 50, delta = 0.0, Lambda_T = 50"), the first
# DiSK trial; tau_t = 4 (the official script's) since 7 lies outside A.1's own scan {1, 2, 4}; alpha 0.1.
DISK_START = {"tau_t": 4.0, "K": 2, "lambda_min": 0.1, "lambda_max": 50.0, "delta": 0.0, "lambda_period": 50,
              "alpha": 0.1}  # fmt: skip
GUIDE_HIDDEN = "2"  # A.1: the guide "has similar capacity as the student" (the fixed protocol's guide too)

# The reproduction's recipe (appendix A.1/A.2 and A.5's batch size; constant lr: A.1/A.2 name no schedule). The
# teacher's outputs are recomputed per batch (teacher_store off): a toy teacher's forward costs less than a read.
RECIPE = {"device": "cpu", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.01,
          "schedule": "constant", "warmup_epochs": 0, "augment": False, "teacher_store": "off"}  # fmt: skip

# The time model of the estimate printed at the start (2 cores): seconds per trial-epoch by method (the toys'
# 5 steps of 200 examples plus the epoch's validation and test evaluation; DiSK adds a guide pass per epoch on
# average), seconds per trial (process, MLflow run, checkpoints), and per sweep (Ray, MLflow's store, stages,
# report). Measured on this machine, one thread: the Trainer alone 5-8 ms per CE/KD epoch and 9-11 ms per DiSK
# epoch, `kdtune train` with its state saved every epoch 11-19 and 19-25 ms; the sweep path, which commits a state
# every epoch too, is expected at 10-15 ms per trial-epoch and ~0.2 s per trial once its per-epoch reports are cut.
EPOCH_S = {"ce": 0.015, "kd": 0.015, "disk": 0.022}
TRIAL_S = 0.2
SWEEP_S = 45.0


@dataclass
class PaperConfig:
    problems: tuple[str, ...] = ("intervals", "gaussians")
    seeds: int = 100
    first_seed: int = 0
    epochs: int = 200
    batch_size: int = 200
    teacher_restarts: int = 16
    data_seed: int = 0
    disk_trials: int = 100
    kd_alphas: tuple[float, ...] = KD_ALPHAS
    kd_temps: tuple[float, ...] = KD_TEMPS
    concurrency: int = 2
    storage: str = "runs/sweeps"
    name: str = "disk-paper"
    json: str | None = None

    @property
    def kd_points(self) -> int:
        return len(self.kd_alphas) * len(self.kd_temps)


@dataclass
class ToyOutcome:
    """What one toy's sweep gave: the rows of the table (as :class:`disk_toys.ProblemResult`) and the protocol's
    own figures (selection, trial counts, time, the checks that failed)."""

    result: Any
    experiment: str
    selected: dict = field(default_factory=dict)  # method -> {"config", "val_acc", "trial_id"}
    seeds: dict = field(default_factory=dict)  # method -> seeds of its runs, in the table's order
    trials: dict = field(default_factory=dict)  # "search" / "repeats" counts
    kd_grid: list = field(default_factory=list)  # (alpha, T) of the KD trials that ran
    teacher: str = ""
    wall_s: float | None = None  # the sweep's own wall time (results.json)
    call_s: float = 0.0  # this call's time (a reused sweep: seconds)
    problems: list = field(default_factory=list)  # the protocol's checks that failed


# -- options ---------------------------------------------------------------------------------------------------
def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or any(not math.isfinite(v) for v in vals) or len(set(vals)) != len(vals):
        raise ConfigError(f"{flag} {text!r}: give distinct numbers separated by commas, e.g. 0,0.1,0.5")
    return vals


def config_from_args(args, given: set[str]) -> PaperConfig:
    """The paper protocol's settings from the options of ``kdtune reproduce disk-toys`` (``given``: the dests
    the command line set); ConfigError (one line) for an option of the fixed protocol or a bad value."""
    fixed_only = sorted(given - set(PAPER_OPTIONS) - {"help"})
    if fixed_only:
        flag = "--" + fixed_only[0].replace("_", "-")
        raise ConfigError(f"{flag} is read by --protocol fixed only (the paper protocol selects DiSK's and KD's "
                          "hyperparameters by the A.1 scan); drop it")  # fmt: skip
    problems = tuple(q.strip() for q in str(args.problems).split(",") if q.strip())
    bad = [q for q in problems if q not in TOYS]
    if bad or not problems or len(set(problems)) != len(problems):
        raise ConfigError(f"--problems {args.problems!r}: choose from intervals, gaussians")
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds {args.seeds}: the paper protocol runs 1 to {MAX_SEEDS} seeds per method "
                          f"(budget.repeats is at most {MAX_SEEDS}; the paper: 100)")  # fmt: skip
    if args.epochs < 1 or args.batch_size < 2 or args.first_seed < 0 or args.data_seed < 0:
        raise ConfigError("--epochs must be >= 1, --batch-size >= 2, --first-seed and --data-seed >= 0")
    if args.disk_trials < 1:
        raise ConfigError(f"--disk-trials {args.disk_trials} must be >= 1")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency {args.concurrency} must be >= 1")
    if args.teacher_restarts < 1:
        raise ConfigError(f"--teacher-restarts {args.teacher_restarts} must be >= 1")
    alphas = _floats(args.kd_alphas, "--kd-alphas")
    temps = _floats(args.kd_temps, "--kd-temps")
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ConfigError(f"--kd-alphas {args.kd_alphas!r}: alpha (KD's CE weight) lies in [0, 1]")
    if any(t <= 0 for t in temps):
        raise ConfigError(f"--kd-temps {args.kd_temps!r}: temperatures are > 0")
    from kdtune.spec_model import NAME_PATTERN

    if not re.match(NAME_PATTERN, f"{args.name}-intervals"):
        raise ConfigError(f"--name {args.name!r}: letters, digits, '.', '_' and '-', starting with a letter or digit")
    return PaperConfig(problems=problems, seeds=args.seeds, first_seed=args.first_seed, epochs=args.epochs,
                       batch_size=args.batch_size, teacher_restarts=args.teacher_restarts, data_seed=args.data_seed,
                       disk_trials=args.disk_trials, kd_alphas=alphas, kd_temps=temps, concurrency=args.concurrency,
                       storage=args.storage, name=args.name, json=args.json)  # fmt: skip


# -- the specs -------------------------------------------------------------------------------------------------
def w_kd(alpha: float) -> float:
    """KD's weight for CE weight ``alpha`` (eq. 1), rounded so that 1 - 0.9 is the 0.1 a person writes."""
    return round(1.0 - float(alpha), 12)


def kd_grid(alphas=KD_ALPHAS, temps=KD_TEMPS) -> list[dict]:
    """The A.1 grid as KD starting points, alpha-major: ``{"T", "w_ce": alpha, "w_kd": 1 - alpha, "logit_std"}``."""
    return [{"T": float(t), "w_ce": float(a), "w_kd": w_kd(a), "logit_std": False} for a in alphas for t in temps]


def kd_method(cfg: PaperConfig) -> dict:
    points = kd_grid(cfg.kd_alphas, cfg.kd_temps)
    space = {"T": [float(t) for t in cfg.kd_temps], "w_ce": [float(a) for a in cfg.kd_alphas],
             "w_kd": sorted({w_kd(a) for a in cfg.kd_alphas}), "logit_std": False}  # fmt: skip
    return {"space": space, "starts": [{k: v for k, v in p.items() if k != "logit_std"} for p in points],
            "trials": len(points)}  # fmt: skip


def disk_method(cfg: PaperConfig, classes: int) -> dict:
    ks = [k for k in DISK_K if k <= classes]
    space = {"tau_t": list(DISK_TAU_T), "K": ks, "lambda_min": list(DISK_LAMBDA_MIN),
             "lambda_max": list(DISK_LAMBDA_MAX), "delta": list(DISK_DELTA), "lambda_period": list(DISK_PERIOD),
             "alpha": list(DISK_ALPHA), "delta_offset": 0.0, "guide_hidden": GUIDE_HIDDEN}  # fmt: skip
    start = dict(DISK_START, K=min(DISK_START["K"], max(ks)))
    return {"space": space, "starts": [start], "trials": cfg.disk_trials}


def experiment_name(cfg: PaperConfig, key: str) -> str:
    return f"{cfg.name}-{key}"


def sweep_spec(key: str, cfg: PaperConfig, teacher: dict) -> dict:
    """The sweep spec of toy ``key`` (plain data, as written to its YAML file)."""
    toy = TOYS[key]
    return {
        "name": experiment_name(cfg, key), "data": toy["data"], "data_seed": cfg.data_seed, "val_fraction": 0.1,
        "teacher": teacher, "students": [toy["student"]],
        "methods": {"ce": {}, "kd": kd_method(cfg), "disk": disk_method(cfg, toy["classes"])},
        "budget": {"trials": cfg.disk_trials, "epochs": cfg.epochs, "concurrency": cfg.concurrency,
                   "cpus_per_trial": 1, "repeats": cfg.seeds, "repeat_warm_start": "seed"},
        "scheduler": {"name": "none"}, "metric": "val_acc",
        "train": {**RECIPE, "batch_size": cfg.batch_size},
        "storage": str(storage_dir(cfg)), "tracking": {"enabled": True}, "seed": cfg.first_seed,
    }  # fmt: skip


def storage_dir(cfg: PaperConfig) -> Path:
    return Path(cfg.storage).expanduser().absolute()


def teacher_path(cfg: PaperConfig, key: str) -> Path:
    return (storage_dir(cfg) / f"{cfg.name}-teachers"
            / f"{key}-data{cfg.data_seed}-e{cfg.epochs}-b{cfg.batch_size}-r{cfg.teacher_restarts}.pt")  # fmt: skip


def teacher_for(key: str, cfg: PaperConfig, log=print) -> dict:
    """The spec's ``teacher:`` of toy ``key``: a stage for the intervals, whose teacher recovers f* from any seed
    (checked: seeds 0, 1, 2 end on [1.95, 3.02] u [4.92, 7.00], test 98 %, as the best of 16 restarts); for the
    Gaussians the best of ``teacher_restarts`` restarts, trained once and saved as a kdtune checkpoint (single
    seeds end at 70-91 % test accuracy at the last epoch: constant lr 0.1 with batch norm oscillates)."""
    if key == "intervals":
        return {"model": TOYS[key]["teacher"]}
    path = teacher_path(cfg, key)
    if not path.is_file():
        import torch

        from kdtune.models.checkpoint import save_model
        from kdtune.reproduce.disk_toys import ToyConfig, accuracy, make_problem, train_teacher

        tcfg = ToyConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, teacher_restarts=cfg.teacher_restarts,
                         data_seed=cfg.data_seed)  # fmt: skip
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t0 = time.time()
            p = make_problem(key, tcfg)
            model = train_teacher(p, tcfg, None)
            acc = float(accuracy(model, p.test))
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(path, model, TOYS[key]["teacher"], TOYS[key]["classes"], 2,
                   meta={"data": TOYS[key]["data"], "data_seed": cfg.data_seed, "epochs": cfg.epochs,
                         "restarts": cfg.teacher_restarts, "test_acc": acc,
                         "how": "kdtune.reproduce.disk_toys.train_teacher: best of the restarts by training loss"})  # fmt: skip
        log(f"{key}: teacher trained, best of {cfg.teacher_restarts} restarts by training loss: test accuracy "
            f"{acc:.1f}% ({time.time() - t0:.0f} s) -> {path}")  # fmt: skip
    return {"checkpoint": str(path)}


# -- the time estimate -----------------------------------------------------------------------------------------
def trial_counts(cfg: PaperConfig) -> dict[str, dict[str, int]]:
    """Per method: search trials and repeats of one toy's sweep."""
    rep = cfg.seeds - 1
    return {"ce": {"search": 1, "repeats": rep}, "kd": {"search": cfg.kd_points, "repeats": rep},
            "disk": {"search": cfg.disk_trials, "repeats": rep}}  # fmt: skip


def estimate_seconds(cfg: PaperConfig) -> tuple[float, list[str]]:
    """Seconds the whole protocol takes by the time model above (``EPOCH_S``, ``TRIAL_S``, ``SWEEP_S``), with
    the lines that say how."""
    counts = trial_counts(cfg)
    trials = sum(c["search"] + c["repeats"] for c in counts.values())
    cpu = sum((c["search"] + c["repeats"]) * (cfg.epochs * EPOCH_S[m] + TRIAL_S) for m, c in counts.items())
    stages = 2 * cfg.epochs * EPOCH_S["ce"] + cfg.epochs * EPOCH_S["ce"]  # teacher (or restarts), CE student
    # a CE student per repeat seed for DiSK's repeats, as stages (a Ray task each)
    stages += (cfg.seeds - 1) * (cfg.epochs * EPOCH_S["ce"] + 2 * TRIAL_S) / cfg.concurrency
    per_toy = cpu / cfg.concurrency + stages + SWEEP_S
    total = per_toy * len(cfg.problems)
    c = counts
    lines = [
        f"estimate: per toy {c['ce']['search']} CE + {c['kd']['search']} KD (grid) + {c['disk']['search']} DiSK "
        f"(TPE) search trials + 3 x {c['ce']['repeats']} repeats = {trials} trials x {cfg.epochs} epochs = "
        f"{trials * cfg.epochs:,} trial-epochs, {cfg.concurrency} at a time: ~{per_toy / 60:.0f} min per toy, "
        f"~{total / 60:.0f} min for {len(cfg.problems)} toy{'s' if len(cfg.problems) > 1 else ''}",
        f"  (at {1e3 * EPOCH_S['kd']:.0f} ms per CE/KD and {1e3 * EPOCH_S['disk']:.0f} ms per DiSK trial-epoch, "
        f"{TRIAL_S} s per trial, ~{SWEEP_S:.0f} s per sweep for Ray, MLflow, stages and report; a finished sweep is "
        "reused in seconds)",
    ]  # fmt: skip
    return total, lines


# -- running and reading a sweep -------------------------------------------------------------------------------
def run_sweep(spec_path: Path, storage: Path) -> int:
    """``kdtune sweep SPEC --storage STORAGE``, the command line's own entry."""
    from kdtune.cli import main as kdtune_main

    return int(kdtune_main(["sweep", str(spec_path), "--storage", str(storage)]) or 0)


def repeat_trials(exp: Path, group: str, summary: dict) -> list[str]:
    """The trial ids of a group's repeats: ``state.json``'s when it lists them (``repeats.runs``), else the
    folders of the sweep's Tune experiment of the repeats (``tune/repeats/<group>-repeats_<n>_<id>``)."""
    runs = (summary.get("repeats") or {}).get("runs")
    if runs:
        return [str(r["trial_id"]) for r in runs]
    folder = exp / "tune" / "repeats"
    prefix = f"{group}-repeats_"
    if not folder.is_dir():
        return []
    return [d.name.rsplit("_", 1)[-1] for d in sorted(folder.iterdir()) if d.is_dir() and d.name.startswith(prefix)]


def _ensemble(make_student, paths: list[Path]):
    """The runs' final students stacked into one ensemble model (member i = run i) and their checkpoints' meta."""
    import torch

    states, metas = [], []
    for p in paths:
        ck = torch.load(p, map_location="cpu", weights_only=True)
        states.append(ck["state_dict"])
        metas.append(ck.get("meta") or {})
    ens = make_student(len(paths))
    ens.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})
    return ens.eval(), metas


def read_toy(key: str, cfg: PaperConfig, exp: Path) -> ToyOutcome:
    """One finished sweep read back: each method's runs classified on the test split of the sweep's data."""
    import torch

    from kdtune.data import load_data
    from kdtune.models.checkpoint import load_model
    from kdtune.reproduce.disk_toys import ProblemResult, ToyConfig, accuracy, make_problem

    spec = yaml.safe_load((exp / "spec.yaml").read_text())
    state = json.loads((exp / "state.json").read_text())
    results = json.loads((exp / "results.json").read_text()) if (exp / "results.json").is_file() else {}
    out = ToyOutcome(result=None, experiment=str(exp), wall_s=results.get("wall_s"))
    # the data the sweep trained on (its data set, validation fraction and data seed), and the reproduction's
    data = load_data(spec["data"], val_fraction=spec["val_fraction"], seed=spec["data_seed"])
    p = make_problem(key, ToyConfig(data_seed=int(spec["data_seed"])))
    if not (torch.equal(data.test.x, p.test.x) and torch.equal(data.test.y, p.test.y)
            and torch.equal(data.train.x, p.train.x)):  # fmt: skip
        out.problems.append(f"{key}: the sweep's data set {spec['data']} (data_seed {spec['data_seed']}) is not "
                            "the reproduction's draw")  # fmt: skip
    student = TOYS[key]["student"]
    labels: dict[str, list[str]] = {}
    accs: dict[str, Any] = {}
    for method, row in METHOD_ROWS.items():
        group = f"{student}-{method}"
        s = state.get("groups", {}).get(group) or {}
        best = s.get("best")
        if not best:
            out.problems.append(f"{key} {row}: no trial completed")
            continue
        out.selected[row] = {"config": best.get("config") or {}, "val_acc": best.get("val_acc"),
                             "trial_id": best["trial_id"]}  # fmt: skip
        ids = [best["trial_id"], *repeat_trials(exp, group, s)]
        paths = [exp / "trials" / t / "ckpt" / "final.pt" for t in ids]
        missing = [t for t, q in zip(ids, paths) if not q.is_file()]
        if missing:
            out.problems.append(f"{key} {row}: {len(missing)} run(s) without final.pt ({', '.join(missing[:3])})")
            ids = [t for t, q in zip(ids, paths) if q.is_file()]
            paths = [q for q in paths if q.is_file()]
        if not paths:
            continue
        ens, metas = _ensemble(p.make_student, paths)
        labels[row], accs[row] = p.classify(ens, data.test)
        seeds = [m.get("seed") for m in metas]
        out.seeds[row] = seeds
        want = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
        if sorted(x for x in seeds if x is not None) != want or len(seeds) != cfg.seeds:
            out.problems.append(f"{key} {row}: {len(seeds)} runs on seeds {_span(seeds)}, not the {cfg.seeds} seeds "
                                f"{_span(want)}")  # fmt: skip
        if any(m.get("method") != method for m in metas):
            out.problems.append(f"{key} {row}: a run's checkpoint holds another method's student")
        off = [t for t, m, a in zip(ids, metas, accs[row].tolist())
               if m.get("test_acc") is None or abs(float(m["test_acc"]) - a) > 1e-3]  # fmt: skip
        if off:
            out.problems.append(f"{key} {row}: the test accuracy recomputed here differs from the sweep's for "
                                f"{len(off)} run(s) ({', '.join(off[:3])}): not the same test split")  # fmt: skip
        if method == "kd":
            out.kd_grid = [(t["config"].get("w_ce"), t["config"].get("T"), t["config"].get("w_kd"),
                            t["config"].get("logit_std")) for t in s["all"]]  # fmt: skip
        if method == "disk":
            broken = [t["trial_id"] for t in s["all"] if not t["config"]["lambda_max"] > t["config"]["lambda_min"]]
            if broken:
                out.problems.append(f"{key} DiSK: lambda_max <= lambda_min in trials {', '.join(broken[:3])}")
        out.trials["search"] = out.trials.get("search", 0) + len(s["all"])
        out.trials["repeats"] = out.trials.get("repeats", 0) + len(ids) - 1
    grid = [(a, t, w_kd(a), False) for a in cfg.kd_alphas for t in cfg.kd_temps]
    if sorted(out.kd_grid, key=repr) != sorted(grid, key=repr):
        ran = {g[:2] for g in out.kd_grid}
        missing = [g[:2] for g in grid if g[:2] not in ran]
        out.problems.append(f"{key} KD: the trials are not exactly the {len(grid)} grid points (ran "
                            f"{len(out.kd_grid)}; missing {missing[:4]})")  # fmt: skip
    # the teacher: the stage's final.pt (intervals) or the checkpoint the spec names (Gaussians)
    t_path = (Path(state["stages"]["teacher"]["dir"]) / "final.pt" if "teacher" in state.get("stages", {})
              else Path(spec["teacher"]["checkpoint"]))  # fmt: skip
    teacher, _ = load_model(t_path)
    teacher_acc = float(accuracy(teacher, data.test))
    if key == "intervals":
        a, b = teacher.intervals()
        ends = " u ".join(f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(a.tolist(), b.tolist()))
        out.teacher = f"teacher: a stage, {ends} (f*: [2, 3] u [5, 7])"
    else:
        out.teacher = f"teacher: best of {cfg.teacher_restarts} restarts by training loss ({t_path.name})"
    if any(r not in labels for r in METHOD_ROWS.values()):
        raise ConfigError(f"sweep {exp.name}: a method has no runs to classify ({'; '.join(out.problems)}); see "
                          f"{exp / 'state.json'}")  # fmt: skip
    out.result = ProblemResult(key, teacher_acc, labels, accs, out.wall_s or 0.0)
    return out


def _span(seeds: list) -> str:
    s = sorted(x for x in seeds if x is not None)
    if not s:
        return "none"
    if s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}..{s[-1]}" if len(s) > 1 else f"{s[0]}"
    return ", ".join(map(str, s[:6])) + (" ..." if len(s) > 6 else "")


# -- the report ------------------------------------------------------------------------------------------------
def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe_config(row: str, config: dict) -> str:
    """A selected configuration in the paper's names (KD's alpha is its CE weight)."""
    c = config
    if row == "CE":
        return "no hyperparameters"
    if row == "KD":
        return f"alpha {_num(c.get('w_ce'))} (w_ce {_num(c.get('w_ce'))}, w_kd {_num(c.get('w_kd'))}), T {_num(c.get('T'))}"
    return (f"tau_t {_num(c.get('tau_t'))}, K {c.get('K')}, lambda {_num(c.get('lambda_min'))}..{_num(c.get('lambda_max'))}, "
            f"Lambda_T {c.get('lambda_period')}, delta {_num(c.get('delta'))}, alpha {_num(c.get('alpha'))}")  # fmt: skip


def toy_notes(o: ToyOutcome, cfg: PaperConfig) -> list[str]:
    lines = [f"{o.teacher}; sweep {Path(o.experiment).name}: {o.experiment}"]
    for row in METHOD_ROWS.values():
        sel = o.selected.get(row)
        if sel:
            va = sel["val_acc"]
            lines.append(f"  selected {row:<5} {describe_config(row, sel['config'])}: val_acc "
                         f"{va:.1f}% (seed {cfg.first_seed}, trial {sel['trial_id']})" if isinstance(va, (int, float))
                         else f"  selected {row:<5} {describe_config(row, sel['config'])}")  # fmt: skip
    grid_ok = not any("KD: the trials" in q for q in o.problems)
    n_grid = len(o.kd_grid)
    wall = f"{o.wall_s / 60:.1f} min" if o.wall_s else "?"
    lines.append(f"  trials: {o.trials.get('search', 0)} search ({n_grid} KD grid points"
                 f"{', exactly the grid' if grid_ok else ', NOT the grid'}; {cfg.disk_trials} DiSK; 1 CE) + "
                 f"{o.trials.get('repeats', 0)} repeats; seeds per method {_span(o.seeds.get('CE', []))}; "
                 f"sweep wall time {wall} (this call {o.call_s:.0f} s)")  # fmt: skip
    return lines


def header(cfg: PaperConfig) -> list[str]:
    return [
        "DiSK toy problems (Kag et al., ICLR 2023 submission, Table 1) by the paper's protocol, through kdtune sweep: "
        f"per method the configuration selected on the validation split (val_acc), then its runs on {cfg.seeds} "
        f"seed{'s' if cfg.seeds != 1 else ''}; {cfg.epochs} epochs, SGD lr 0.1 (constant), momentum 0.9, wd 0.01, "
        f"batch {cfg.batch_size}",
        f"scan (A.1): KD alpha {{{', '.join(map(_num, cfg.kd_alphas))}}} x T {{{', '.join(map(_num, cfg.kd_temps))}}} "
        "(alpha = CE weight: w_ce = alpha, w_kd = 1 - alpha); DiSK tau_t {1, 2, 4}, K {1, 2, 3} <= classes, "
        "lambda_min {0.01, 0.1, 1, 5, 10}, lambda_max {1, ..., 1000} > lambda_min, delta {0.1, 0.05, 0}, "
        f"Lambda_T {{20, 50}}, alpha as KD's: TPE, {cfg.disk_trials} trials; KD from random starts, "
        + "DiSK from the CE student of its seed; every run's batch order the data seed's",
        "cells: runs in that minimum (their mean test accuracy); * = global minimum; paper: Table 1, 100 runs",
    ]  # fmt: skip


def protocol_json(outcomes: list[ToyOutcome], cfg: PaperConfig) -> dict:
    from kdtune.reproduce.disk_toys import results_json

    settings = {"protocol": "paper", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    out = results_json([o.result for o in outcomes], None, settings=settings)
    for o in outcomes:
        out[o.result.key]["protocol"] = {
            "experiment": o.experiment, "selected": o.selected, "seeds": o.seeds, "trials": o.trials,
            "kd_grid": [{"alpha": a, "T": t} for a, t, _, _ in o.kd_grid], "teacher": o.teacher,
            "sweep_wall_s": o.wall_s, "call_s": o.call_s, "problems": o.problems,
        }  # fmt: skip
    return out


# -- the command -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``kdtune reproduce disk-toys``: the paper protocol here (``--protocol paper``), the fixed one by
    :func:`kdtune.reproduce.disk_toys.main`."""
    from kdtune.reproduce import disk_toys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = disk_toys.build_parser().parse_args(argv)
    if args.protocol != "paper":
        return disk_toys.main(argv)
    return run_paper(args, disk_toys.given_options(argv))


def run_paper(args, given: set[str]) -> int:
    """The paper protocol (``args`` parsed by :func:`disk_toys.build_parser`, ``given`` the dests set on the
    command line)."""
    try:
        cfg = config_from_args(args, given)
    except ConfigError as e:
        print(f"kdtune: error: {e}", file=sys.stderr)
        return 2
    _, est = estimate_seconds(cfg)
    for ln in est:
        print(ln, flush=True)
    storage = storage_dir(cfg)
    storage.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for key in cfg.problems:
        t0 = time.time()
        try:
            teacher = teacher_for(key, cfg, log=lambda s: print(s, flush=True))
        except ConfigError as e:
            print(f"kdtune: error: {e}", file=sys.stderr)
            return 2
        spec_path = storage / f"{experiment_name(cfg, key)}.yaml"
        spec_path.write_text(yaml.safe_dump(sweep_spec(key, cfg, teacher), sort_keys=False))
        print(f"{key}: kdtune sweep {spec_path} --storage {storage}", flush=True)
        rc = run_sweep(spec_path, storage)
        if rc != 0:
            return rc
        try:
            o = read_toy(key, cfg, storage / experiment_name(cfg, key))
        except ConfigError as e:
            print(f"kdtune: error: {e}", file=sys.stderr)
            return 1
        o.call_s = time.time() - t0
        o.result.seconds = o.wall_s or o.call_s
        outcomes.append(o)
    from kdtune.reproduce.disk_toys import format_table

    print()
    print(format_table([o.result for o in outcomes], None, header=header(cfg),
                       notes={o.result.key: toy_notes(o, cfg) for o in outcomes}))  # fmt: skip
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(protocol_json(outcomes, cfg), indent=2) + "\n")
    problems = [q for o in outcomes for q in o.problems]
    for q in problems:
        print(f"kdtune: error: protocol check failed: {q}", file=sys.stderr)
    return 1 if problems else 0
