"""The fused bundle: members equal lone runs, one teacher forward per batch, drop, resume, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kdtune.config import TrainConfig
from kdtune.data import load_data
from kdtune.data.base import Split
from kdtune.engine import Bundle, Trainer, iter_train_bundle, train_bundle
from kdtune.engine.exactness import max_rel
from kdtune.errors import ConfigError
from kdtune.losses import METHODS
from kdtune.models import create_model
from kdtune.models.checkpoint import save_model

# Exactness is checked where rounding shows: 3 epochs of 5 batches (320 images at batch 64), with the schedules,
# the evaluation between epochs and BatchNorm's statistics in play. A member of an exact mode (mode="loop", and
# whatever Bundle.probe_exact finds bit for bit equal to the lone kernels here: loop_cl on most CPUs; mode="auto"
# picks among those only) must end within EXACT_RTOL of its lone run: the largest relative difference of any
# tensor of the state dict. How the tolerance was derived (measured, docs/exactness.md): no perturbation is
# harmless over epochs. A lone run with lr x (1 + 1e-7) moved by 4e-7 in one epoch of CE but by 0.13 in one of
# DIST and 0.28 in ten of CE (`kdtune bench --exactness`); its weights x (1 + 2e-6 noise) by 3e-2 after one step:
# once a ReLU input lies closer to zero than the difference, the runs part. So only bit for bit holds, and exact
# modes measure 0.0 here; 1e-4 (the brief's figure) leaves room for nothing but a last-bit difference that no
# step has amplified yet, and test_an_inexact_mode_fails_the_tolerance shows a mode that rounds differently fails it.
EXACT_RTOL = 1e-4
EXACT_MODES = ("loop", "loop_cl", "auto")  # loop_cl: where its probe finds it exact on this machine
# grouped and vmap round differently from the lone kernels (their probes say so): over two steps they stay near the
# lone run, which still catches a member that trains another member's hyperparameters or channels.
ATOL = {"vmap": 1e-5, "grouped": 1e-5, "loop_cl": 1e-5}
# AdamW's first steps are about lr * sign(g) / (1 + eps / |g|): where a gradient is a few eps, a relative
# rounding of 1e-6 moves the step by a larger share. grouped's two AdamW steps at lr 1e-3 end within 1.6e-5 of the
# lone run's (1 % of one step); a swapped member (another seed, half the lr) differs by more than 1e-2.
ADAMW_ATOL = {"grouped": 5e-5, "loop_cl": 5e-5, "vmap": 5e-5}
FAST = dict(data="digits", model="resnet8", batch_size=64, eval_batch_size=512, epochs=3)
FUSABLE = sorted(n for n in METHODS.names() if not METHODS.get(n).unfusable)
MEMBER_HP = {
    "ce": [{}, {}],
    "ls": [{"smoothing": 0.1}, {"smoothing": 0.3}],
    "mse": [{"weight": 1.0}, {"weight": 2.0}],
    "kd": [{"T": 4.0}, {"T": 2.0, "w_ce": 0.5}],
    "dkd": [{"warmup": 2}, {"beta": 2.0, "warmup": 0, "T": 2.0}],
    "dist": [{}, {"beta": 2.0, "gamma": 0.5, "tau": 2.0}],
    "ttm": [{}, {"gamma": 0.3, "beta": 7.0}],
    "wttm": [{}, {"gamma": 0.5, "beta": 1.0}],
    "ipwd": [{}, {"T": 2.0, "weighting": "class", "w_cls": 0.5}],
    "pkt": [{}, {"beta": 3000.0, "w_ce": 0.5}],
    "rkd": [{}, {"w_dist": 5.0, "w_angle": 0.0}],
    "cc": [{}, {"beta": 0.2, "embed_dim": 32}],
}


def _first(data, n: int):
    tr = data.train
    return dataclasses.replace(data, train=Split(tr.x[:n].clone(), tr.y[:n].clone()))


@pytest.fixture(scope="module")
def data():
    return _first(load_data("digits", val_fraction=0.1, seed=0), 320)


def short(mode: str, data, cfgs=None):
    """The two-step comparison of a mode that is not exact: one batch an epoch, two epochs (the schedule still
    steps per epoch); swapping two members' hyperparameters moves the weights by ~1e-3 there."""
    return _first(data, 64), [c.replace(epochs=2) for c in cfgs] if cfgs is not None else None


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    make_teacher(path)
    return str(path)


