"""No trial ever runs a value outside the space the user wrote, and every trial meets its method's constraints.

A property test over every method's space: seeded random narrowings of the spec (sub-ranges inside and outside
the published range, linear, log and stepped; fixed values; choice lists; training fields and hyperparameters
the file does not search) meet each method's constraints (DiSK's lambda_max > lambda_min and K at most the
number of classes, DKD's and DIST's two weights not both 0). For each, :func:`kdtune.tune.plan.plan` either
refuses in one line -- exactly when an independent check says that no configuration of the space meets the
constraints -- or every configuration the sweep would run (its starting points, then configurations drawn
from the sweep's own searcher, random and TPE, without Ray actors) lies inside the user's space, is a valid
trial config meeting the constraints, and can be recorded by the Optuna mirror. Then once through the real
``kdtune sweep`` with narrowed spaces that exclude the published starting points.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import optuna
import pytest
import yaml

from kdtune.errors import ConfigError
from kdtune.losses import METHODS
from kdtune.spec import load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)
# a stepped range whose ends are not on one grid: Optuna lowers its high end, inside the range, and says so
pytestmark = pytest.mark.filterwarnings("ignore:The distribution is specified by")
pytest.importorskip("ray")  # the searcher is Ray Tune's Searcher interface (no Ray actors are started here)

CLASSES = 10  # digits
PER_METHOD = 30
CONSTRAINED = {"disk": ("lambda_min", "lambda_max", "K"), "dkd": ("alpha", "beta"), "dist": ("beta", "gamma")}
EXTRA = {  # parameters a spec may add beside the file's (a training field, hyperparameters the file leaves alone)
    "ce": ("lr", "batch_size"), "ls": ("lr",), "mse": ("lr",), "kd": ("lr",), "dkd": ("warmup", "w_ce", "lr"),
    "dist": ("w_ce",), "ipwd": ("momentum", "w_cls"), "disk": ("guide_epochs", "lr"), "ttm": ("w_ce",),
    "wttm": ("w_ce",),
}  # fmt: skip
TRAIN_FIELDS = {"lr": (float, 0.0, True, None, 0.05), "batch_size": (int, 1, False, None, 64)}


# ---------------------------------------------------------------------------------------------- the user's space


class _RawTrial:
    """Records the distributions a space file asks for, answering from ``config`` (else the low end / first
    choice): the file's own space, read without kdtune's wrapper."""

    def __init__(self, config):
        self.config = config
        self.dists = {}

    def _answer(self, name, dist, default):
        self.dists[name] = dist
        return self.config.get(name, default)

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self._answer(name, optuna.distributions.FloatDistribution(low, high, step=step, log=log), low)

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return self._answer(name, optuna.distributions.IntDistribution(low, high, step=step, log=log), low)

    def suggest_categorical(self, name, choices):
        return self._answer(
            name, optuna.distributions.CategoricalDistribution(list(choices)), list(choices)[0]
        )


def file_dists(fn, config=None) -> dict:
    """The space file's own distributions on ``config``'s path (its default path without one)."""
    t = _RawTrial(config or {})
    fn.module.space(t, fn.ctx)
    return t.dists


def same(a, b) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def in_override(o, v) -> bool:
    if o.kind == "fixed":
        return same(v, o.value)
    if o.kind == "choices":
        return any(same(v, c) for c in o.choices)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not o.low <= v <= o.high:
        return False
    if o.integer and not isinstance(v, int):
        return False
    if o.step:
        k = (v - o.low) / o.step
        return abs(k - round(k)) < 1e-6
    return True


def in_dist(dist, v) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(v))
    except (ValueError, TypeError):
        return False


def outside_user_space(fn, config: dict) -> list[str]:
    """The names of ``config`` whose value lies outside the space the user wrote: the spec's override where it
    gives one, else the space file's own distribution (on the configuration's path)."""
    bad = [f"{n} missing" for n in fn.overrides if n not in config]
    raw = file_dists(fn, config)
    for name, v in config.items():
        o = fn.overrides.get(name)
        if o is not None:
            if not in_override(o, v):
                bad.append(f"{name}={v!r} (spec: {o.to_yaml()})")
        elif name in raw and not in_dist(raw[name], v):
            bad.append(f"{name}={v!r} (file: {raw[name]})")
    return bad


# ---------------------------------------------------------------------------------------------- the constraints


def domain(fn, name):
    """``(values, interval)``: the user's domain of ``name``, as a list of values or a (low, high) interval."""
    o = fn.overrides.get(name)
    if o is not None:
        if o.kind == "fixed":
            return [o.value], None
        if o.kind == "choices":
            return list(o.choices), None
        return None, (o.low, o.high)
    d = file_dists(fn)[name]
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return list(d.choices), None
    return None, (d.low, d.high)


