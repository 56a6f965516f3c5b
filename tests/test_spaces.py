"""Search spaces: one contract test over every method (its space samples only valid training configs and its
published starting points fit it), the published values themselves, conditional and dependent ranges, spec
overrides, pickling for Ray, and the lookup path."""

from __future__ import annotations

import pickle

import optuna
import pytest

from kdtune.config import TrainConfig
from kdtune.errors import ConfigError
from kdtune.losses import METHODS
from kdtune.spec import Override
from kdtune.tune.spaces import SpaceContext, available_spaces, build_space, find_space_file, search_path

optuna.logging.set_verbosity(optuna.logging.WARNING)
ALL = METHODS.names()

PAIRS = [
    ("cifar100", "resnet32x4", "resnet8x4"),
    ("cifar100", "wrn_40_2", "wrn_16_2"),
    ("cifar100", "vgg13", "vgg8"),
    ("cifar100", "resnet56", "resnet20"),
    ("digits", "resnet8x4", "resnet8"),
]


def ctx_for(method, pair=PAIRS[0], epochs=240, classes=None, ce_error=0.3):
    data, teacher, student = pair
    classes = classes or {"cifar100": 100, "digits": 10}[data]
    return SpaceContext(method=method, data=data, student=student, teacher=teacher, epochs=epochs,
                        num_classes=classes, ce_error=ce_error)  # fmt: skip


def as_train_config(method, config, ctx):
    """Build the TrainConfig a trial would run (paths are placeholders: nothing is loaded)."""
    from kdtune.tune.trainable import TrialContext, trial_config

    base = {"data": ctx.data, "model": ctx.student, "method": method, "epochs": ctx.epochs,
            "teacher": "<teacher>", "init": "<ce student>"}  # fmt: skip
    return trial_config(TrialContext(group="g", method=method, base=base, experiment_dir="/x"), config)


def test_every_method_has_a_space_file():
    assert set(ALL) <= set(available_spaces())
    for m in ALL:
        assert find_space_file(m).name == f"{m}.py"


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[1]}-{p[2]}")
def test_space_contract(method, pair):
    """Every sampled config and every starting point is a valid TrainConfig for this method."""
    ctx = ctx_for(method, pair, epochs=240 if pair[0] == "cifar100" else 8)
    fn = build_space(method, ctx)
    points, notes = fn.valid_starts()
    assert notes == [], notes
    assert len(points) == len(fn.starts())  # no published point is dropped
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for p in points:
        study.enqueue_trial(p)
    for i in range(len(points) + 12):
        trial = study.ask()
        config = fn(trial)
        config = {**trial.params, **config}
        if i < len(points):
            assert {k: config[k] for k in points[i]} == points[i]  # starting points are run as given
        cfg = as_train_config(method, config, ctx)  # raises ConfigError on an invalid value
        assert set(config) <= set(METHODS.get(method).hparams) | set(TrainConfig.fields())
        study.tell(trial, float(i % 5))
    assert cfg.method == method


def test_dkd_starting_points_are_the_official_beta_times_the_gamma_set():
    fn = build_space("dkd", ctx_for("dkd", PAIRS[0]))
    pts = [p for p in fn.starts() if not p["logit_std"]]
    assert [p["beta"] for p in pts] == [8.0, 16.0, 32.0, 1.6, 64.0]
    assert [p["alpha"] for p in pts] == [1.0, 2.0, 4.0, 0.2, 8.0]
    assert all(p["T"] == 4.0 for p in pts)
    assert build_space("dkd", ctx_for("dkd", PAIRS[2])).starts()[0]["beta"] == 6.0  # vgg13 -> vgg8
    assert build_space("dkd", ctx_for("dkd", PAIRS[3])).starts()[0]["beta"] == 2.0  # resnet56 -> resnet20
    # logit standardisation: the official code's --base-temp 2 --kd-weight 9 (alpha 9, beta 9 * 8)
    assert fn.starts()[-1] == {"alpha": 9.0, "beta": 72.0, "T": 2.0, "logit_std": True}
    _, dists, _ = fn.record()
    assert set(dists["logit_std"].choices) == {False, True}
    # the 20-epoch warm-up of a 240-epoch run; a short sweep keeps the fraction
    assert fn.record()[0]["warmup"] == 20
    assert build_space("dkd", ctx_for("dkd", PAIRS[4], epochs=24)).record()[0]["warmup"] == 2