def make_teacher(path) -> None:
    """An untrained resnet8 whose head is scaled up: its tempered softmax is far from flat, as a trained
    teacher's is (a flat one makes DIST's Pearson terms ill-conditioned and amplifies rounding)."""
    torch.manual_seed(7)
    model = create_model("resnet8", 10, 1)
    with torch.no_grad():
        model.fc.weight.mul_(20.0)
    save_model(path, model, "resnet8", 10, 1, {})


def member_configs(method: str, teacher: str, optimizer: str = "sgd") -> list[TrainConfig]:
    t = teacher if METHODS.get(method).needs_teacher else None
    lr = 0.01 if optimizer == "sgd" else 1e-3
    a, b = MEMBER_HP[method]
    return [
        TrainConfig.from_dict(dict(FAST, method=method, teacher=t, optimizer=optimizer, seed=1, lr=lr, hp=a,
                                   warmup_epochs=0.5)),
        TrainConfig.from_dict(dict(FAST, method=method, teacher=t, optimizer=optimizer, seed=2, lr=lr / 2,
                                   momentum=0.8, nesterov=True, weight_decay=1e-3, hp=b, schedule="step",
                                   milestones=[1], lr_decay=0.5)),
    ]  # fmt: skip


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


_LONE: dict = {}


def lone_run(cfg: TrainConfig, data) -> tuple[dict, list[dict], list]:
    """A lone run's final state dict, history and method modules' parameters (cached: deterministic)."""
    key = (repr(cfg.to_dict()), len(data.train.y))
    if key not in _LONE:
        lone = Trainer(cfg, data=data)
        hist = list(lone.run())
        _LONE[key] = ({k: v.clone() for k, v in lone.student.state_dict().items()}, hist,
                      [p.detach().clone() for p in lone.method_modules.parameters()])  # fmt: skip
    return _LONE[key]


def assert_member_equals_lone(bundle: Bundle, key, cfg: TrainConfig, data, atol: float | None = None) -> None:
    """Exact modes: within EXACT_RTOL (relative) of the lone run; others within ``atol`` (absolute)."""
    state, hist, modules = lone_run(cfg, data)
    m = bundle.sync_member(key)
    if bundle.exact and atol is None:
        assert max_rel(m.student.state_dict(), state) <= EXACT_RTOL
        for p, q in zip(modules, m.method_modules.parameters()):
            assert max_rel({"p": q.detach()}, {"p": p}) <= EXACT_RTOL
    else:
        atol = ATOL[bundle.mode] if atol is None else atol
        assert max_diff(state, m.student.state_dict()) <= atol
        for p, q in zip(modules, m.method_modules.parameters()):
            assert (p - q).abs().max().item() <= atol
    assert m.history[-1]["test_acc"] == pytest.approx(hist[-1]["test_acc"], abs=1e-9)
    assert m.history[-1]["train_loss"] == pytest.approx(hist[-1]["train_loss"], rel=1e-4)


@pytest.mark.parametrize("mode", ["grouped", "loop", "loop_cl", "vmap", "auto"])
@pytest.mark.parametrize("method", FUSABLE)
def test_member_ends_with_the_weights_of_a_lone_run(method, mode, data, teacher):
    """3 epochs of 5 batches: an exact mode's members end within EXACT_RTOL of their lone runs. loop and auto are
    exact everywhere; a mode whose probe finds it inexact here is compared over two steps instead."""
    cfgs = member_configs(method, teacher)
    bundle = Bundle(cfgs, data=data, mode=mode, allow_inexact=True)
    assert bundle.mode == mode or mode == "auto"  # resnet8 has a grouped form: no fallback to the loop
    if mode in ("loop", "auto"):
        assert bundle.exact and bundle.mode in ("loop", "loop_cl", "grouped")
    if not bundle.exact:
        assert mode in ("grouped", "vmap", "loop_cl")
        data, cfgs = short(mode, data, cfgs)
        bundle = Bundle(cfgs, data=data, mode=mode, allow_inexact=True)
    epochs = list(bundle.run())
    assert len(epochs) == cfgs[0].epochs and [m["member"] for m in epochs[-1]] == [0, 1]
    for k, cfg in enumerate(cfgs):
        assert_member_equals_lone(bundle, k, cfg, data)


