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
from kdtune.errors import ConfigError
from kdtune.losses import METHODS
from kdtune.models import create_model
from kdtune.models.checkpoint import save_model

# 192 training images at batch 64: 3 steps an epoch, so a test trains in about a second. mode="loop" runs each
# member's slice with the lone run's kernels and optimiser operations: bit for bit equal on the CPU. mode="vmap"
# runs batched kernels that round differently; training at initialisation is chaotic (a 1e-7 change of the
# weights grows to 1e-3 within an epoch at lr 0.05), so the comparison uses few steps and modest learning
# rates, where that rounding stays below 1e-5.
ATOL = {"loop": 0.0, "vmap": 1e-5, "grouped": 1e-5, "loop_cl": 1e-5}
# AdamW's first steps are about lr * sign(g) / (1 + eps / |g|): where a gradient is a few eps, a relative
# rounding of 1e-6 moves the step by a larger share. grouped's two AdamW steps at lr 1e-3 end within 1.6e-5 of the
# lone run's (1 % of one step); a swapped member (another seed, half the lr) differs by more than 1e-2.
ADAMW_ATOL = {"grouped": 5e-5, "loop_cl": 5e-5}
FAST = dict(data="digits", model="resnet8", batch_size=64, eval_batch_size=512, epochs=2)
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
}


@pytest.fixture(scope="module")
def data():
    d = load_data("digits", val_fraction=0.1, seed=0)
    tr = d.train
    return dataclasses.replace(d, train=Split(tr.x[:192].clone(), tr.y[:192].clone()))


def data_for(mode: str, data):
    """mode="grouped" (and "loop_cl") rounds differently again (mkldnn's channels-last kernels; 1e-6 relative on a
    step's gradients): over 6 steps DIST's and TTM's members drift 1e-2 from their lone runs, a drift of
    rounding, not of arithmetic (one step agrees to 2e-6). Its comparison uses one batch an epoch, two
    steps in all, the schedule still stepping per epoch; swapping two members' hyperparameters moves the
    weights by ~1e-3 there. mode="vmap" too: on one AMD EPYC its batched kernels left TTM's member 5.6e-4
    from its lone run after 6 steps (within 1e-5 on the machine the tolerance was first set on)."""
    if mode not in ("grouped", "loop_cl", "vmap"):
        return data
    return dataclasses.replace(data, train=Split(data.train.x[:64].clone(), data.train.y[:64].clone()))


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


def assert_member_equals_lone(bundle: Bundle, key, cfg: TrainConfig, data, atol: float | None = None) -> Trainer:
    atol = ATOL[bundle.mode] if atol is None else atol
    lone = Trainer(cfg, data=data)
    hist = list(lone.run())
    m = bundle.sync_member(key)
    assert max_diff(lone.student.state_dict(), m.student.state_dict()) <= atol
    for p, q in zip(lone.method_modules.parameters(), m.method_modules.parameters()):
        assert (p - q).abs().max().item() <= atol
    assert m.history[-1]["test_acc"] == pytest.approx(hist[-1]["test_acc"], abs=1e-9)
    assert m.history[-1]["train_loss"] == pytest.approx(hist[-1]["train_loss"], rel=1e-4)
    return lone


@pytest.mark.parametrize("mode", ["grouped", "loop", "loop_cl", "vmap"])
@pytest.mark.parametrize("method", FUSABLE)
def test_member_ends_with_the_weights_of_a_lone_run(method, mode, data, teacher):
    cfgs = member_configs(method, teacher)
    data = data_for(mode, data)
    bundle = Bundle(cfgs, data=data, mode=mode)
    assert bundle.mode == mode  # resnet8 has a grouped form: no fallback to the loop
    epochs = list(bundle.run())
    assert len(epochs) == 2 and [m["member"] for m in epochs[-1]] == [0, 1]
    for k, cfg in enumerate(cfgs):
        assert_member_equals_lone(bundle, k, cfg, data)


