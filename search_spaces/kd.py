"""Vanilla KD (Hinton, Vinyals & Dean 2015): ``w_ce CE + w_kd T^2 KL(softmax(t/T) || softmax(s/T))``.

Searched: the temperature T and both weights (a loss-scale confound: scaling plain KD up by 4-8 often helps,
so ``w_kd`` is searched on a log scale well above 1). Starting points: the CRD/RepDistiller CIFAR-100
convention T = 4, w_ce = 0.1, w_kd = 0.9 (Tian et al. 2020; also the teacher-training supplement's
alpha = 0.9, T = 4) and, for ImageNet, mdistiller's T = 1 with 0.5 / 0.5; then the same with logit
standardisation (Sun et al., CVPR 2024; ``logit_std``, searched as a boolean), whose official code uses the
base temperature T = 2 and KD weight 9 with CE weight 0.1 on CIFAR-100 (ImageNet: its ``kd_ours`` config,
T = 2, CE 0.5 / KD 0.5 scaled by the same weight 9 is not published, so T = 2 with the ImageNet weights).
"""


def space(trial, ctx):
    trial.suggest_float("T", 1.0, 8.0)
    trial.suggest_float("w_ce", 0.0, 1.0)
    trial.suggest_float("w_kd", 0.1, 10.0, log=True)
    trial.suggest_categorical("logit_std", [False, True])


CIFAR = [
    {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9, "logit_std": False},
    {"T": 2.0, "w_ce": 0.1, "w_kd": 9.0, "logit_std": True},
]
IMAGENET = [
    {"T": 1.0, "w_ce": 0.5, "w_kd": 0.5, "logit_std": False},
    {"T": 2.0, "w_ce": 0.5, "w_kd": 0.5, "logit_std": True},
]


def starts(ctx):
    return IMAGENET if ctx.data == "imagenet" else CIFAR