def test_an_inexact_mode_fails_the_tolerance(data):
    """The tolerance has teeth: grouped, which rounds differently from the lone kernels (its probe says so),
    ends outside EXACT_RTOL after 3 epochs of 5 batches, where loop ends at 0.0."""
    cfg = TrainConfig.from_dict(dict(FAST, method="ce", seed=7, lr=0.05))
    state, _, _ = lone_run(cfg, data)
    grouped = Bundle([cfg, cfg.replace(seed=8, lr=0.02)], data=data, mode="grouped", allow_inexact=True)
    assert grouped.mode == "grouped" and not grouped.exact and grouped.mode_exact == {"grouped": False}
    list(grouped.run())
    assert max_rel(grouped.sync_member(0).student.state_dict(), state) > EXACT_RTOL
    assert grouped.result(0)["bundle_exact"] is False
    loop = Bundle([cfg, cfg.replace(seed=8, lr=0.02)], data=data, mode="loop")
    list(loop.run())
    assert max_rel(loop.sync_member(0).student.state_dict(), state) == 0.0


@pytest.mark.parametrize("mode", ["grouped", "loop", "loop_cl", "vmap"])
def test_adamw_members_equal_lone_runs(mode, data, teacher):
    cfgs = member_configs("kd", teacher, optimizer="adamw")
    bundle = Bundle(cfgs, data=data, mode=mode, allow_inexact=True)
    atol = None
    if not bundle.exact:
        data, cfgs = short(mode, data, cfgs)
        bundle = Bundle(cfgs, data=data, mode=mode, allow_inexact=True)
        atol = ADAMW_ATOL[mode]
    list(bundle.run())
    for k, cfg in enumerate(cfgs):
        assert_member_equals_lone(bundle, k, cfg, data, atol=atol)


def test_method_list_is_the_registry():
    """Every registered method is either tested for exactness here or refuses to fuse with a reason."""
    assert set(MEMBER_HP) == set(FUSABLE)
    assert METHODS.get("disk").unfusable


def test_teacher_forward_runs_once_per_batch(data, teacher):
    cfgs = member_configs("kd", teacher)
    bundle = Bundle(cfgs + [cfgs[0].replace(seed=9)], data=data)
    calls = []
    bundle.shared.teacher.register_forward_hook(lambda *a: calls.append(1))
    bundle.train_pass(0)
    assert len(calls) == len(bundle.shared.train_loader) == 5


def test_refusals_name_the_field(teacher):
    cfgs = member_configs("kd", teacher)
    with pytest.raises(ConfigError, match="batch_size"):
        Bundle([cfgs[0], cfgs[1].replace(batch_size=32)])
    with pytest.raises(ConfigError, match="optimizer"):
        Bundle([cfgs[0], cfgs[1].replace(optimizer="adamw")])
    with pytest.raises(ConfigError, match="method=disk cannot be fused"):
        from kdtune.engine.bundle import check_bundle

        check_bundle([TrainConfig.from_dict(dict(FAST, method="disk", teacher=teacher, init=teacher))])
    with pytest.raises(ConfigError, match="out="):
        Bundle([cfgs[0].replace(out="x"), cfgs[1].replace(out="x")])
    with pytest.raises(ConfigError, match="mode="):
        Bundle(cfgs, mode="fused")


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_drop_repacks_and_the_rest_stay_exact(mode, data, teacher):
    """grouped rebuilds its wide student for the K left (the probe runs again: the mode stays grouped)."""
    cfgs = member_configs("ipwd", teacher)
    cfgs = [cfgs[0], cfgs[0].replace(seed=5, lr=0.02), cfgs[1]]
    if mode == "grouped":
        data, cfgs = short(mode, data, cfgs)
    bundle = Bundle(cfgs, data=data, keys=["a", "b", "c"], mode=mode, allow_inexact=True)
    gen = bundle.run()
    first = next(gen)
    assert [m["member"] for m in first] == ["a", "b", "c"]
    dropped = bundle.drop("b")
    assert dropped.key == "b" and bundle.keys == ["a", "c"] and bundle.size == 2 and bundle.mode == mode
    assert all(v.shape[0] == 2 for v in bundle.params.values())
    rest = list(gen)
    assert [m["member"] for m in rest[0]] == ["a", "c"] and rest[0][0]["bundle_size"] == 2
    assert_member_equals_lone(bundle, "a", cfgs[0], data)
    assert_member_equals_lone(bundle, "c", cfgs[2], data)


