"""A trial's configuration: the searched values of a trial read onto its group's base TrainConfig.

A key of a trial config names a method hyperparameter when the method has one of that name, else a
TrainConfig field; ``train.<field>`` forces the field (IPWD's ``momentum`` is its hyperparameter,
``train.momentum`` the optimiser's). The trainable, the MLflow params and the spec's checks read keys this way.
"""

from __future__ import annotations

from typing import Any


def split_config(config: dict[str, Any], method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainConfig fields, method hyperparameters) of a trial config."""
    from kdtune.losses import METHODS

    hps = METHODS.get(method).hparams
    fields: dict[str, Any] = {}
    hp: dict[str, Any] = {}
    for k, v in config.items():
        if k.startswith("train."):
            fields[k[len("train.") :]] = v
        elif k in hps:
            hp[k] = v
        else:
            fields[k] = v
    return fields, hp


def trial_train_config(method: str, base: dict[str, Any], config: dict[str, Any]):
    """The TrainConfig of a trial: ``base`` (its group's, with ``hp``) overlaid with the trial's ``config``."""
    from kdtune.config import TrainConfig

    fields, hp = split_config(config, method)
    base = dict(base)
    base_hp = dict(base.pop("hp", None) or {})
    return TrainConfig.from_dict({**base, **fields, "hp": {**base_hp, **hp}})