def lo_hi(fn, name):
    values, interval = domain(fn, name)
    return (min(values), max(values)) if values is not None else interval


def zero_only(fn, name) -> bool:
    values, _ = domain(fn, name)
    return values is not None and all(v == 0 for v in values)


def empty_by_oracle(fn) -> bool:
    """Whether no configuration of the user's space meets the method's constraints, decided here from the
    domains' ends, independently of kdtune's own analysis."""
    if fn.method == "disk":
        return not lo_hi(fn, "lambda_min")[0] < lo_hi(fn, "lambda_max")[1] or lo_hi(fn, "K")[0] > CLASSES
    if fn.method in ("dkd", "dist"):
        a, b = CONSTRAINED[fn.method]
        return zero_only(fn, a) and zero_only(fn, b)
    return False


def constraint_errors(fn, config: dict) -> list[str]:
    """What a trial would be refused for: its TrainConfig (types, ranges, the method's combination checks) and
    DiSK's K against the class count (checked when the method is built)."""
    from kdtune.tune.trainable import TrialContext, trial_config

    base = {"data": "digits", "model": "resnet8", "method": fn.method, "epochs": 3, "teacher": "<teacher>",
            "init": "<ce student>"}  # fmt: skip
    try:
        cfg = trial_config(TrialContext(group="g", method=fn.method, base=base, experiment_dir="/x"), config)
    except ConfigError as e:
        return [str(e)]
    if fn.method == "disk" and cfg.hp["K"] > CLASSES:
        return [f"K={cfg.hp['K']} > {CLASSES} classes"]
    return []


def mirror_errors(fn, config: dict) -> list[str]:
    """What the Optuna mirror (kdtune.tune.callbacks.OptunaMirror) would fail on for this configuration."""
    _, dists, outside = fn.record(config)
    params = {k: config[k] for k in dists if k in config}
    try:
        optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=0.0)
    except ValueError as e:
        return [str(e)]
    return [f"record: {o}" for o in outside]


# ---------------------------------------------------------------------------------------------- narrowings


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _valid(hp, v) -> bool:
    lo, hi = hp
    return (lo is None or v > lo[0] or (v == lo[0] and not lo[1])) and (
        hi is None or v < hi[0] or (v == hi[0] and not hi[1])
    )


