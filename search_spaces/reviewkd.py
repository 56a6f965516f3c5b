"""ReviewKD (Chen et al., CVPR 2021), as its official CIFAR-100 code trains it:
``w_ce CE + beta min(1, epoch / warmup) sum_levels HCL`` over attention-based fusions of the student's
stages against the teacher's pre-activation stages (see kdtune/losses/reviewkd.py).

Searched: beta over the official set {0.6, 1, 5, 8} (the values of ``CIFAR-100/script/reviewKD.sh``, which the
teacher-training supplement searches: "select gamma from {0.6, 1, 5, 8}"). The CE weight stays 1 (no KD term).
Starting point: the official script's beta for its pairs (0.6 resnet56 -> resnet20, 1 resnet110 -> resnet32,
8 resnet32x4 -> shufflev2, 5 for its other pairs); 5 for every other pair (the script's most common value; not
a published value for those pairs). The warm-up is the official 20 epochs of a 240-epoch schedule; a shorter
sweep keeps the same fraction (at least 1 epoch), since 20 warm-up epochs would swallow a 10-epoch trial.
"""

BETAS = [0.6, 1.0, 5.0, 8.0]
# Official CIFAR-100 runs (dvlab-research/ReviewKD, CIFAR-100/script/reviewKD.sh): --kd-loss-weight per pair.
BETA = {
    ("cifar100", "resnet56", "resnet20"): 0.6,
    ("cifar100", "resnet110", "resnet32"): 1.0,
    ("cifar100", "wrn_40_2", "wrn_16_2"): 5.0,
    ("cifar100", "wrn_40_2", "wrn_40_1"): 5.0,
    ("cifar100", "wrn_40_2", "shufflev1"): 5.0,
    ("cifar100", "resnet32x4", "resnet8x4"): 5.0,
    ("cifar100", "resnet32x4", "shufflev1"): 5.0,
    ("cifar100", "resnet32x4", "shufflev2"): 8.0,
}
DEFAULT_BETA = 5.0


def warmup(ctx):
    return 20 if ctx.epochs >= 240 else max(1, round(ctx.epochs * 20 / 240))


def space(trial, ctx):
    trial.suggest_categorical("beta", BETAS)
    return {"warmup": warmup(ctx)}


def starts(ctx):
    return [{"beta": BETA.get(ctx.pair, DEFAULT_BETA)}]
