"""CRD, contrastive representation distillation (Tian et al., ICLR 2020) as coded in RepDistiller:
``w_ce CE + beta (L_NCE(out_s) + L_NCE(out_t))``, NCE of each network's 128-d embedding against the other
side's N x 128 memory, K negatives drawn from the other classes (kdtune/losses/crd.py).

Searched: ``beta`` on a log scale, a decade either side of the published weight. The NCE parameters stay at
the code defaults that produced the CRD table (``--nce_k 16384``, ``--nce_t 0.07``, ``--nce_m 0.5``,
``--feat_dim 128``, ``--mode exact``: the README's commands pass none of them), and ``w_ce`` stays 1 (a spec
may add any of them). On a training split with fewer than 16384 samples of other classes per class (digits,
the generated test sets) the method refuses the default K in one line: such a spec fixes a smaller ``nce_k``.
Starting point: RepDistiller's ``scripts/run_cifar_distill.sh`` (``--distill crd -a 0 -b 0.8``, CE weight 1,
no KD term), one weight for every teacher -> student pair, and the teacher-training supplement's gamma
(section 2: 0.8).
"""


def space(trial, ctx):
    trial.suggest_float("beta", 0.08, 8.0, log=True)


DEFAULT = [{"beta": 0.8}]