@pytest.mark.parametrize("mode", ["grouped", "loop", "loop_cl", "vmap"])
def test_adamw_members_equal_lone_runs(mode, data, teacher):
    cfgs = member_configs("kd", teacher, optimizer="adamw")
    data = data_for(mode, data)
    bundle = Bundle(cfgs, data=data, mode=mode)
    list(bundle.run())
    for k, cfg in enumerate(cfgs):
        assert_member_equals_lone(bundle, k, cfg, data, atol=ADAMW_ATOL.get(mode))


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
    assert len(calls) == len(bundle.shared.train_loader) == 3


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
    data = data_for(mode, data)
    bundle = Bundle(cfgs, data=data, keys=["a", "b", "c"], mode=mode)
    gen = bundle.run()
    first = next(gen)
    assert [m["member"] for m in first] == ["a", "b", "c"]
    dropped = bundle.drop("b")
    assert dropped.key == "b" and bundle.keys == ["a", "c"] and bundle.size == 2 and bundle.mode == mode
    assert all(v.shape[0] == 2 for v in bundle.params.values())
    second = next(gen)
    assert [m["member"] for m in second] == ["a", "c"] and second[0]["bundle_size"] == 2
    assert_member_equals_lone(bundle, "a", cfgs[0], data)
    assert_member_equals_lone(bundle, "c", cfgs[2], data)


def test_auto_keeps_the_faster_mode_and_touches_nothing(data, teacher, monkeypatch):
    """mode="auto" times the candidates on copies (the stacks, the BN statistics and the global RNG are as a
    loop bundle leaves them), keeps the faster, says so in one line; its members equal lone runs."""
    cfgs = member_configs("kd", teacher)
    data = data_for("grouped", data)
    lines: list[str] = []
    plain = Bundle(cfgs, data=data, mode="loop")
    rng = torch.get_rng_state()
    auto = Bundle(cfgs, data=data, log=lines.append)
    assert torch.equal(torch.get_rng_state(), rng)  # the timing batch comes from a generator of its own
    assert auto.requested_mode == "auto" and set(auto.mode_timings) == {"grouped", "loop", "loop_cl"}
    assert auto.mode == min(auto.mode_timings, key=auto.mode_timings.get)
    assert max_diff(auto.params, plain.params) == 0.0 and max_diff(auto.buffers, plain.buffers) == 0.0
    said = [line for line in lines if line.startswith("bundle:")]
    steps = ", ".join(f"{m} {1e3 * auto.mode_timings[m]:.1f} ms" for m in ("grouped", "loop", "loop_cl"))
    assert said == [f"bundle: 2 x resnet8 run {auto.mode} (one student step: {steps})"]
    list(auto.run())
    for k, cfg in enumerate(cfgs):
        assert_member_equals_lone(auto, k, cfg, data)
    # the decision follows the clock: each candidate made the faster in turn
    real_build = Bundle._build_forward
    for fast in ("grouped", "loop", "loop_cl"):
        forwards: dict = {}

        def build(self, mode, forwards=forwards):
            real_build(self, mode)
            forwards.setdefault(self.mode, self._forward)

        def clock(self, fwd, forwards=forwards, fast=fast):
            return 0.01 if fwd is forwards.get(fast) else 0.05

        monkeypatch.setattr(Bundle, "_build_forward", build)
        monkeypatch.setattr(Bundle, "_step_seconds", clock)
        assert Bundle(cfgs, data=data).mode == fast
        monkeypatch.undo()


def test_auto_without_a_grouped_form_times_the_loops_only(data, teacher, monkeypatch):
    import kdtune.engine.bundle as b

    monkeypatch.setattr(b, "widen", lambda model, k: "its head (Foo) has no grouped form")
    lines: list[str] = []
    bundle = Bundle(member_configs("kd", teacher), data=data, log=lines.append)
    assert set(bundle.mode_timings) == {"loop", "loop_cl"} and bundle.mode in bundle.mode_timings
    said = [line for line in lines if line.startswith("bundle:")]
    assert said[0] == "bundle: resnet8 runs its members one after another (mode loop): its head (Foo) has no grouped form"
    assert said[1].startswith(f"bundle: 2 x resnet8 run {bundle.mode} (one student step: loop ") and len(said) == 2


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_bundle_checkpoint_resumes_exactly(mode, data, teacher):
    cfgs = member_configs("kd", teacher)
    full = Bundle(cfgs, data=data, mode=mode)
    list(full.run())
    part = Bundle(cfgs, data=data, mode=mode)
    next(part.run())
    state = part.state_dict()
    resumed = Bundle(cfgs, data=data, mode=mode)
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
    assert again.epoch == 2 and max_diff(again.member_state(1)["model"], lone.student.state_dict()) == 0.0
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
        assert on_disk["epochs"] == 2 and on_disk["test_acc"] == results[k]["test_acc"]
        assert on_disk["bundle_size"] == 2 and len((out / "train.log").read_text().splitlines()) == 2
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
    assert results[0]["epochs"] == 2 and results[0]["test_acc"] is not None


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
