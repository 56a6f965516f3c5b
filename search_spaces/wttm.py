"""WTTM, Weighted Transformed Teacher Matching (Zheng & Yang, ICLR 2024, eq. 22):
``CE + beta mean_i U(p_t) KL(p_t^gamma / U || q)`` with gamma = 1/T and U = sum_c p_t,c^gamma.

Searched: gamma on a log scale over (0.05, 1] and beta on a log scale. Starting points: the paper's appendix
tables 8 and 9 (CIFAR-100) and table 10 (ImageNet).
"""

PUBLISHED = {
    ("cifar100", "wrn_40_2", "wrn_16_2"): [{"gamma": 0.1, "beta": 4.0}],
    ("cifar100", "wrn_40_2", "wrn_40_1"): [{"gamma": 0.1, "beta": 3.0}],
    ("cifar100", "resnet56", "resnet20"): [{"gamma": 0.3, "beta": 1.5}],
    ("cifar100", "resnet110", "resnet20"): [{"gamma": 0.2, "beta": 2.0}],
    ("cifar100", "resnet110", "resnet32"): [{"gamma": 0.1, "beta": 1.5}],
    ("cifar100", "resnet32x4", "resnet8x4"): [{"gamma": 0.1, "beta": 3.0}],
    ("cifar100", "vgg13", "vgg8"): [{"gamma": 0.1, "beta": 2.25}],
    ("cifar100", "vgg13", "mobilenetv2"): [{"gamma": 0.2, "beta": 3.0}],
    ("cifar100", "resnet50", "mobilenetv2"): [{"gamma": 0.2, "beta": 5.0}],
    ("cifar100", "resnet50", "vgg8"): [{"gamma": 0.1, "beta": 2.0}],
    ("cifar100", "resnet32x4", "shufflev1"): [{"gamma": 0.2, "beta": 1.4}],
    ("cifar100", "resnet32x4", "shufflev2"): [{"gamma": 0.4, "beta": 16.0}],
    ("cifar100", "wrn_40_2", "shufflev1"): [{"gamma": 0.3, "beta": 3.0}],
    ("imagenet", "resnet34", "resnet18"): [{"gamma": 0.8, "beta": 1.6}],
    ("imagenet", "resnet50", "resnet18"): [{"gamma": 0.8, "beta": 1.6}],
}
DEFAULT = [{"gamma": 0.1, "beta": 3.0}]


def space(trial, ctx):
    trial.suggest_float("gamma", 0.05, 1.0, log=True)
    trial.suggest_float("beta", 0.1, 20.0, log=True)