def _param_info(method: str, name: str, ref_dist):
    """``(type, (low, open) | None, (high, open) | None, reference low, reference high, choices)``."""
    hp = METHODS.get(method).hparams.get(name)
    if hp is None:
        typ, low, low_open, high, default = TRAIN_FIELDS[name]
        bounds = ((low, low_open), None)
    else:
        typ, default = hp.type, hp.default
        bounds = (
            None if hp.low is None else (hp.low, hp.low_open),
            None if hp.high is None else (hp.high, hp.high_open),
        )
    choices = None
    if typ is bool:
        choices = [False, True]
    elif hp is not None and hp.choices:
        choices = list(hp.choices)
    if isinstance(ref_dist, optuna.distributions.CategoricalDistribution):
        nums = [c for c in ref_dist.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if not nums:
            choices = list(ref_dist.choices)
            return typ, bounds, None, None, choices
        ref = (min(nums), max(nums))
    elif ref_dist is not None:
        ref = (ref_dist.low, ref_dist.high)
    else:
        ref = (default / 4, default * 4) if default else (0.0, 1.0)
    return typ, bounds, ref[0], ref[1], choices


def _value(rng: random.Random, typ, bounds, rlo, rhi, pool):
    """A valid value, inside or outside the published range [rlo, rhi] (up to 3x beyond either end)."""
    for _ in range(100):
        r = rng.random()
        if pool and r < 0.3:
            v = rng.choice(pool)
        elif r < 0.38 and (
            bounds[0] is None or bounds[0][0] <= 0 <= (math.inf if bounds[1] is None else bounds[1][0])
        ):
            v = 0
        elif rlo > 0 and rng.random() < 0.6:
            v = math.exp(rng.uniform(math.log(rlo / 3), math.log(rhi * 3)))
        else:
            span = rhi - rlo or 1.0
            v = rng.uniform(rlo - span, rhi + span)
        v = int(round(v)) if typ is int else _sig(float(v))
        if _valid(bounds, v):
            return v
    raise AssertionError("no valid value found")


def narrowing(rng: random.Random, method: str, fn) -> dict:
    """A random ``methods.<method>.space`` mapping."""
    dists = file_dists(fn)
    names = list(dists) + list(EXTRA.get(method, ()))
    chosen = [n for n in CONSTRAINED.get(method, ()) if rng.random() < 0.7]
    chosen += [n for n in rng.sample(names, min(len(names), rng.randint(1, 3))) if n not in chosen]
    out = {}
    for name in chosen:
        ref = dists.get(name)
        typ, bounds, rlo, rhi, choices = _param_info(method, name, ref)
        pool = list(ref.choices) if isinstance(ref, optuna.distributions.CategoricalDistribution) else []
        if method in ("dkd", "dist") and name in CONSTRAINED[method] and rng.random() < 0.4:
            out[name] = rng.choice([0, 0.0, [0.0]])  # the weights' constraint: not both 0
            continue
        if choices is not None:  # booleans and names: a choice list or one value
            pick = rng.sample(choices, rng.randint(1, len(choices)))
            out[name] = pick[0] if len(pick) == 1 and rng.random() < 0.5 else pick
            continue
        kind = rng.choice(["fixed", "choices", "range", "range"])
        if kind == "fixed":
            out[name] = _value(rng, typ, bounds, rlo, rhi, pool)
        elif kind == "choices":
            vals = []
            for _ in range(rng.randint(1, 4)):
                v = _value(rng, typ, bounds, rlo, rhi, pool)
                if v not in vals:
                    vals.append(v)
            out[name] = vals
        else:
            a, b = sorted(_value(rng, typ, bounds, rlo, rhi, pool) for _ in range(2))
            if a == b:
                b = a + 1 if typ is int else _sig(a * 2 + 1)
                if not _valid(bounds, b):
                    out[name] = a
                    continue
            r = {"low": a, "high": b}
            if a > 0 and rng.random() < 0.35:
                r["log"] = True
            elif rng.random() < 0.15:
                r["step"] = max(1, (b - a) // 4) if typ is int else _sig((b - a) / rng.choice([3, 4, 7]))
            out[name] = r
    return out


def spec_for(method: str, space: dict, tmp_path: Path, starts=True) -> dict:
    return {
        "name": f"prop-{method}", "data": "digits", "teacher": {"model": "resnet8", "train": {"epochs": 1}},
        "students": ["resnet8"], "methods": {method: {"space": space, "starts": starts, "trials": 4}},
        "budget": {"trials": 4, "epochs": 3}, "train": {"device": "cpu"}, "storage": str(tmp_path / "runs"),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- the property


def _base_space(method):
    from kdtune.tune.spaces import SpaceContext, build_space

    cls = METHODS.get(method)
    return build_space(method, SpaceContext(method=method, data="digits", student="resnet8",
                                            teacher="resnet8" if cls.needs_teacher else None, epochs=3,
                                            num_classes=CLASSES))  # fmt: skip


def check_one(method: str, space: dict, seed: int, tmp_path: Path, starts=True, asks: int = 4) -> str:
    """Plan the spec; check the refusal or every configuration; return "refused" or "ran"."""
    from kdtune.tune.plan import plan
    from kdtune.tune.search import GROUP_KEY, GroupedOptunaSearch, GroupSearch

    raw = spec_for(method, space, tmp_path, starts)
    try:
        spec = load_spec(raw)
        p = plan(spec)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        from kdtune.config import TrainConfig
        from kdtune.spec import parse_override

        fn = _base_space(method)
        fn.overrides = {
            k: parse_override(k, k, v, METHODS.get(method), TrainConfig) for k, v in space.items()
        }
        assert empty_by_oracle(fn), f"refused a space the constraints do not empty: {space}: {msg}"
        if method == "disk" and not lo_hi(fn, "lambda_min")[0] < lo_hi(fn, "lambda_max")[1]:
            assert "lambda_min" in msg and "lambda_max" in msg, msg
        elif method == "disk":
            assert "disk.K" in msg and "number of classes (10)" in msg, msg
        else:
            assert all(f"{method}.{n}" in msg for n in CONSTRAINED[method]), msg
        return "refused"
    (g,) = p.groups
    rng = random.Random(seed)
    ce_error = round(rng.uniform(0.02, 0.6), 3) if g.needs_ce_error else None
    fn = p.space(g, ce_error)  # the space the sweep runs (DiSK's once the CE stage's error is known)
    assert not empty_by_oracle(fn), f"accepted a space its constraints empty: {space}"
    for point in g.starts:  # the plan's starting points, before the searcher
        assert not outside_user_space(fn, {**fn.record(point)[0], **point}), (space, point)
    search = GroupedOptunaSearch([GroupSearch(g.name, fn, len(g.starts) + asks, list(g.starts))], "val_acc", "max",
                                 epochs=3, seed=seed)  # fmt: skip
    kept = search.groups[g.name].starts
    for i in range(len(g.starts) + asks):
        cfg = search.suggest(f"t{i}")
        if cfg == "FINISHED" or cfg is None:
            break
        config = {k: v for k, v in cfg.items() if k != GROUP_KEY}
        if i < len(kept):  # a starting point runs as given
            assert {k: config[k] for k in kept[i]} == kept[i], (space, kept[i], config)
        assert not outside_user_space(fn, config), (space, config, outside_user_space(fn, config))
        assert not constraint_errors(fn, config), (space, config, constraint_errors(fn, config))
        assert not mirror_errors(fn, config), (space, config, mirror_errors(fn, config))
        search.on_trial_complete(
            f"t{i}", {"val_acc": rng.uniform(10, 90), "epoch": 3, "training_iteration": 3}
        )
    return "ran"


ALL = list(METHODS.names())


@pytest.mark.parametrize("method", ALL)
def test_random_narrowings_run_inside_the_users_space_or_are_refused(method, tmp_path):
    rng = random.Random(f"narrowings-{method}")
    fn = _base_space(method)
    outcomes = []
    for i in range(PER_METHOD):
        space = narrowing(rng, method, fn)
        starts = True
        if rng.random() < 0.15:  # the user's own starting point: random values, inside the space or not
            starts = [{k: (v if not isinstance(v, (dict, list)) else (v[0] if isinstance(v, list) else v["low"]))
                       for k, v in narrowing(rng, method, fn).items()}]  # fmt: skip
        asks = 12 if i % 10 == 9 else 3  # every tenth far enough for TPE to take over from random sampling
        outcomes.append(check_one(method, space, rng.randrange(10**6), tmp_path, starts, asks))
    if method in CONSTRAINED:  # both sides of the constraint are reached
        assert "refused" in outcomes and "ran" in outcomes, outcomes
    else:
        assert set(outcomes) == {"ran"}


# ---------------------------------------------------------------------------------------------- named cases


@pytest.mark.parametrize(
    "space, runs",
    [
        # the issue: no lambda_max in [0.5, 5] exceeds lambda_min = 10
        ({"lambda_min": 10, "lambda_max": {"low": 0.5, "high": 5}}, False),
        ({"lambda_min": {"low": 5, "high": 20}, "lambda_max": [1, 5]}, False),
        ({"lambda_max": 5, "lambda_min": [5, 10]}, False),
        ({"K": {"low": 11, "high": 50}}, False),
        # non-empty: the file's lambda_min set is narrowed to {0.01, 0.1, 1}, lambda_max asked above it
        ({"lambda_max": {"low": 0.5, "high": 5}}, True),
        ({"lambda_max": {"low": 0.5, "high": 20, "step": 0.5}, "lambda_min": {"low": 1, "high": 10}}, True),
        ({"lambda_min": 60}, True),  # the file's lambda_max reaches 100 and 1000
        ({"lambda_max": [5, 20], "lambda_min": [1, 10]}, True),  # a lambda_min of 10 draws lambda_max 20
        ({"K": [5, 50]}, True),
    ],
)
def test_disk_constraints_named_cases(space, runs, tmp_path):
    assert check_one("disk", space, 1, tmp_path, asks=12) == ("ran" if runs else "refused")


def test_dkd_alpha_and_beta_never_both_zero(tmp_path):
    assert check_one("dkd", {"alpha": 0, "beta": [0.0]}, 0, tmp_path) == "refused"
    assert check_one("dkd", {"alpha": [0.0], "beta": 0}, 0, tmp_path) == "refused"
    assert check_one("dkd", {"alpha": 0, "beta": [0.0, 2.0]}, 0, tmp_path, asks=8) == "ran"
    assert (
        check_one("dkd", {"alpha": [0.0, 1.0], "beta": {"low": 0, "high": 2}}, 0, tmp_path, asks=12) == "ran"
    )
    assert (
        check_one("dist", {"beta": 0, "gamma": {"low": 0, "high": 1, "step": 0.25}}, 0, tmp_path, asks=8)
        == "ran"
    )


# ---------------------------------------------------------------------------------------------- a real sweep


def test_real_sweep_runs_every_trial_inside_the_narrowed_space(tmp_path, capsys):
    """``kdtune sweep`` on narrowed spaces whose published starting points lie outside them: DiSK with
    lambda_min fixed at 10 and lambda_max in [5, 15] (half of it below lambda_min, where the old repair took 20
    from the file's set; the paper's start has 50), DKD with alpha fixed at 0 and beta in {0, 2} (beta = 0
    would leave DKD nothing; the starts' betas are 8 and up). Every trial's hyperparameters lie in the
    narrowed space and meet the constraints, in the results and in the Optuna mirror, which records every
    trial without a warning."""
    from kdtune.cli import main

    spec = {
        "name": "narrow", "data": "digits", "teacher": {"model": "resnet8", "train": {"epochs": 1}},
        "students": ["resnet8"],
        "methods": {
            # K fixed: kdtune's preflight builds DiSK from its default K (20 > 10 classes) when no published
            # starting point is left (kdtune/preflight.py, `points or [{}]`); alternate: batch spares the
            # guide's passes over the data (seconds)
            "disk": {"space": {"lambda_min": 10, "lambda_max": {"low": 5, "high": 15}, "K": 5,
                               "alternate": "batch"}, "trials": 2},
            "dkd": {"space": {"alpha": 0, "beta": [0.0, 2.0]}, "trials": 1},
        },
        "budget": {"trials": 2, "epochs": 1, "concurrency": 2, "cpus_per_trial": 1},
        "scheduler": "none", "train": {"device": "cpu", "batch_size": 256},
        "storage": str(tmp_path / "runs"), "tracking": {"enabled": False}, "seed": 0,
    }  # fmt: skip
    path = tmp_path / "narrow.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "could not mirror" not in out and "warning" not in out, out
    assert "resnet8-disk: starting point" in out and "left out: lambda_max=50.0 outside the space" in out
    results = json.loads((tmp_path / "runs" / "narrow" / "results.json").read_text())
    trials = {g["method"]: g["all"] for g in results["groups"]}
    assert len(trials["disk"]) == 2 and len(trials["dkd"]) == 1
    for t in trials["disk"]:
        c = t["config"]
        assert c["lambda_min"] == 10 and 10 < c["lambda_max"] <= 15 and c["K"] == 5, c
        assert t.get("error") is None
    for t in trials["dkd"]:
        assert t["config"]["alpha"] == 0 and t["config"]["beta"] == 2.0 and t.get("error") is None, t
    db = f"sqlite:///{tmp_path / 'runs' / 'narrow' / 'optuna.db'}"
    study = optuna.load_study(study_name="resnet8-disk", storage=db)
    mirrored = study.get_trials(deepcopy=False)
    assert len(mirrored) == 2 and all(10 < t.params["lambda_max"] <= 15 for t in mirrored)
