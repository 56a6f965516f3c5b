"""The paths every GPU user takes, run on the CPU through `kdtune train`: bf16 autocast (KD and DKD, against
the same runs in fp32) and torch.compile; and the documented switch words (`amp=off`), which YAML reads as
booleans, from the command line, a --config file and a sweep spec.

The runs are subprocesses of the installed console script, on digits (embedded), forced to device=cpu.
Measured on a shared 2-core machine (OMP_NUM_THREADS=1): the teacher fixture 5-7 s, each 2-epoch KD/DKD run
4-9 s (a bf16-vs-fp32 test 11-16 s), the compile test 25 s with a cold inductor cache (its compile=true run 22 s)
and 13 s once the cache (/tmp/torchinductor_$USER) holds its kernels: not marked slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdtune.config import AMP_MODES, TrainConfig, read_word, word_booleans
from kdtune.errors import ConfigError

CPU = ("data=digits", "model=resnet8", "device=cpu")


def kdtune_train(*words: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``kdtune train <words> --no-progress`` through the installed console script (its module as a fallback)."""
    script = Path(sys.executable).with_name("kdtune")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kdtune"]
    p = subprocess.run([*cmd, "train", *words, "--no-progress"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip
    assert p.returncode == 0, (words, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    return p


def weights(run: Path) -> torch.Tensor:
    sd = torch.load(run / "final.pt", map_location="cpu", weights_only=True)["state_dict"]
    return torch.cat([v.double().flatten() for v in sd.values() if v.is_floating_point()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


# ------------------------------------------------------------------------------------- switch words
@pytest.mark.parametrize("word", ["off", "OFF", "Off", "no", "false", "'off'"])
def test_amp_off_is_read_from_the_words_yaml_makes_booleans(word):
    """`off` (and YAML's other spellings of False, which cannot be told from it) is amp's "off"."""
    assert TrainConfig.from_args([f"amp={word}"]).amp == "off"


@pytest.mark.parametrize("word", ["on", "yes", "true"])
def test_amp_on_is_refused_naming_the_choices(word):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_args([f"amp={word}"])
    assert str(e.value) == "amp=on/yes/true is not valid; choose one of auto, bf16, off"


def test_other_values_keep_their_refusal_and_bool_fields_are_untouched():
    with pytest.raises(ConfigError, match=r"^amp='bf1' is not valid \(did you mean 'bf16'\?\); choose one of"):
        TrainConfig.from_args(["amp=bf1"])
    with pytest.raises(ConfigError, match="^amp='no' is not valid"):  # a quoted 'no' is a string, not a switch
        TrainConfig.from_args(["amp='no'"])
    with pytest.raises(ConfigError, match="^optimizer=off/no/false is not valid; choose one of sgd, adamw"):
        TrainConfig.from_args(["optimizer=off"])  # no "off" among its words: refused as written
    assert TrainConfig.from_args(["amp=bf16"]).amp == "bf16" and TrainConfig.from_args([]).amp == "auto"
    for words, want in ((["compile=true"], True), (["compile=on"], True), (["compile=off"], False), ([], False)):
        assert TrainConfig.from_args(words).compile is want, words


def test_word_switch_is_keyed_on_the_choices():
    """What a future `teacher_store: auto | on | off` gets without code of its own."""
    store = ("auto", "on", "off")
    assert (read_word(True, store), read_word(False, store), read_word("auto", store)) == ("on", "off", "auto")
    assert read_word(True, AMP_MODES) is True and read_word(False, ("sgd", "adamw")) is False
    assert word_booleans(store) == (False, True) and word_booleans(AMP_MODES) == (False,)
    assert word_booleans(("sgd", "adamw")) == ()


def test_amp_off_from_a_config_file_and_a_sweep_spec(tmp_path):
    from kdtune.spec import load_spec

    (tmp_path / "trial.yaml").write_text("amp: off\ncompile: no\n")
    cfg = TrainConfig.from_args(["epochs=2"], tmp_path / "trial.yaml")
    assert (cfg.amp, cfg.compile) == ("off", False)
    assert yaml.safe_load(cfg.to_yaml())["amp"] == "off"  # config.yaml quotes it: it reads back as the word
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: words\ndata: digits\nstudents: [resnet8]\nmethods: [ce]\nbudget: {trials: 1, epochs: 1}\n"
        f"train: {{device: cpu, amp: off}}\nstorage: {tmp_path / 'runs'}\n"
    )
    s = load_spec(spec)  # builds each group's TrainConfig: refused here if amp: off were
    assert TrainConfig.from_dict(s.trial_base("resnet8", "ce")).amp == "off"


# ------------------------------------------------------------------------------------- bf16 autocast
@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A resnet8 trained 3 epochs (~94% test accuracy), so that the 2-epoch students reach ~80%."""
    out = tmp_path_factory.mktemp("cpu-paths") / "teacher"
    kdtune_train(*CPU, "method=ce", "epochs=3", "lr=0.1", f"out={out}", "--quiet")
    return out


def test_bf16_autocast_is_active_on_the_cpu():
    """amp=bf16 on the CPU runs the student's forward in bfloat16 (amp=auto on the CPU stays in fp32)."""
    from kdtune.engine import Trainer

    trainer = Trainer(TrainConfig.from_args([*CPU, "amp=bf16", "epochs=1"]))
    assert trainer.device.type == "cpu" and trainer.amp_dtype == torch.bfloat16
    x, _ = next(iter(trainer.train_loader.epoch(0)))
    with trainer.autocast():
        assert trainer.student(x).dtype == torch.bfloat16
    assert Trainer(TrainConfig.from_args([*CPU, "epochs=1"])).amp_dtype is None


# fp32 vs bf16, 2 epochs on digits with the teacher above, measured over seeds 0-7 (KD and DKD: 16 pairs):
#   |test accuracy difference|    0 to 2.2 points (8 of 360 test images; median 0.8), while fp32 runs of
#                                 different seeds spread over 67-83%
#   test loss, relative           0.0% to 4.6%
#   last epoch's train loss, rel  0.1% to 4.8%
#   student weights, ||b-f||/||f|| 0.047 to 0.085
# and two fp32 runs are bit for bit equal (so bf16 differing from fp32 shows autocast ran). The tolerances
# are about twice the largest difference measured:
ACC_POINTS = 5.0
LOSS_REL = 0.10
WEIGHTS_REL = 0.2


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_bf16_run_matches_fp32(tmp_path, teacher, method):
    runs = {}
    for amp in ("off", "bf16"):
        out = tmp_path / amp
        t0 = time.perf_counter()
        kdtune_train(*CPU, f"method={method}", f"teacher={teacher}", "epochs=2", "seed=0", f"amp={amp}", f"out={out}")
        runs[amp] = result(out)
        print(f"{method} amp={amp}: {time.perf_counter() - t0:.1f}s")
        assert runs[amp]["config"]["amp"] == amp and runs[amp]["environment"]["device"] == "cpu"
        assert yaml.safe_load((out / "config.yaml").read_text())["amp"] == amp
        for m in runs[amp]["history"]:
            losses = {k: v for k, v in m.items() if k.startswith("loss_") or k in ("train_loss", "test_loss")}
            assert len(losses) >= 4 and all(math.isfinite(v) for v in losses.values()), (amp, m["epoch"], losses)
    f, b = runs["off"], runs["bf16"]
    wf, wb = weights(tmp_path / "off"), weights(tmp_path / "bf16")
    assert not torch.equal(wf, wb), "amp=bf16 trained exactly as fp32: autocast did not run"
    assert abs(b["test_acc"] - f["test_acc"]) <= ACC_POINTS, (f["test_acc"], b["test_acc"])
    assert abs(b["test_loss"] - f["test_loss"]) <= LOSS_REL * f["test_loss"], (f["test_loss"], b["test_loss"])
    fl, bl = f["history"][-1]["train_loss"], b["history"][-1]["train_loss"]
    assert abs(bl - fl) <= LOSS_REL * fl, (fl, bl)
    assert rel(wb, wf) <= WEIGHTS_REL, rel(wb, wf)
    assert b["test_acc"] > 50 and f["test_acc"] > 50  # both learned (seed 0: ~83% and ~82%)


# ------------------------------------------------------------------------------------- torch.compile
def test_compile_run_matches_eager(tmp_path):
    """compile=true, one epoch through `kdtune train`: inductor compiles the student and the run ends where the
    eager one does (measured: weights 2e-7 apart relatively, max 1e-6; the same losses to 1e-6)."""
    t0 = time.perf_counter()
    p = kdtune_train(*CPU, "method=ce", "epochs=1", "compile=true", f"out={tmp_path / 'compiled'}",
                     env={"TORCH_LOGS": "dynamo"})  # fmt: skip
    wall = time.perf_counter() - t0
    assert "done compiler function inductor" in p.stderr, p.stderr[-2000:]
    kdtune_train(*CPU, "method=ce", "epochs=1", f"out={tmp_path / 'eager'}")
    c, e = result(tmp_path / "compiled"), result(tmp_path / "eager")
    assert c["config"]["compile"] is True and e["config"]["compile"] is False
    assert math.isclose(c["history"][-1]["train_loss"], e["history"][-1]["train_loss"], rel_tol=1e-4)
    assert math.isclose(c["test_loss"], e["test_loss"], rel_tol=1e-4)
    assert rel(weights(tmp_path / "compiled"), weights(tmp_path / "eager")) <= 1e-4
    print(f"compile=true run: {wall:.1f}s")
