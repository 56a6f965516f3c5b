"""Teacher diagnostics: calibration and agreement against float64 hand computations; a teacher stage records
its calibration and writes ``val_logits.pt``; a KD trial logs ``val_agree``/``val_kl_teacher`` every epoch from
those logits without running the teacher over the validation split; bundles and resumed runs log the same."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from kdtune.config import TrainConfig
from kdtune.engine import diagnostics as dg

STAGE = {"data": "digits", "model": "resnet8", "method": "ce", "epochs": 1, "device": "cpu", "batch_size": 128,
         "eval_batch_size": 256, "val_fraction": 0.2, "seed": 5}  # fmt: skip


def _probs_logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


# ---------------------------------------------------------------------------------------------- the metrics


def test_calibration_on_a_crafted_example_with_known_bins():
    p = [[0.9, 0.05, 0.05], [0.04, 0.04, 0.92], [0.5, 0.3, 0.2], [0.2, 0.35, 0.45]]
    y = torch.tensor([0, 1, 0, 2])
    c = dg.calibration(_probs_logits(p) + 3.0, y)  # a shift changes no probability
    # bins (of 15): 0.9 and 0.92 in (13/15, 14/15] (acc 1/2, conf 0.91), 0.5 in (7/15, 8/15], 0.45 in (6/15, 7/15]
    ece = 2 / 4 * abs(0.5 - 0.91) + 1 / 4 * abs(1 - 0.5) + 1 / 4 * abs(1 - 0.45)
    assert c["ece"] == pytest.approx(ece, abs=1e-12) and ece == pytest.approx(0.4675)
    assert c["acc"] == 75.0
    nll = -(math.log(0.9) + math.log(0.04) + math.log(0.5) + math.log(0.45)) / 4
    assert c["nll"] == pytest.approx(nll, abs=1e-12)
    ent = sum(-sum(q * math.log(q) for q in row) for row in p) / 4
    assert c["entropy"] == pytest.approx(ent, abs=1e-12)


def test_ece_equals_a_loop_over_the_bins_of_guo_et_al():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (500,), generator=g)
    p = z.softmax(1)
    conf, pred = p.max(1)
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)
    want = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            acc = (pred[inb] == y[inb]).double().mean().item()
            want += inb.double().mean().item() * abs(acc - conf[inb].mean().item())
    # from float32 logits: they differ by rounding only
    assert dg.calibration(z.float(), y)["ece"] == pytest.approx(want, abs=1e-6)


def test_uniform_logits_and_agreement():
    c = dg.calibration(torch.zeros(4, 10), torch.tensor([0, 1, 2, 3]))
    assert c["entropy"] == pytest.approx(math.log(10), abs=1e-12) and c["nll"] == pytest.approx(math.log(10))
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    same = dg.agreement(z, z.clone())
    assert same["agree"] == 100.0 and abs(same["kl"]) < 1e-12
    t = _probs_logits([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    s = _probs_logits([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]) - 1.0
    a = dg.agreement(t.float(), s.float())
    kl = (0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.25) + 0.1 * math.log(0.1 / 0.25)
          + 0.1 * math.log(0.1 / 0.2) + 0.6 * math.log(0.6 / 0.2) + 0.3 * math.log(0.3 / 0.6)) / 2  # fmt: skip
    assert a["agree"] == 50.0 and a["kl"] == pytest.approx(kl, abs=1e-6)
    assert dg.epoch_agreement(t, s) == {"val_agree": 50.0, "val_kl_teacher": pytest.approx(kl, abs=1e-12)}
    assert dg.epoch_agreement(None, s) is None
    with pytest.raises(ValueError):
        dg.agreement(t, s[:1])


# ---------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    from kdtune.tune.stages import ensure_stage, train_stage

    root = tmp_path_factory.mktemp("stages")
    return ensure_stage("teacher", STAGE, root, log=lambda s: None, runner=train_stage)


def _direct_logits(model_path, cfg: TrainConfig):
    """The model's own forward over the validation split (one batch, normalised by hand), float32."""
    from kdtune.data import load_data
    from kdtune.models.checkpoint import load_model

    d = load_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.data_seed)
    model, _ = load_model(str(model_path), map_location="cpu")
    mean, std = torch.tensor(d.mean).view(1, -1, 1, 1), torch.tensor(d.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.eval()((d.val.x.float() / 255 - mean) / std), d.val.y


def test_a_teacher_stage_records_its_calibration_and_val_logits(stage):
    from kdtune.storage import MANIFEST, verify_manifest
    from kdtune.tune.stages import DIAGNOSTIC_KEYS

    assert DIAGNOSTIC_KEYS == dg.STAGE_KEYS  # stages.py names them without importing torch
    r = stage.result
    for k in dg.STAGE_KEYS:
        assert isinstance(r[k], float) and math.isfinite(r[k]) and k in stage.summary(), k
    assert 0 <= r["val_ece"] <= 1 and 0 <= r["val_entropy"] <= math.log(10)
    path = stage.dir / dg.VAL_LOGITS
    verify_manifest(stage.dir)
    assert dg.VAL_LOGITS in json.loads((stage.dir / MANIFEST).read_text())["files"]  # published with it
    saved = torch.load(path, weights_only=True)
    z, y = _direct_logits(stage.model_path, TrainConfig.from_dict(STAGE))
    assert saved["logits"].dtype == torch.float32 and saved["logits"].shape == (len(y), 10)
    assert torch.equal(saved["labels"], y)
    assert torch.allclose(saved["logits"], z, atol=1e-4, rtol=1e-5)
    c = dg.calibration(saved["logits"], saved["labels"])
    assert c["acc"] == pytest.approx(r["val_acc"]) and c["nll"] == pytest.approx(r["val_nll"])
    from kdtune.tracking.client import flatten, metric_entities

    logged = {m.key for m in metric_entities(flatten(dict(r)), 1)}  # what SweepTracker.log_stage logs
    assert set(dg.STAGE_KEYS) <= logged


def test_the_heads_stage_writes_the_teachers_val_logits(stage, tmp_path):
    from kdtune.tune.stages import ensure_heads_stage, train_stage

    heads = ensure_heads_stage(stage, tmp_path, epochs=1, overrides={"batch_size": 256}, log=lambda s: None,
                               runner=train_stage)  # fmt: skip
    mine, theirs = (torch.load(d / dg.VAL_LOGITS, weights_only=True) for d in (heads.dir, stage.dir))
    assert torch.allclose(mine["logits"], theirs["logits"], atol=1e-5)
    assert mine["teacher_sha"] == theirs["teacher_sha"]  # the teacher's weights, unchanged by its heads
    assert heads.result["val_nll"] == pytest.approx(stage.result["val_nll"], abs=1e-5)
    assert heads.result["test_ece"] == pytest.approx(stage.result["test_ece"], abs=1e-5)


# ---------------------------------------------------------------------------------------------- the trials


def _kd(teacher: str, **kw) -> TrainConfig:
    return TrainConfig.from_dict({**STAGE, "method": "kd", "teacher": teacher, "epochs": 2, "seed": 1, **kw})


def _watch(monkeypatch):
    """Every Trainer.evaluate of a teacher, and every forward of a teacher over a validation batch."""
    from kdtune.engine.trainer import Trainer

    seen = []
    orig = Trainer.evaluate

    def evaluate(self, model, loader, keep_logits=False):
        if model is self.teacher:
            seen.append(("evaluate", loader is self.val_loader))
        return orig(self, model, loader, keep_logits)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return seen


def test_a_kd_trial_logs_agreement_every_epoch_without_a_teacher_pass(stage, monkeypatch):
    from kdtune.engine.trainer import Trainer

    seen = _watch(monkeypatch)
    tr = Trainer(_kd(str(stage.model_path)), teacher_info=stage.teacher_info())
    sizes = []
    tr.teacher.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    hist = list(tr.run())
    assert not seen  # the stage's file: no teacher pass over the validation split, at the start or per epoch
    assert len(sizes) == 2 * len(tr.train_loader) and set(sizes) == {tr.cfg.batch_size}  # training batches
    assert all(isinstance(h["val_agree"], float) and isinstance(h["val_kl_teacher"], float) for h in hist)
    saved = torch.load(stage.dir / dg.VAL_LOGITS, weights_only=True)["logits"]
    assert torch.equal(tr.teacher_val, saved)
    z, _ = _direct_logits(stage.model_path, tr.cfg)
    s = tr.evaluate(tr.student, tr.val_loader, keep_logits=True)["logits"]
    want = dg.agreement(z, s)
    assert hist[-1]["val_agree"] == pytest.approx(want["agree"], abs=1e-9)
    assert hist[-1]["val_kl_teacher"] == pytest.approx(want["kl"], abs=1e-5)
    from kdtune.tracking.client import metric_entities
    from kdtune.tune.record import numeric

    logged = {m.key for m in metric_entities(numeric(hist[-1]), 2)}  # what TrialRecord.epoch logs
    assert {"val_agree", "val_kl_teacher"} <= logged


def test_a_checkpoint_teacher_or_another_split_costs_one_pass(stage, tmp_path, monkeypatch):
    import shutil

    from kdtune.engine.trainer import Trainer

    plain = tmp_path / "t.pt"
    shutil.copy(stage.model_path, plain)  # no val_logits.pt beside it
    seen = _watch(monkeypatch)
    tr = Trainer(_kd(str(plain)), teacher_info=stage.teacher_info())
    assert not seen  # a trial given the teacher's figures evaluates nothing when it is built (test_stages)
    h = list(tr.run())
    assert seen == [("evaluate", True)] and "val_agree" in h[0] and "val_agree" in h[1]  # once, at epoch 1
    ref = torch.load(stage.dir / dg.VAL_LOGITS, weights_only=True)["logits"]
    assert torch.allclose(tr.teacher_val, ref, atol=1e-5)
    seen.clear()
    lines = []
    other_split = _kd(str(stage.model_path), val_fraction=0.3)
    other = Trainer(other_split, teacher_info=stage.teacher_info(), log=lines.append)
    assert sum("not used" in ln for ln in lines) == 1 and other.teacher_val_logits() is not None
    assert seen == [("evaluate", True)] and other.teacher_val_logits() is other.teacher_val_logits()
    seen.clear()
    Trainer(_kd(str(plain)))  # no teacher_info: the pass measuring the teacher's accuracy gives them
    assert seen.count(("evaluate", True)) == 1 and other.teacher_val.shape[0] == len(other.data.val)


def test_no_teacher_or_no_validation_split_logs_nothing_new(stage):
    from kdtune.engine.trainer import Trainer

    ce = list(Trainer(TrainConfig.from_dict({**STAGE, "epochs": 1})).run())
    no_val = list(Trainer(_kd(str(stage.model_path), val_fraction=0.0, epochs=1)).run())
    for h in ce + no_val:
        assert "val_agree" not in h and "val_kl_teacher" not in h


@pytest.mark.parametrize("source", ["stage", "checkpoint"])
def test_bundle_members_log_what_their_lone_runs_log(stage, source, tmp_path):
    import shutil

    from kdtune.data import load_data
    from kdtune.data.base import Split
    from kdtune.engine import Bundle, Trainer

    d = load_data("digits", val_fraction=0.2, seed=0)
    d = dataclasses.replace(d, train=Split(d.train.x[:256].clone(), d.train.y[:256].clone()))
    teacher = stage.model_path if source == "stage" else shutil.copy(stage.model_path, tmp_path / "t.pt")
    base = _kd(str(teacher), batch_size=64)
    cfgs = [base, base.replace(seed=2, lr=0.05, hp={"T": 2.0})]
    for mode in ("loop", "auto") if source == "stage" else ("loop",):
        bundle = Bundle(cfgs, data=d, mode=mode, teacher_info=stage.teacher_info())
        list(bundle.run())
        for k, cfg in enumerate(cfgs):
            lone = Trainer(cfg, data=d, teacher_info=stage.teacher_info())
            want = list(lone.run())
            got = bundle.history(k)
            assert len(got) == len(want) == 2
            for g, w in zip(got, want):
                assert g["val_agree"] == pytest.approx(w["val_agree"], abs=1e-5)
                assert g["val_kl_teacher"] == pytest.approx(w["val_kl_teacher"], abs=1e-5)


def test_a_resumed_run_keeps_logging_agreement(stage, tmp_path):
    from kdtune.engine import iter_train, train

    cfg = _kd(str(stage.model_path)).to_dict()
    full = train(dict(cfg, out=str(tmp_path / "full")))
    gen = iter_train(dict(cfg, out=str(tmp_path / "part")))
    next(gen)
    gen.close()  # state.pt holds epoch 1
    part = train(dict(cfg, out=str(tmp_path / "part"), resume=True))
    assert [h["epoch"] for h in part["history"]] == [1, 2]
    for a, b in zip(full["history"], part["history"]):
        assert a["val_agree"] == b["val_agree"] and a["val_kl_teacher"] == b["val_kl_teacher"]


def test_the_epoch_line_shows_the_agreement_of_a_distilled_run():
    from kdtune.engine.run import epoch_line

    m = dict(epoch=1, epochs=2, train_loss=1.0, lr=0.1, val_acc=50.0, test_acc=49.0, train_images_per_s=100.0,
             train_s=1.0, eval_s=0.5)  # fmt: skip
    assert "agree" not in epoch_line(m)
    assert "agree  80.0% kl 0.250" in epoch_line({**m, "val_agree": 80.0, "val_kl_teacher": 0.25})
