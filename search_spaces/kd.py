"""Vanilla KD (Hinton, Vinyals & Dean 2015): ``w_ce CE + w_kd T^2 KL(softmax(t/T) || softmax(s/T))``.

Searched: the temperature T and both weights (a loss-scale confound: scaling plain KD up by 4-8 often helps,
so ``w_kd`` is searched on a log scale well above 1). Starting points: the CRD/RepDistiller CIFAR-100
convention T = 4, w_ce = 0.1, w_kd = 0.9 (Tian et al. 2020; also the teacher-training supplement's
alpha = 0.9, T = 4) and, for ImageNet, mdistiller's T = 1 with 0.5 / 0.5.
"""


def space(trial, ctx):
    trial.suggest_float("T", 1.0, 8.0)
    trial.suggest_float("w_ce", 0.0, 1.0)
    trial.suggest_float("w_kd", 0.1, 10.0, log=True)


CIFAR = [{"T": 4.0, "w_ce": 0.1, "w_kd": 0.9}]
IMAGENET = [{"T": 1.0, "w_ce": 0.5, "w_kd": 0.5}]


def starts(ctx):
    return IMAGENET if ctx.data == "imagenet" else CIFAR
