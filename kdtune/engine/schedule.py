"""Learning-rate schedules as a pure function of training progress (so resuming needs only the step count)."""

from __future__ import annotations

import math


def lr_factor(
    epoch_float: float,
    *,
    epochs: int,
    schedule: str,
    milestones=(),
    lr_decay: float = 0.1,
    warmup_epochs: float = 0.0,
) -> float:
    """Multiplier of the base lr at fractional epoch ``epoch_float`` (0 = start of training).

    - warmup: linear from 1/steps up to 1 over ``warmup_epochs``;
    - ``cosine``: half a cosine from 1 to 0 over the epochs after warmup, per step;
    - ``step``: ``lr_decay ** (number of milestones <= current epoch)``, changing at epoch boundaries (CRD);
    - ``constant``: 1.
    """
    if warmup_epochs > 0 and epoch_float < warmup_epochs:
        return max(epoch_float / warmup_epochs, 1e-3)
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-12)
        t = min(max((epoch_float - warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        e = int(math.floor(epoch_float + 1e-9))
        return lr_decay ** sum(1 for m in milestones if e >= m)
    return 1.0
