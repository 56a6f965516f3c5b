"""TTM, Transformed Teacher Matching (Zheng & Yang, ICLR 2024, eq. 2; the power transform
is eq. 7): ``CE + beta KL(p_t^gamma / U || q)``
with gamma = 1/T applied to the teacher only.

Searched: gamma on a log scale over (0.05, 1] (T from 1 to 20) and beta on a log scale. Starting points: the
paper's appendix table 8 (same architecture) and table 9 (different architectures), CIFAR-100.
"""

PUBLISHED = {
    ("cifar100", "wrn_40_2", "wrn_16_2"): [{"gamma": 0.1, "beta": 101.0}],
    ("cifar100", "wrn_40_2", "wrn_40_1"): [{"gamma": 0.1, "beta": 76.0}],
    ("cifar100", "resnet56", "resnet20"): [{"gamma": 0.3, "beta": 7.0}],
    ("cifar100", "resnet110", "resnet20"): [{"gamma": 0.2, "beta": 8.0}],
    ("cifar100", "resnet110", "resnet32"): [{"gamma": 0.1, "beta": 33.0}],
    ("cifar100", "resnet32x4", "resnet8x4"): [{"gamma": 0.1, "beta": 100.0}],
    ("cifar100", "vgg13", "vgg8"): [{"gamma": 0.1, "beta": 45.0}],
    ("cifar100", "vgg13", "mobilenetv2"): [{"gamma": 0.2, "beta": 16.0}],
    ("cifar100", "resnet50", "mobilenetv2"): [{"gamma": 0.2, "beta": 20.0}],
    ("cifar100", "resnet50", "vgg8"): [{"gamma": 0.1, "beta": 70.0}],
    ("cifar100", "resnet32x4", "shufflev1"): [{"gamma": 0.2, "beta": 12.0}],
    ("cifar100", "resnet32x4", "shufflev2"): [{"gamma": 0.4, "beta": 40.0}],
    ("cifar100", "wrn_40_2", "shufflev1"): [{"gamma": 0.3, "beta": 8.0}],
}
# Pairs without a published entry start at the paper's most common setting.
DEFAULT = [{"gamma": 0.1, "beta": 100.0}]


def space(trial, ctx):
    trial.suggest_float("gamma", 0.05, 1.0, log=True)
    trial.suggest_float("beta", 1.0, 200.0, log=True)
