"""AT, attention transfer (Zagoruyko & Komodakis, ICLR 2017), as the official code and RepDistiller compute it:
``w_ce CE + beta sum_stages mean_{b,hw} (normalize(mean_c |f_s|^p) - normalize(mean_c |f_t|^p))^2`` over the
paired stage outputs, no KD term (see kdtune/losses/at.py).

Searched: the AT weight beta on a log scale, from two decades below the published value to one above. Each
stage's term is a mean over its H*W positions of unit-norm maps, so it grows as the maps shrink: at 8x8 inputs
(digits) the maps have 16 times fewer positions than CIFAR's and the published weight is too strong (measured:
resnet20 -> resnet8 on digits, 8 epochs, lr 0.05: test accuracy 51.9 % at beta 1000, 94.4 % at 100, 97.5 % at
10, CE alone 98.9 %), hence the lower bound 10. The CE weight (1) and p (2, the official code's and every
benchmark's) stay fixed; a spec can add p to the search. Starting point: beta = 1000, the CRD benchmark's
``-b 1000`` (``scripts/run_cifar_distill.sh``) and Hamidi et al.'s gamma for AT (teacher-training supplement,
section 2).
"""


def space(trial, ctx):
    trial.suggest_float("beta", 10.0, 10000.0, log=True)


def starts(ctx):
    return [{"beta": 1000.0}]
