"""IPWD, inverse probability weighting distillation (Niu et al., NeurIPS 2022): KD with each sample's term
weighted by the inverse of its estimated propensity, ``w = 1 + H(y_cls, y) / H(y_kd, y)``, from an extra
CE-trained head of the student (see kdtune/losses/ipwd.py for the estimator chosen).

Searched: the KD temperature and weights (as for KD), the estimator (per sample, or per class with moving
averages, whose momentum is then searched too: a conditional parameter) and the cap on the raw weight.
Starting points: the CRD convention of KD (T = 4, 0.1 / 0.9) with each estimator; no official code exists.
"""


def space(trial, ctx):
    trial.suggest_float("T", 1.0, 8.0)
    trial.suggest_float("w_ce", 0.0, 1.0)
    trial.suggest_float("w_kd", 0.1, 10.0, log=True)
    weighting = trial.suggest_categorical("weighting", ["sample", "class"])
    if weighting == "class":
        trial.suggest_float("momentum", 0.5, 0.99)
    trial.suggest_categorical("clip", [5.0, 10.0, 20.0])


DEFAULT = [
    {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9, "weighting": "sample", "clip": 10.0},
    {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9, "weighting": "class", "momentum": 0.9, "clip": 10.0},
]
