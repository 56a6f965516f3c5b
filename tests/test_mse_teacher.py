"""The teacher-training seed's synthetic experiment (Hamidi et al., ECCV 2024): the ``mse-gauss`` data set and
its p*, the ``toy_mlp128`` model, the ``mse`` method's ``reduction``, and ``kdtune reproduce mse-teacher`` end to
end at tiny settings (1 seed, 1 epoch): table, verdict, determinism, the stacked loop against the engine, the CLI
in a subprocess and its refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kdtune import names
from kdtune.data import load_data
from kdtune.data.toys import (
    MSE_GAUSS_CLASSES,
    MSE_GAUSS_DELTA_MU,
    MSE_GAUSS_DIM,
    MSE_GAUSS_SIGMA2,
    MSE_GAUSS_SIZES,
    mse_gauss_bundle,
    mse_gauss_pstar,
)
from kdtune.errors import ConfigError
from kdtune.losses import METHODS
from kdtune.losses.base import MethodContext, StepOutputs
from kdtune.losses.ce import mse_probs
from kdtune.models import create_model
from kdtune.reproduce import mse_teacher as mt

TINY = ["--seeds", "1", "--epochs", "1", "--no-progress"]
# the installed console script (pyproject's [project.scripts]), else the module entry
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "kdtune")
KDTUNE = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "kdtune"]


# -- the data set ------------------------------------------------------------------------------------------------
def test_pstar_is_a_distribution_and_the_float64_bayes_posterior():
    d = mse_gauss_bundle(3, (400, 100, 600))
    mu = d.info["means"]
    assert mu.dtype == torch.float64 and mu.shape == (MSE_GAUSS_CLASSES, MSE_GAUSS_DIM)
    assert set(torch.unique(mu).tolist()) <= {-MSE_GAUSS_DELTA_MU, 0.0, MSE_GAUSS_DELTA_MU}
    for name, split in (("train", d.train), ("val", d.val), ("test", d.test)):
        p = d.info["p_star"][name]
        assert p.dtype == torch.float64 and p.shape == (len(split), MSE_GAUSS_CLASSES)
        assert (p >= 0).all() and torch.allclose(
            p.sum(1), torch.ones(len(split), dtype=torch.float64), atol=1e-12
        )
        x = split.x.double()  # the float32 features the models see, in float64
        direct = torch.softmax(-((x[:, None, :] - mu[None]) ** 2).sum(-1) / (2 * MSE_GAUSS_SIGMA2), dim=1)
        assert torch.allclose(p, direct, rtol=0, atol=1e-12)
    # the labels are drawn from the class-conditional Gaussians: the Bayes rule beats chance by far on this draw
    assert (d.info["p_star"]["test"].argmax(1) == d.test.y).double().mean() > 0.99
    assert torch.equal(mse_gauss_pstar(d.test.x, mu), d.info["p_star"]["test"])


def test_mse_gauss_loads_by_name_with_the_papers_split():
    d = load_data("mse-gauss")
    assert (len(d.train), len(d.val), len(d.test)) == MSE_GAUSS_SIZES == (5000, 5000, 90000)
    assert d.name == "mse-gauss" and d.in_memory and d.image_size is None
    assert (d.num_classes, d.in_channels) == names.DATASET_SHAPES["mse-gauss"] == (3, 30)
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert {k: len(v) for k, v in d.info["p_star"].items()} == {"train": 5000, "val": 5000, "test": 90000}
    counts = torch.bincount(d.test.y, minlength=3).double() / len(d.test)
    assert (counts - 1 / 3).abs().max() < 0.01  # equiprobable classes
    again, other = load_data("mse-gauss", seed=0), load_data("mse-gauss", seed=1)
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)
    assert not torch.equal(other.info["means"], d.info["means"])
    assert not torch.equal(d.train.x[:100], d.val.x[:100])  # validation is its own draw
    assert len(load_data("mse-gauss", val_fraction=0.05).val) == 2500
    assert len(load_data("mse-gauss", val_fraction=0.0).val) == 0
    with pytest.raises(ConfigError, match="val_fraction"):
        load_data("mse-gauss", val_fraction=1.0)
    assert "mse-gauss" in names.DATASET_NAMES and "toy_mlp128" in names.MODEL_NAMES


def test_reproduction_constants_are_the_data_sets():
    # mse_teacher repeats them so that its --help imports no torch
    assert (mt.CLASSES, mt.DIM, mt.SIGMA2, mt.DELTA_MU, mt.SIZES) == (
        MSE_GAUSS_CLASSES, MSE_GAUSS_DIM, MSE_GAUSS_SIGMA2, MSE_GAUSS_DELTA_MU, MSE_GAUSS_SIZES)  # fmt: skip


def test_toy_mlp128_is_the_authors_mlp():
    torch.manual_seed(0)
    m = create_model("toy_mlp128", num_classes=3, in_channels=30)
    logits, feats = m(torch.randn(7, 30), return_features=True)
    assert logits.shape == (7, 3) and feats.shape == (7, 128) and m.feat_dim == 128 and not m.has_stages
    assert sum(p.numel() for p in m.parameters()) == 30 * 128 + 128 + 128 * 128 + 128 + 128 * 3 + 3
    assert create_model("toy_mlp128", 10, 2)(torch.randn(2, 2)).shape == (2, 10)


# -- the mse method's reduction ------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 3, 10])
def test_mse_mean_is_sum_over_classes(classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(64, classes, generator=g) * 3
    y = torch.randint(0, classes, (64,), generator=g)
    s, m = mse_probs(logits, y, "sum"), mse_probs(logits, y, "mean")
    assert torch.allclose(m, s / classes, rtol=1e-6, atol=0)
    assert torch.allclose(
        m, F.mse_loss(F.softmax(logits, 1), F.one_hot(y, classes).float()), rtol=1e-6
    )  # the code's
    # the default is the paper's sum, computed exactly as before the hyperparameter existed
    p = F.softmax(logits.float(), dim=1)
    assert torch.equal(mse_probs(logits, y), (p - F.one_hot(y, classes).to(p.dtype)).pow(2).sum(dim=1).mean())


def test_mse_method_reduction_hyperparameter():
    cls = METHODS.get("mse")
    assert cls.resolve({}) == {"weight": 1.0, "reduction": "sum"}
    with pytest.raises(ConfigError, match=r"mse\.reduction"):
        cls.resolve({"reduction": "median"})
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ctx = MethodContext(num_classes=5, epochs=1, steps_per_epoch=1, device=torch.device("cpu"), student=None)
    out = StepOutputs(logits, y, 0, 0)
    default = cls(cls.resolve({}), ctx).losses(out)["mse"]
    mean = cls(cls.resolve({"reduction": "mean", "weight": 2.0}), ctx).losses(out)["mse"]
    assert torch.equal(default, mse_probs(logits, y)) and torch.allclose(mean, 2 * default / 5, rtol=1e-6)


# -- the reproduction ----------------------------------------------------------------------------------------------
def _run(capsys, argv):
    assert mt.main(argv) == 0
    return capsys.readouterr().out


def test_reproduction_prints_the_table_and_a_verdict_deterministically(capsys, tmp_path):
    out = _run(capsys, [*TINY, "--out", str(tmp_path / "a.json")])
    for needle in ("Bayes accuracy of p* on test", "E||p-p*||² test", "KL(p*||p) train", "ECE test",
                   "student test acc %", "MSE, sum over classes (paper)", "MSE, mean over classes (code)",
                   "shrunk for the CPU: 1 seeds (the authors: 10), 1 epochs (the authors: 100)"):  # fmt: skip
        assert needle in out, needle
    verdicts = [ln for ln in out.splitlines() if ln.startswith("verdict: ")]
    assert len(verdicts) == 1 and "The seed's claim" in verdicts[0]
    again = _run(capsys, [*TINY, "--out", str(tmp_path / "b.md")])
    assert out.splitlines()[:-1] == again.splitlines()[:-1]  # all but the wall time
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["verdict_line"] == verdicts[0] and doc["settings"]["seeds"] == 1
    seed = doc["per_seed"][0]
    assert set(seed["teachers"]) == set(seed["students"]) == {"ce", "mse-sum", "mse-mean"}
    t = seed["teachers"]["ce"]["test"]
    assert (
        set(t) == {"mse_pstar", "kl_pstar", "ece", "acc"} and 0 <= t["mse_pstar"] <= 2 and t["kl_pstar"] >= 0
    )
    md = (tmp_path / "b.md").read_text()
    assert "| teacher" in md and verdicts[0] in md


def test_stacked_loop_trains_what_the_engine_trains(capsys, tmp_path):
    _run(capsys, [*TINY, "--out", str(tmp_path / "stacked.json")])
    _run(capsys, [*TINY, "--engine", "--out", str(tmp_path / "engine.json")])
    a = json.loads((tmp_path / "stacked.json").read_text())["per_seed"]
    b = json.loads((tmp_path / "engine.json").read_text())["per_seed"]

    def flat(x, key=""):
        if isinstance(x, dict):
            return {k2: v for k, v in x.items() for k2, v in flat(v, f"{key}.{k}").items()}
        if isinstance(x, list):
            return {k2: v for i, v in enumerate(x) for k2, v in flat(v, f"{key}[{i}]").items()}
        return {key: x}

    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for (
        k
    ) in fa:  # bit for bit on this machine; a BLAS that blocks the batched matmul otherwise may round apart
        assert fa[k] == pytest.approx(fb[k], rel=1e-5, abs=1e-9), k


def test_cli_subprocess_and_refusals(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([*KDTUNE, "reproduce", "mse-teacher", *TINY],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (
        "E||p-p*||² test" in p.stdout and sum(ln.startswith("verdict: ") for ln in p.stdout.splitlines()) == 1
    )
    for argv, needle in ((["--seeds", "0"], "--seeds 0 must be >= 1"), (["--epochs", "-1"], "--epochs -1"),
                         (["--out", "x.txt"], "name a .md or .json file"),
                         (["--out", "/nonexistent/dir/x.json"], "its folder does not exist")):  # fmt: skip
        p = subprocess.run([*KDTUNE, "reproduce", "mse-teacher", *argv],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)  # fmt: skip
        assert p.returncode == 2 and p.stdout == ""
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdtune: error: ") and needle in lines[0], p.stderr
    code = (
        "import sys\nfrom kdtune.cli import main\n"
        "try:\n    main(['reproduce', 'mse-teacher', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0 and p.stdout.strip().endswith("LIGHT") and "--engine" in p.stdout, p.stderr


def test_the_verdict_needs_the_claimed_sign_and_a_paired_test():
    from kdtune.reproduce.mse_teacher import paired_p, verdict

    def run(ce_t, sum_t, ce_s, sum_s):
        t = {"ce": {"test": {"mse_pstar": ce_t}}, "mse-sum": {"test": {"mse_pstar": sum_t}},
             "mse-mean": {"test": {"mse_pstar": sum_t}}}  # fmt: skip
        s = {"ce": {"test_acc": ce_s}, "mse-sum": {"test_acc": sum_s}, "mse-mean": {"test_acc": sum_s}}
        return {"teachers": t, "students": s}

    # consistently closer and better in 4 seeds: both hold
    seeds = [run(0.05, 0.03, 80.0, 81.0 + i / 10) for i in range(4)]
    v = verdict(seeds, {})
    assert v["mse-sum"]["closer"] and v["mse-sum"]["students_better"] and v["mse-sum"]["claim"] == "holds"
    # better on average by one seed's lucky point, ties elsewhere: within the noise, so "no"
    seeds = [run(0.05, 0.06, 99.99, 99.99 + (0.01 if i == 0 else 0.0)) for i in range(6)]
    v = verdict(seeds, {})
    assert not v["mse-sum"]["students_better"] and v["mse-sum"]["better_p"] > 0.05
    assert v["mse-sum"]["claim"] == "does not hold"
    assert paired_p([0.0, 0.0]) is None and paired_p([1.0]) is None
