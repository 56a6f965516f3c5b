"""Stages are built once across drivers: two processes that need the same stage at the same moment train it
once (``storage.build_once`` under ``ensure_stage``), and both get the same verified folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

CFG = {"data": "digits", "model": "resnet8", "method": "ce", "epochs": 1, "device": "cpu", "batch_size": 256,
       "seed": 5}  # fmt: skip

_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from kdtune.tune.stages import ensure_stage, train_stage
    root, counter, go = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    cfg = json.loads(sys.argv[4])

    def runner(cfg_dict, out, threads):
        with open(counter, "a") as f:
            f.write("trained\\n")
        return train_stage(cfg_dict, out, threads)

    while time.time() < go:
        time.sleep(0.005)
    st = ensure_stage("ce-resnet8", cfg, root, resources={"num_cpus": 1}, log=lambda s: None, runner=runner)
    print(json.dumps({"dir": str(st.dir), "cached": st.cached, "train_error": st.result.get("train_error")}))
    """
)


def test_two_drivers_racing_on_one_stage_train_it_once(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    counter = tmp_path / "trainings.txt"
    go = time.time() + 8.0  # both have imported torch by then, even on a busy machine
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "stages"), str(counter), str(go),
                          json.dumps(CFG)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert counter.read_text().count("trained") == 1
    assert outs[0]["dir"] == outs[1]["dir"]
    assert sorted(o["cached"] for o in outs) == [False, True]  # one built it, the other waited for it
    assert outs[0]["train_error"] is not None and outs[0]["train_error"] == outs[1]["train_error"]
    from kdtune.storage import verify_manifest

    verify_manifest(outs[0]["dir"])  # published whole, with its checksums


def test_a_cached_stage_carries_what_trials_need(tmp_path):
    from kdtune.tune.stages import ensure_stage, train_stage

    st = ensure_stage("teacher", CFG, tmp_path / "stages", log=lambda s: None, runner=train_stage)
    info = st.teacher_info()
    assert info["arch"] == "resnet8" and info["test_acc"] == st.result["test_acc"]
    assert st.init_info()["train_error"] == st.result["train_error"]
    again = ensure_stage("teacher", CFG, tmp_path / "stages", log=lambda s: None,
                         runner=lambda *a: (_ for _ in ()).throw(AssertionError("trained again")))  # fmt: skip
    assert again.cached and again.dir == st.dir


def test_trainer_takes_measurements_made_before(tmp_path):
    """A trial given its stage's figures does not evaluate the teacher or the warm start again."""
    import kdtune
    from kdtune.config import TrainConfig
    from kdtune.engine.trainer import Trainer

    kdtune.train({**CFG, "out": str(tmp_path / "t")})
    cfg = TrainConfig.from_dict({**CFG, "method": "kd", "teacher": str(tmp_path / "t" / "final.pt"),
                                 "init": str(tmp_path / "t" / "final.pt")})  # fmt: skip
    calls = []
    orig = Trainer.evaluate
    Trainer.evaluate = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        tr = Trainer(cfg, teacher_info={"arch": "resnet8", "val_acc": 1.0, "test_acc": 2.0},
                     init_info={"train_error": 0.25, "val_error": 0.3})  # fmt: skip
        assert not calls
        assert tr.teacher_info["test_acc"] == 2.0 and tr.init_info["train_error"] == 0.25
        Trainer(cfg)
        assert len(calls) >= 3  # without them: teacher test (+ val) and the warm start's train error
    finally:
        Trainer.evaluate = orig
