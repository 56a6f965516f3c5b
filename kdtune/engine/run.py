"""One run with its output directory: config.yaml, train.log (one line per epoch), state.pt (resumable),
best.pt (best validation accuracy), final.pt and result.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from kdtune.config import TrainConfig, as_config, dumps
from kdtune.engine.trainer import Trainer, atomic_torch_save, read_state
from kdtune.errors import ConfigError
from kdtune.losses.base import METHOD_METRIC_PREFIX

RUN_FILES = ("config.yaml", "train.log", "state.pt", "best.pt", "final.pt", "result.json")


def epoch_line(m: dict[str, Any]) -> str:
    terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in m.items() if k.startswith("loss_"))
    val = f"val {m['val_acc']:6.2f}%  " if m.get("val_acc") is not None else ""
    if m.get("val_agree") is not None:  # a distilled run: how closely it follows its teacher on validation
        val += f"agree {m['val_agree']:5.1f}% kl {m['val_kl_teacher']:.3f}  "
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
        write_result(out, result)
    return result


def train(cfg: TrainConfig | dict | None = None, /, **kwargs) -> dict[str, Any]:
    """Run to the end and return the result dict (what result.json holds)."""
    gen = iter_train(cfg, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def write_result(out: Path, result: dict[str, Any]) -> None:
    """result.json, written atomically (its presence marks a finished run)."""
    tmp = out / ".result.json.tmp"
    tmp.write_text(dumps(result))
    tmp.replace(out / "result.json")


def iter_train_bundle(
    cfgs: list[TrainConfig | dict],
    /,
    *,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    data=None,
    mode: str | None = None,
    allow_inexact: bool = False,
) -> Generator[list[dict[str, Any]], None, list[dict[str, Any]]]:
    """Train ``cfgs`` as one fused :class:`~kdtune.engine.bundle.Bundle`, yielding per epoch the list of the
    members' metrics dicts; the return value is the list of their result dicts, in the order of ``cfgs``.

    Each member with ``out`` set gets the run directory :func:`iter_train` writes (config.yaml, train.log,
    state.pt, best.pt, final.pt, result.json); ``resume=true`` continues from the members' state.pt files
    (a finished member's result.json is read back and it does not train again). A member whose loss
    diverges is dropped: its entry is ``{"status": "diverged", "error": ..., "epochs": ..., "config": ...}``
    and its directory gets no result.json, as a lone diverged run's does not. ``mode`` is how the stacked
    student runs (:data:`~kdtune.engine.bundle.MODES`; default :data:`~kdtune.engine.bundle.DEFAULT_MODE`, the
    fastest mode that is bit for bit a lone run's arithmetic here); a mode named that is not exact here is
    refused unless ``allow_inexact=True``.
    """
    from kdtune.engine.bundle import DEFAULT_MODE, Bundle

    cfgs = [as_config(c) for c in cfgs]
    log = log or (lambda s: None)
    outs = [prepare_out(c) for c in cfgs]
    results: list[dict[str, Any] | None] = [None] * len(cfgs)
    todo = []
    for i, (c, out) in enumerate(zip(cfgs, outs)):
        if out is not None and c.resume and (out / "result.json").exists():
            results[i] = json.loads((out / "result.json").read_text())
            log(f"{out} is already complete; nothing to resume")
        else:
            todo.append(i)
    if not todo:
        return results
    t_start = time.perf_counter()
    bundle = Bundle([cfgs[i] for i in todo], data=data, keys=todo, log=log, progress=progress,
                    mode=mode or DEFAULT_MODE, allow_inexact=allow_inexact)
    states = [i for i in todo if outs[i] is not None and cfgs[i].resume and (outs[i] / "state.pt").exists()]
    if states and len(states) != len(todo):
        fresh = sorted(set(todo) - set(states))
        raise ConfigError(
            f"cannot resume the bundle: member {fresh[0]} has no state.pt but member {states[0]} has one; "
            "resume members saved together, or train the fresh ones in a bundle of their own"
        )
    for i in states:
        bundle.load_member_state(i, read_state(outs[i] / "state.pt", bundle.device))
    if states:
        log(f"resuming a bundle of {len(todo)} after epoch {bundle.epoch}/{bundle.epochs}")
    for i in todo:
        if outs[i] is not None:
            (outs[i] / "config.yaml").write_text(cfgs[i].to_yaml())
    logs = {i: open(outs[i] / "train.log", "a") for i in todo if outs[i] is not None}  # noqa: SIM115
    try:
        for epoch_metrics in bundle.run():
            for m in epoch_metrics:
                i, c, out = m["member"], cfgs[m["member"]], outs[m["member"]]
                if m.get("diverged"):
                    log(f"member {i} diverged: {m['error']}")
                    results[i] = {"status": "diverged", "error": m["error"], "epochs": m["epoch"] - 1,
                                  "config": c.to_dict()}  # fmt: skip
                    continue
                line = epoch_line(m)
                log(f"[{i}] {line}")
                if out is None:
                    continue
                logs[i].write(line + "\n")
                logs[i].flush()
                if m["is_best"]:
                    bundle.save_model(i, out / "best.pt")
                if c.save_every and (bundle.epoch % c.save_every == 0 or bundle.epoch == c.epochs):
                    atomic_torch_save(bundle.member_state(i), out / "state.pt")
            yield epoch_metrics
    finally:
        for f in logs.values():
            f.close()
    wall = time.perf_counter() - t_start
    for i in bundle.keys:
        result = bundle.result(i)
        result["wall_s"] = wall
        if outs[i] is not None:
            bundle.save_model(i, outs[i] / "final.pt")
            write_result(outs[i], result)
        results[i] = result
    return results


def train_bundle(cfgs: list[TrainConfig | dict], /, **kwargs) -> list[dict[str, Any]]:
    """Run a fused bundle to the end and return the members' result dicts (what their result.json hold)."""
    gen = iter_train_bundle(cfgs, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