def test_ttm_wttm_dist_kd_published_points():
    assert build_space("wttm", ctx_for("wttm", PAIRS[1])).starts() == [{"gamma": 0.1, "beta": 4.0}]
    assert build_space("wttm", ctx_for("wttm", PAIRS[0])).starts() == [{"gamma": 0.1, "beta": 3.0}]
    assert build_space(
        "wttm", ctx_for("wttm", ("imagenet", "resnet34", "resnet18"), classes=1000)
    ).starts() == [{"gamma": 0.8, "beta": 1.6}]
    assert build_space("ttm", ctx_for("ttm", PAIRS[3])).starts() == [{"gamma": 0.3, "beta": 7.0}]
    assert build_space("dist", ctx_for("dist", PAIRS[0])).starts() == [
        {"beta": 1.0, "gamma": 1.0, "tau": 4.0, "w_kd": 2.0}
    ]
    fn = build_space("kd", ctx_for("kd", PAIRS[0]))
    assert fn.starts() == [
        {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9, "logit_std": False},
        {"T": 2.0, "w_ce": 0.1, "w_kd": 9.0, "logit_std": True},  # Sun et al. 2024's official KD setting
    ]
    assert set(fn.record()[1]["logit_std"].choices) == {False, True}


def test_disk_dependent_ranges_follow_lambda_min_and_the_ce_error():
    ce_error = 0.1
    fn = build_space("disk", ctx_for("disk", PAIRS[4], epochs=8, classes=10, ce_error=ce_error))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_min = set()
    for _ in range(60):
        t = study.ask()
        consts = fn(t)
        c = {**t.params, **consts}
        assert c["lambda_max"] > c["lambda_min"]
        assert c["lambda_max"] in (1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)  # A.5's set, not a range
        assert -ce_error - 1e-12 <= c["delta_offset"] <= 0.2 and c["delta_offset"] >= -0.2
        assert 0.0 <= ce_error + c["delta_offset"] <= 1.0
        assert c["K"] <= 10  # digits has 10 classes
        seen_min.add(c["lambda_min"])
        study.tell(t, 0.0)
    assert len(seen_min) > 2
    start = fn.starts()[0]
    assert start["K"] == 10 and start["tau_t"] == 7.0 and start["lambda_max"] == 50.0
    # CIFAR-100: the paper's K = 20 default, and the +-0.2 window when the error is far from 0 and 1
    fn = build_space("disk", ctx_for("disk", PAIRS[0], ce_error=0.5))
    _, dists, _ = fn.record()
    assert (dists["delta_offset"].low, dists["delta_offset"].high) == (-0.2, 0.2)
    assert fn.starts()[0]["K"] == 20


def test_ipwd_momentum_is_conditional():
    fn = build_space("ipwd", ctx_for("ipwd"))
    assert "momentum" not in fn.record({"weighting": "sample"})[1]
    assert "momentum" in fn.record({"weighting": "class"})[1]
    assert any(ln.startswith("momentum") for ln in fn.describe())


