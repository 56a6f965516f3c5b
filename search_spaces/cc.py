"""CC, correlation congruence (Peng et al., ICCV 2019) as coded in RepDistiller: ``w_ce CE + beta L_CC``,
``L_CC`` the mean product of consecutive samples' residuals ``|e_s - e_t|`` of two trainable 128-d linear
embeddings (kdtune/losses/cc.py).

Searched: ``beta`` on a log scale, a decade either side of the published weight. ``embed_dim`` stays 128 (it
scales the term too: the residual products are summed over the embedding) and ``w_ce`` stays 1 (a spec may add
either).
Starting point: RepDistiller's ``scripts/run_cifar_distill.sh`` (``--distill correlation -a 0 -b 0.02``, CE
weight 1, no KD term; ``--feat_dim`` left at its default 128), one weight for every teacher -> student pair, and
the teacher-training supplement's gamma (section 2: 0.02).
"""


def space(trial, ctx):
    trial.suggest_float("beta", 0.002, 0.2, log=True)


DEFAULT = [{"beta": 0.02}]