def test_auto_keeps_the_fastest_exact_mode_and_touches_nothing(data, teacher, monkeypatch):
    """mode="auto" probes each candidate for exactness and times the exact ones on copies (the stacks, the BN
    statistics and the global RNG are as a loop bundle leaves them), keeps the fastest, says so in one line;
    its members equal lone runs over 3 epochs."""
    cfgs = member_configs("kd", teacher)
    lines: list[str] = []
    plain = Bundle(cfgs, data=data, mode="loop")
    rng = torch.get_rng_state()
    auto = Bundle(cfgs, data=data, log=lines.append)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe and timing batches come from a generator of their own
    assert auto.requested_mode == "auto" and set(auto.mode_exact) == {"grouped", "loop", "loop_cl"}
    assert auto.mode_exact["loop"] and not auto.mode_exact["grouped"]  # grouped rounds differently
    exact = {m for m, e in auto.mode_exact.items() if e}
    assert set(auto.mode_timings) == (exact if len(exact) > 1 else set())
    assert auto.exact and auto.mode in exact
    assert auto.mode == (min(auto.mode_timings, key=auto.mode_timings.get) if auto.mode_timings else "loop")
    assert max_diff(auto.params, plain.params) == 0.0 and max_diff(auto.buffers, plain.buffers) == 0.0
    said = [line for line in lines if line.startswith("bundle:")]
    assert len(said) == 1 and said[0].startswith(f"bundle: 2 x resnet8 run {auto.mode} (one student step: ")
    assert "grouped not exact here" in said[0]
    list(auto.run())
    for k, cfg in enumerate(cfgs):
        assert_member_equals_lone(auto, k, cfg, data)
    # the decision follows the clock among exact candidates, and never picks one whose probe is not exact
    real_build, real_probe = Bundle._build_forward, Bundle.probe_exact
    for fast in ("grouped", "loop", "loop_cl"):
        for grouped_exact in (False, True):
            forwards: dict = {}

            def build(self, mode, forwards=forwards):
                real_build(self, mode)
                forwards.setdefault(self.mode, self._forward)

            def probe(self, grouped_exact=grouped_exact):
                return (True, 0.0) if self.mode != "grouped" else (grouped_exact, 0.0 if grouped_exact else 1e-5)

            def clock(self, fwd, wide=None, forwards=forwards, fast=fast):
                return 0.01 if fwd is forwards.get(fast) else 0.05

            monkeypatch.setattr(Bundle, "_build_forward", build)
            monkeypatch.setattr(Bundle, "probe_exact", probe)
            monkeypatch.setattr(Bundle, "_step_seconds", clock)
            picked = Bundle(cfgs, data=data).mode
            monkeypatch.undo()
            assert picked == (fast if fast != "grouped" or grouped_exact else picked)
            assert picked != "grouped" or grouped_exact
    assert Bundle._build_forward is real_build and Bundle.probe_exact is real_probe


def test_the_probe_sees_a_difference_across_the_epoch_boundary(data, teacher, monkeypatch):
    """A mode that trains exactly but evaluates differently (here: an eval forward nudged by 1e-7) is found
    inexact: the probe's evaluation pass between its two steps is compared too."""
    cfgs = member_configs("kd", teacher)
    real_build = Bundle._build_forward

    def build(self, mode):
        real_build(self, mode)
        if mode == "loop_cl":
            ev = self._forward_eval
            self._forward_eval = lambda p, b, x: ev(p, b, x) * (1 + 1e-7)

    monkeypatch.setattr(Bundle, "_build_forward", build)
    bundle = Bundle(cfgs, data=data, mode="loop_cl", allow_inexact=True)
    assert not bundle.exact
    assert Bundle(cfgs, data=data, mode="loop").exact
    with pytest.raises(ConfigError) as e:  # asked for by name without allow_inexact: refused in one line
        Bundle(cfgs, data=data, mode="loop_cl")
    assert str(e.value).startswith("mode=loop_cl is not exact here") and "mode=auto" in str(e.value)