def test_overrides_fix_choose_narrow_and_add():
    ov = {
        "T": Override("fixed", value=3.0),
        "w_kd": Override("choices", choices=(0.5, 2.0)),
        "w_ce": Override("range", low=0.2, high=0.3),
        "lr": Override("range", low=0.01, high=0.1, log=True),
    }
    fn = build_space("kd", ctx_for("kd"), ov)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        t = study.ask()
        consts = fn(t)
        c = {**t.params, **consts}
        assert c["T"] == 3.0 and "T" not in t.params
        assert c["w_kd"] in (0.5, 2.0)
        assert 0.2 <= c["w_ce"] <= 0.3
        assert 0.01 <= c["lr"] <= 0.1
        assert as_train_config("kd", c, fn.ctx).lr == c["lr"]
        study.tell(t, 0.0)
    # the published point (w_ce 0.1, w_kd 0.9) lies outside the narrowed space: left out, with a note
    points, notes = fn.valid_starts()
    assert points == [] and notes and "outside the space" in notes[0]
    # a point inside survives, with the fixed T removed from it
    points, notes = fn.valid_starts([{"T": 9.0, "w_kd": 2.0, "w_ce": 0.25, "lr": 0.05}])
    assert points == [{"w_kd": 2.0, "w_ce": 0.25, "lr": 0.05}] and notes == []


def test_integer_override_and_bad_space_values():
    fn = build_space("disk", ctx_for("disk"), {"K": Override("range", low=2, high=6, integer=True)})
    _, dists, _ = fn.record()
    assert type(dists["K"]).__name__ == "IntDistribution"
    # a space whose range leaves the hyperparameter's valid range is refused when built
    with pytest.raises(ConfigError, match="kd.T"):
        build_space(
            "kd",
            ctx_for("kd"),
            source=("bad_kd.py", "def space(trial, ctx):\n    trial.suggest_float('T', 0.0, 4.0)\n"),
        )
    with pytest.raises(ConfigError, match="neither a hyperparameter"):
        build_space(
            "kd", ctx_for("kd"), source=("bad.py", "def space(trial, ctx):\n    return {'temperature': 4}\n")
        )
    with pytest.raises(ConfigError, match="fails to load"):
        build_space("kd", ctx_for("kd"), source=("broken.py", "def space(trial, ctx)\n"))
    with pytest.raises(ConfigError, match="no space"):
        build_space("kd", ctx_for("kd"), source=("empty.py", "X = 1\n"))


def test_space_fn_pickles_with_its_source():
    fn = build_space("dkd", ctx_for("dkd"), {"T": Override("fixed", value=4.0)})
    clone = pickle.loads(pickle.dumps(fn))
    assert "_module" not in clone.__dict__ and clone.source == fn.source
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t = study.ask()
    c = clone(t)
    assert c["T"] == 4.0 and c["warmup"] == 20


def test_lookup_path_prefers_kdtune_spaces(tmp_path, monkeypatch):
    (tmp_path / "kd.py").write_text("def space(trial, ctx):\n    trial.suggest_float('T', 2.0, 3.0)\n")
    monkeypatch.setenv("KDTUNE_SPACES", str(tmp_path))
    assert search_path()[0] == tmp_path
    assert find_space_file("kd") == tmp_path / "kd.py"
    fn = build_space("kd", ctx_for("kd"))
    assert list(fn.parameters()) == ["T"]
    # other methods still come from the shipped folder
    assert find_space_file("dkd").parent.name == "search_spaces"


def test_cli_spaces_prints_space_and_points(capsys):
    from kdtune.cli import main

    assert main(["spaces", "wttm", "--teacher", "wrn_40_2", "--student", "wrn_16_2"]) == 0
    out = capsys.readouterr().out
    assert "gamma" in out and "float log [0.05, 1]" in out
    assert "gamma=0.1, beta=4" in out


