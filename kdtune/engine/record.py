"""A run's record: its config, the epochs it has done, each epoch's metrics (history), its best epoch and its
training time and images. :class:`RunRecord` is what a lone :class:`~kdtune.engine.trainer.Trainer` and a
bundle's member (:class:`~kdtune.engine.bundle.Member`) both are, so an epoch is recorded, a checkpoint's meta
written and a result read the same way for both; :func:`record_epoch` is the one place an epoch's metrics are
made (the keys MLflow, Tune and the epoch line read).
"""

from __future__ import annotations

import os
from typing import Any

from kdtune.config import TrainConfig
from kdtune.losses.base import METHOD_METRIC_PREFIX


class RunRecord:
    cfg: TrainConfig
    epoch: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    train_time: float
    train_images: int

    def start_record(self, cfg: TrainConfig) -> None:
        """A fresh record of ``cfg``'s run: no epoch done, no best yet."""
        self.cfg = cfg
        self.epoch = 0  # epochs completed
        self.history = []
        self.best = {"val_acc": -1.0, "test_acc": -1.0, "epoch": 0, "test_acc_at_best_val": None}
        self.train_time = 0.0
        self.train_images = 0


def record_epoch(
    run: RunRecord,
    *,
    lr: float,
    term_means: dict[str, float],
    val: dict[str, float] | None,
    test: dict[str, float],
    n_img: int,
    train_s: float,
    eval_s: float,
    method_metrics: dict[str, float] | None = None,
    teacher_agreement: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The metrics of the epoch ``run`` just finished; updates ``run.best`` and appends to ``run.history``.
    ``method_metrics`` (the method's own per-epoch statistics) are added with the ``method_`` prefix;
    ``teacher_agreement`` (``val_agree``, ``val_kl_teacher``: the student against its teacher on the validation
    split, :func:`kdtune.engine.diagnostics.epoch_agreement`) as they are, after ``val_loss``.

    ``run.epoch`` already counts this epoch.
    """
    metrics: dict[str, Any] = {
        "epoch": run.epoch,
        "epochs": run.cfg.epochs,
        "lr": lr,
        "train_loss": sum(term_means.values()),
        **{f"loss_{k}": v for k, v in term_means.items()},
        "val_acc": val["acc"] if val else None,
        "val_loss": val["loss"] if val else None,
        **(teacher_agreement or {}),
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "train_images_per_s": n_img / max(train_s, 1e-9),
        "train_s": train_s,
        "eval_s": eval_s,
        "host_rss_mb": host_rss_mb(),
        **{METHOD_METRIC_PREFIX + k: v for k, v in (method_metrics or {}).items()},
    }
    key = "val_acc" if val else "test_acc"
    is_best = metrics[key] > run.best["val_acc"]
    if is_best:
        run.best = {
            "val_acc": metrics[key],
            "epoch": run.epoch,
            "test_acc_at_best_val": test["acc"],
            "test_acc": run.best.get("test_acc", -1.0),
        }
    run.best["test_acc"] = max(run.best.get("test_acc", -1.0), test["acc"])
    metrics["best_val_acc"] = run.best["val_acc"] if val else None
    metrics["best_test_acc"] = run.best["test_acc"]
    metrics["is_best"] = is_best
    run.history.append(metrics)
    return metrics


def model_meta(run: RunRecord, data_name: str) -> dict[str, Any]:
    """The ``meta`` saved with a model checkpoint of ``run``."""
    last = run.history[-1] if run.history else {}
    return {
        "data": data_name,
        "method": run.cfg.method,
        "epochs": run.epoch,
        "test_acc": last.get("test_acc"),
        "val_acc": last.get("val_acc"),
        "seed": run.cfg.seed,
    }


def host_rss_mb() -> float | None:
    """This process's resident host memory now, in MiB (Linux: /proc/self/statm); None where unknown.

    Logged once per epoch: a trial's host memory should stay flat across epochs.
    """
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