def test_auto_without_a_grouped_form_probes_the_loops_only(data, teacher, monkeypatch):
    import kdtune.engine.bundle as b

    monkeypatch.setattr(b, "widen", lambda model, k: "its head (Foo) has no grouped form")
    lines: list[str] = []
    bundle = Bundle(member_configs("kd", teacher), data=data, log=lines.append)
    assert set(bundle.mode_exact) == {"loop", "loop_cl"} and bundle.mode in bundle.mode_exact
    said = [line for line in lines if line.startswith("bundle:")]
    assert said[0] == "bundle: resnet8 runs its members one after another (mode loop): its head (Foo) has no grouped form"
    assert len(said) == 1 or said[1].startswith(f"bundle: 2 x resnet8 run {bundle.mode} (one student step: loop ")


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_bundle_checkpoint_resumes_exactly(mode, data, teacher):
    cfgs = member_configs("kd", teacher)
    full = Bundle(cfgs, data=data, mode=mode, allow_inexact=True)
    list(full.run())
    part = Bundle(cfgs, data=data, mode=mode, allow_inexact=True)
    next(part.run())
    state = part.state_dict()
    resumed = Bundle(cfgs, data=data, mode=mode, allow_inexact=True)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    list(resumed.run())
    for k in (0, 1):
        a = full.sync_member(k).student.state_dict()
        b = resumed.sync_member(k).student.state_dict()
        assert max_diff(a, b) == 0.0
        assert [h["test_acc"] for h in full.member(k).history] == [
            h["test_acc"] for h in resumed.member(k).history
        ]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_member_state_resumes_in_a_lone_trainer(optimizer, data, teacher):
    """A bundle member's state.pt is the lone Trainer's format: a lone run continues it."""
    cfgs = member_configs("kd", teacher, optimizer=optimizer)
    bundle = Bundle(cfgs, data=data, mode="loop")
    next(bundle.run())
    state = bundle.member_state(1)
    lone = Trainer(cfgs[1], data=data)
    lone.load_state_dict(state)
    list(lone.run())
    list(bundle.run())
    # and back: a lone run's state.pt loads into a fresh bundle member
    again = Bundle(cfgs, data=data, mode="loop")
    again.load_member_state(0, bundle.member_state(0))
    again.load_member_state(1, lone.state_dict())
    assert again.epoch == FAST["epochs"] and max_diff(again.member_state(1)["model"], lone.student.state_dict()) == 0.0
    assert max_diff(lone.student.state_dict(), bundle.sync_member(1).student.state_dict()) == 0.0


def test_train_bundle_writes_each_run_directory_and_resumes(tmp_path, data, teacher):
    cfgs = [c.replace(out=str(tmp_path / f"m{k}")) for k, c in enumerate(member_configs("kd", teacher))]
    gen = iter_train_bundle(cfgs, data=data, mode="loop")
    next(gen)
    gen.close()  # stopped after epoch 1: each member's state.pt holds epoch 1
    assert not (tmp_path / "m0" / "result.json").exists()
    results = train_bundle([c.replace(resume=True) for c in cfgs], data=data, mode="loop")
    assert [r["config"]["seed"] for r in results] == [1, 2]
    for k in (0, 1):
        out = tmp_path / f"m{k}"
        for f in ("config.yaml", "train.log", "state.pt", "best.pt", "final.pt", "result.json"):
            assert (out / f).is_file(), f
        on_disk = json.loads((out / "result.json").read_text())
        assert on_disk["epochs"] == FAST["epochs"] and on_disk["test_acc"] == results[k]["test_acc"]
        assert on_disk["bundle_size"] == 2 and len((out / "train.log").read_text().splitlines()) == FAST["epochs"]
        assert on_disk["bundle_mode"] == "loop"
    # a lone run of member 1's config ends where the resumed bundle member did
    lone = Trainer(cfgs[1].replace(out=None), data=data)
    list(lone.run())
    final = torch.load(tmp_path / "m1" / "final.pt", weights_only=True)["state_dict"]
    assert max_diff(lone.student.state_dict(), final) == 0.0
    # finished members are not trained again
    again = train_bundle([c.replace(resume=True) for c in cfgs], data=data)
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in results]


def test_kdtune_train_bundle_refuses_in_one_line():
    import kdtune

    with pytest.raises(ConfigError) as e:
        kdtune.train_bundle([dict(FAST, method="ce"), dict(FAST, method="ls")])
    assert "method" in str(e.value) and "\n" not in str(e.value)