def test_a_wheel_install_finds_the_spaces(tmp_path):
    """Built as a wheel and installed elsewhere (no checkout beside it), kdtune still finds every space."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, src / name)
    for name in ("kdtune", "search_spaces"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("kdtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).stem for n in names if "/data/share/kdtune/search_spaces/" in n)
    assert shipped == sorted(available_spaces())
    prefix = tmp_path / "prefix"
    script = Path(sys.executable).with_name("kdtune")  # this environment's own install must survive the test
    had_script = script.exists()
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--ignore-installed", "--prefix", str(prefix), str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)  # fmt: skip
    assert script.exists() == had_script
    (site,) = prefix.glob("lib/python*/site-packages")
    code = ("import kdtune; from kdtune.tune.spaces import find_space_file; "
            "print(kdtune.__file__); print(find_space_file('dkd'))")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)})  # fmt: skip
    assert p.returncode == 0, p.stderr
    pkg_file, space_file = p.stdout.split()
    assert Path(pkg_file).is_relative_to(site)
    assert Path(space_file) == prefix / "share" / "kdtune" / "search_spaces" / "dkd.py"


# ---------------------------------------------------------------------------------------------- constraints


def _asked(fn, n=40, seed=0):
    """``n`` configurations as the searcher makes them: ``(params Optuna recorded, constants, config run)``."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        t = study.ask()
        consts = fn(t)
        out.append((dict(t.params), consts, {**t.params, **consts}))
        study.tell(t, 0.0)
    return out


def test_constraints_narrow_the_space_then_hold_in_every_trial():
    """DiSK with lambda_max narrowed to [0.5, 5]: lambda_min's set loses the values no lambda_max can exceed, and
    each trial asks lambda_max above the lambda_min it drew (a range may move between trials); nothing is
    repaired with a value from outside the narrowed range (the bug: a lambda_max of 20 from the file's set)."""
    ctx = ctx_for("disk", PAIRS[4], epochs=8, classes=10)
    fn = build_space("disk", ctx, {"lambda_max": Override("range", low=0.5, high=5.0)})
    assert fn.parameters()["lambda_min"].choices == (0.01, 0.1, 1.0)
    assert fn.narrowed() == ["lambda_min narrowed to {0.01, 0.1, 1} (of {0.01, 0.1, 1, 5, 10} in disk.py) by the "
                             "constraint lambda_max > lambda_min"]  # fmt: skip
    for params, consts, c in _asked(fn):
        assert 0.5 <= c["lambda_max"] <= 5.0 and c["lambda_max"] > c["lambda_min"], c
        assert "lambda_max" not in consts and params["lambda_max"] == c["lambda_max"]
    # choice sets stay whole (Optuna keeps one per name): a draw that breaks the constraint becomes the nearest
    # choice that meets it, which the trial trains with; Optuna's record keeps the draw
    fn = build_space("disk", ctx, {"lambda_min": Override("choices", choices=(1.0, 10.0)),
                                   "lambda_max": Override("choices", choices=(5.0, 20.0))})  # fmt: skip
    pairs = set()
    for params, consts, c in _asked(fn):
        assert c["lambda_max"] > c["lambda_min"] and c["lambda_max"] in (5.0, 20.0)
        if params["lambda_min"] == 10.0 and params["lambda_max"] == 5.0:
            assert consts["lambda_max"] == 20.0
        pairs.add((c["lambda_min"], c["lambda_max"]))
    assert pairs == {(1.0, 5.0), (1.0, 20.0), (10.0, 20.0)}
    # the K bound: a narrowing above the class count loses its impossible values
    fn = build_space("disk", ctx, {"K": Override("range", low=2, high=50, integer=True)})
    assert (fn.parameters()["K"].low, fn.parameters()["K"].high) == (2, 10)


def test_starting_points_breaking_a_constraint_are_dropped_and_their_own_values_kept():
    ctx = ctx_for("disk", PAIRS[4], epochs=8, classes=10)
    fn = build_space("disk", ctx, {"lambda_min": Override("choices", choices=(1.0, 10.0)),
                                   "lambda_max": Override("range", low=5.0, high=20.0)})  # fmt: skip
    points, notes = fn.valid_starts([{"lambda_min": 10.0, "lambda_max": 6.0}, {"lambda_min": 1.0, "lambda_max": 6.0},
                                     {"lambda_max": 8.0}])  # fmt: skip
    assert points == [{"lambda_min": 1.0, "lambda_max": 6.0}, {"lambda_max": 8.0}]
    assert len(notes) == 1 and "left out: lambda_min=10.0 breaks lambda_max > lambda_min" in notes[0]
    # a point giving only lambda_max: the lambda_min asked before it is asked to fit it (never 10 > 8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        study.enqueue_trial({"lambda_max": 8.0})
        t = study.ask()
        consts = fn(t)
        c = {**t.params, **consts}
        assert c["lambda_max"] == 8.0 and c["lambda_min"] == 1.0
        study.tell(t, 0.0)
    # DKD: a point with beta 0 keeps it; alpha, not given, is asked nonzero
    fn = build_space("dkd", ctx_for("dkd"), {"alpha": Override("choices", choices=(0.0, 2.0)),
                                             "beta": Override("choices", choices=(0.0, 4.0))})  # fmt: skip
    points, notes = fn.valid_starts([{"alpha": 0.0, "beta": 0.0}, {"beta": 0.0}])
    assert points == [{"beta": 0.0}] and "breaks alpha and beta not both 0" in notes[0]


