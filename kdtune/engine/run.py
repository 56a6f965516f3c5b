"""One run with its output directory: config.yaml, train.log (one line per epoch), state.pt (resumable),
best.pt (best validation accuracy), final.pt and result.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from kdtune.config import TrainConfig, dumps
from kdtune.engine.trainer import Trainer
from kdtune.errors import ConfigError
from kdtune.losses.base import METHOD_METRIC_PREFIX

RUN_FILES = ("config.yaml", "train.log", "state.pt", "best.pt", "final.pt", "result.json")


def as_config(cfg: TrainConfig | dict | None = None, **overrides) -> TrainConfig:
    if cfg is None:
        return TrainConfig.from_dict(overrides)
    if isinstance(cfg, TrainConfig):
        return cfg.replace(**overrides) if overrides else cfg
    if isinstance(cfg, dict):
        return TrainConfig.from_dict({**cfg, **overrides})
    raise ConfigError(f"expected a TrainConfig or a dict, got {type(cfg).__name__}")


def epoch_line(m: dict[str, Any]) -> str:
    terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in m.items() if k.startswith("loss_"))
    val = f"val {m['val_acc']:6.2f}%  " if m.get("val_acc") is not None else ""
    width = len(str(m["epochs"]))
    host = f"  host {m['host_rss_mb']:,.0f} MB" if m.get("host_rss_mb") is not None else ""
    own = " ".join(
        f"{k[len(METHOD_METRIC_PREFIX):]} {v:.3g}"
        for k, v in m.items()
        if k.startswith(METHOD_METRIC_PREFIX) and isinstance(v, (int, float))
    )
    return (
        f"epoch {m['epoch']:>{width}}/{m['epochs']}  loss {m['train_loss']:.4f} ({terms})  lr {m['lr']:.4g}  "
        f"{val}test {m['test_acc']:6.2f}%  {m['train_images_per_s']:,.0f} img/s  {m['train_s'] + m['eval_s']:.1f}s"
        f"{host}" + (f"  [{own}]" if own else "")
    )


def prepare_out(cfg: TrainConfig) -> Path | None:
    """Check the output directory: refuse to overwrite a run unless asked, clear it when asked."""
    if not cfg.out:
        return None
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={cfg.out} is a file, not a directory; choose another out=")
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise ConfigError(
            f"out={cfg.out} already holds a run ({', '.join(existing)}); pass resume=true to continue it, "
            "overwrite=true to replace it, or choose another out="
        )
    if existing and cfg.overwrite:
        for f in existing:
            (out / f).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def iter_train(
    cfg: TrainConfig | dict | None = None,
    /,
    *,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    data=None,
    **overrides,
) -> Generator[dict[str, Any], None, dict[str, Any]]:
    """Train, yielding one metrics dict per epoch; the generator's return value is the result dict.

    With ``cfg.out`` set, writes the run directory as it goes, and ``resume=true`` continues from its
    ``state.pt``.
    """
    cfg = as_config(cfg, **overrides)
    log = log or (lambda s: None)
    out = prepare_out(cfg)
    if out is not None and cfg.resume and (out / "result.json").exists():
        result = json.loads((out / "result.json").read_text())
        log(f"{out} is already complete; nothing to resume")
        return result
    t_start = time.perf_counter()
    trainer = Trainer(cfg, data=data, log=log, progress=progress)
    if out is not None:
        if cfg.resume and (out / "state.pt").exists():
            trainer.load_state(out / "state.pt")
            log(f"resuming {out} after epoch {trainer.epoch}/{cfg.epochs}")
        (out / "config.yaml").write_text(cfg.to_yaml())
    logf = open(out / "train.log", "a") if out is not None else None  # noqa: SIM115
    try:
        for m in trainer.run():
            line = epoch_line(m)
            log(line)
            if logf is not None:
                logf.write(line + "\n")
                logf.flush()
                if m["is_best"]:
                    trainer.save_model(out / "best.pt")
                if cfg.save_every and (trainer.epoch % cfg.save_every == 0 or trainer.epoch == cfg.epochs):
                    trainer.save_state(out / "state.pt")
            yield m
    finally:
        if logf is not None:
            logf.close()
    result = trainer.result()
    result["wall_s"] = time.perf_counter() - t_start
    if out is not None:
        trainer.save_model(out / "final.pt")
        tmp = out / ".result.json.tmp"
        tmp.write_text(dumps(result))
        tmp.replace(out / "result.json")
    return result


def train(cfg: TrainConfig | dict | None = None, /, **kwargs) -> dict[str, Any]:
    """Run to the end and return the result dict (what result.json holds)."""
    gen = iter_train(cfg, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