def test_diverged_member_is_dropped(data):
    cfgs = [TrainConfig.from_dict(dict(FAST, method="ce", seed=1, lr=0.01)),
            TrainConfig.from_dict(dict(FAST, method="ce", seed=2, lr=1e6, momentum=0.0))]  # fmt: skip
    results = train_bundle(cfgs, data=data)
    assert results[1]["status"] == "diverged" and "lr" in results[1]["error"]
    assert results[0]["epochs"] == FAST["epochs"] and results[0]["test_acc"] is not None


def test_bundle_module_is_free_of_ray_and_mlflow():
    import kdtune.engine.bundle as b

    src = Path(b.__file__).read_text()
    assert "import ray" not in src and "mlflow" not in src


def test_bench_fuse_rows_structure(tmp_path, capsys):
    """`kdtune bench --fuse` adds one row per K (K = 1 added) with member and total images/s; no timing asserted."""
    from kdtune.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--teacher", "resnet8", "--student", "resnet8", "--batch", "4", "--steps", "1", "--warmup", "0",
            "--repeats", "1", "--only", "kdtune", "--fuse", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())[0]["fused"]
    assert [r["fuse"] for r in rows] == [1, 2] and {r["mode"] for r in rows} <= {"grouped", "loop", "loop_cl"}
    printed = capsys.readouterr().out.splitlines()  # the printed table: a header, a rule, one line per K
    head = next(i for i, ln in enumerate(printed) if "member img/s" in ln)
    assert set(printed[head + 1].strip()) == {"-", " "}
    assert [ln.split()[:2] for ln in printed[head + 2 : head + 4]] == [["1", rows[0]["mode"]], ["2", rows[1]["mode"]]]
    for r in rows:
        assert r["member_images_per_s"] > 0
        assert r["total_images_per_s"] == pytest.approx(r["fuse"] * r["member_images_per_s"])
    assert rows[0]["ratio_to_1"] == 1.0
    assert rows[1]["ratio_to_1"] == pytest.approx(
        rows[1]["total_images_per_s"] / rows[0]["total_images_per_s"]
    )
    assert main(["bench", "--fuse", "0", "--steps", "1"]) == 2  # a one-line error, no traceback
    assert main(argv[:-2] + ["--fuse-mode", "loop"]) == 0 and "loop" in capsys.readouterr().out


def test_bench_exactness_prints_each_mode_against_the_lone_run(tmp_path, capsys):
    """`kdtune bench --exactness`: a row per (method, epochs, mode) with the ruler (lr x (1 + 1e-7)) first; the
    loop and what auto ran end where the lone run does, grouped's probe says it is not exact."""
    from kdtune.cli import main

    out = tmp_path / "exact.json"
    assert main(["bench", "--exactness", "ce", "--exact-epochs", "1", "--json", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["lr+1e-7", "loop", "loop_cl", "grouped", "vmap", "auto"]
    assert rows["lr+1e-7"]["exact"] is None and rows["lr+1e-7"]["max_rel"] > 0.0
    assert rows["loop"]["exact"] and rows["loop"]["max_rel"] == 0.0
    assert rows["auto"]["exact"] and rows["auto"]["ran"] in ("loop", "loop_cl") and rows["auto"]["max_rel"] <= EXACT_RTOL
    assert rows["grouped"]["exact"] is False and rows["grouped"]["max_rel"] > EXACT_RTOL
    printed = capsys.readouterr().out
    assert "ce 1 epochs grouped not exact: " in printed and "(not exact)" in printed.splitlines()[-1]
    assert "performance drop" not in printed
    assert main(["bench", "--exactness", "ce", "--exact-epochs", "0"]) == 2


def test_a_bundle_of_vector_data_probes_and_trains_exactly():
    """The exactness probe's inputs take the data's shape: the toys are vectors, not images (a fused sweep on
    disk-gaussians failed in the probe, found while writing tests/data/legacy-be29ea7.tar.gz)."""
    cfgs = [TrainConfig.from_dict(dict(data="disk-gaussians", model="toy_mlp_student", method="ce", epochs=2, lr=lr,
                                       seed=0, device="cpu", batch_size=64)) for lr in (0.05, 0.1)]  # fmt: skip
    bundle = Bundle(cfgs, mode="auto")
    assert len(list(bundle.run())) == 2 and bundle.exact
    lone = Trainer(cfgs[1])
    list(lone.run())
    assert max_rel(bundle.sync_member(1).student.state_dict(), lone.student.state_dict()) <= EXACT_RTOL
