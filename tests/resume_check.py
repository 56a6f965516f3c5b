"""The stop-and-resume check the methods with state of their own share (FitNet, VID, CRD, ReviewKD, HSAKD)."""

from __future__ import annotations

from pathlib import Path

import torch


def stopped_and_resumed(cfg: dict, tmp_path: Path) -> tuple[dict, dict, list[list[str]]]:
    """Train ``cfg`` (a 2-epoch ``kdtune.train`` config) uninterrupted, and again stopped after epoch 1 (its
    ``state.pt``) and resumed. Asserts the resumed run finished both epochs and ended with the uninterrupted
    run's student weights, bit for bit. Returns both runs' saved method modules (``state.pt``) and their
    ``train.log`` lines cut to the first five fields, for the method's own checks."""
    from kdtune.engine import iter_train, train

    full, part = tmp_path / "full", tmp_path / "part"
    train(dict(cfg, out=str(full)))
    gen = iter_train(dict(cfg, out=str(part)))
    next(gen)
    gen.close()  # state.pt holds epoch 1
    assert not (part / "result.json").exists()
    assert train(dict(cfg, out=str(part), resume=True))["epochs"] == 2
    a = torch.load(full / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "final.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (torch.load(d / "state.pt", weights_only=True)["method_modules"] for d in (full, part))
    logs = [[ln.split("  ")[:5] for ln in (d / "train.log").read_text().splitlines()] for d in (full, part)]
    return ma, mb, logs
