"""DKD, Decoupled Knowledge Distillation (Zhao et al., CVPR 2022, eq. 7):
``w_ce CE + min((epoch + 1) / warmup, 1) T^2 (alpha TCKD + beta NCKD)``.

Searched: alpha and beta on log scales (their product with an overall weight gamma is what the official
configs tune: gamma in {0.2, 1, 2, 4, 8}, per the teacher-training supplement, eq. 24), and T.
Starting points: the official per-pair beta with alpha = 1, T = 4, scaled by each gamma of the published set
(gamma = 1 first). The warm-up is the official 20 epochs of a 240-epoch schedule; a shorter sweep keeps the
same fraction (at least 1 epoch), since 20 warm-up epochs would swallow a 10-epoch trial.

Logit standardisation (Sun et al., CVPR 2024) is searched as the boolean ``logit_std``; its starting point is
the official code's (``--logit-stand --base-temp 2 --kd-weight 9``: alpha = 9, beta = 9 * the pair's beta,
T = 2), which is why beta's range reaches 128.
"""

GAMMAS = (1.0, 2.0, 4.0, 0.2, 8.0)
# Official CIFAR-100 configs (megvii-research/mdistiller, configs/cifar100/dkd/*.yaml): beta per pair.
BETA = {
    ("cifar100", "resnet32x4", "resnet8x4"): 8.0,
    ("cifar100", "resnet32x4", "shufflev1"): 8.0,
    ("cifar100", "resnet32x4", "shufflev2"): 8.0,
    ("cifar100", "resnet50", "mobilenetv2"): 8.0,
    ("cifar100", "wrn_40_2", "shufflev1"): 8.0,
    ("cifar100", "vgg13", "vgg8"): 6.0,
    ("cifar100", "vgg13", "mobilenetv2"): 6.0,
    ("cifar100", "wrn_40_2", "wrn_16_2"): 6.0,
    ("cifar100", "wrn_40_2", "wrn_40_1"): 6.0,
    ("cifar100", "resnet56", "resnet20"): 2.0,
    ("cifar100", "resnet110", "resnet32"): 2.0,
    ("imagenet", "resnet34", "resnet18"): 0.5,
}


def warmup(ctx):
    if ctx.data == "imagenet":
        return 1
    return 20 if ctx.epochs >= 240 else max(1, round(ctx.epochs * 20 / 240))


CONSTRAINTS = [("alpha", "or", "beta")]  # DKD adds nothing when alpha and beta are both 0 (kdtune.tune.spaces)


def space(trial, ctx):
    trial.suggest_float("alpha", 0.1, 16.0, log=True)
    trial.suggest_float("beta", 0.1, 128.0, log=True)
    trial.suggest_float("T", 1.0, 8.0)
    trial.suggest_categorical("logit_std", [False, True])
    return {"warmup": warmup(ctx)}


def starts(ctx):
    beta = BETA.get(ctx.pair, 8.0)
    t = 1.0 if ctx.data == "imagenet" else 4.0
    pts = [{"alpha": g, "beta": g * beta, "T": t, "logit_std": False} for g in GAMMAS]
    return pts + [{"alpha": 9.0, "beta": 9.0 * beta, "T": 2.0, "logit_std": True}]