@pytest.mark.parametrize(
    "method, ov, needles",
    [
        ("disk", {"lambda_min": Override("fixed", value=10.0), "lambda_max": Override("range", low=0.5, high=5.0)},
         ["methods.disk (resnet8 on digits): no lambda_max in [0.5, 5] (methods.disk.space.lambda_max) exceeds "
          "lambda_min = 10 (methods.disk.space.lambda_min), and disk needs lambda_max > lambda_min; lower lambda_min "
          "below 5 or raise lambda_max above 10"]),
        ("disk", {"lambda_max": Override("fixed", value=0.005)},
         ["no lambda_max = 0.005 (methods.disk.space.lambda_max) exceeds lambda_min in {0.01, 0.1, 1, 5, 10} (disk.py)"]),
        ("disk", {"K": Override("range", low=11, high=50, integer=True)},
         ["every disk.K in [11, 50] (methods.disk.space.K) exceeds the number of classes (10); set K <= 10"]),
        ("disk", {"K": Override("fixed", value=20, integer=True)},
         ["methods.disk (resnet8 on digits): disk.K=20 exceeds the number of classes (10); set K <= 10"]),
        ("dkd", {"alpha": Override("fixed", value=0.0), "beta": Override("choices", choices=(0.0,))},
         ["dkd.alpha and dkd.beta are both 0 in every configuration", "methods.dkd.space.alpha"]),
    ],
)  # fmt: skip
def test_a_constraint_no_configuration_meets_is_refused_in_one_line_naming_both_fields(method, ov, needles):
    with pytest.raises(ConfigError) as e:
        build_space(method, ctx_for(method, PAIRS[4], epochs=8, classes=10), ov)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


OLD_DISK = """
def space(trial, ctx):
    lam_min = trial.suggest_categorical("lambda_min", [0.1, 10.0])
    lam_max = trial.suggest_categorical("lambda_max", [1.0, 5.0])
    return {} if lam_max > lam_min else {"lambda_max": 20.0}
"""


def test_a_file_repair_outside_the_space_is_refused_and_the_spec_wins_over_a_file_constant():
    ctx = ctx_for("disk", PAIRS[4], epochs=8, classes=10)
    with pytest.raises(ConfigError, match=r"old_disk.py returns lambda_max=20, outside what it asks"):
        build_space("disk", ctx, source=("old_disk.py", OLD_DISK))
    # the spec's lambda_max replaces the file's repair, which then cannot hold: an undeclared constraint that
    # the method checks is found by sampling
    with pytest.raises(ConfigError, match=r"configurations sampled from the space fail \(disk.lambda_max=.* must "
                                          r"exceed disk.lambda_min=10"):  # fmt: skip
        build_space(
            "disk",
            ctx,
            {"lambda_max": Override("range", low=0.5, high=5.0)},
            source=("old_disk.py", OLD_DISK),
        )
    # DKD returns its warm-up as a constant; a spec that searches it wins
    fn = build_space("dkd", ctx_for("dkd"), {"warmup": Override("range", low=1, high=3, integer=True)})
    for _params, consts, c in _asked(fn, 10):
        assert "warmup" not in consts and 1 <= c["warmup"] <= 3
