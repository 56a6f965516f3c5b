"""RKD, relational knowledge distillation (Park et al., CVPR 2019):
``w_ce CE + beta (w_dist L_distance + w_angle L_angle)`` on the pooled penultimate vectors
(kdtune/losses/rkd.py).

Searched: the two term weights, each on a log scale a decade either side of the published one; ``beta`` (an
overall factor on both, redundant with them) stays 1 and ``w_ce`` stays 1 (a spec may add either). The
paper's single-term variants (distance only, angle only) are a spec's fixed ``w_angle: 0`` or ``w_dist: 0``.
Starting point: RepDistiller (``--distill rkd -a 0 -b 1``, ``RKDLoss(w_d=25, w_a=50)``, CE weight 1, no KD term),
one weight for every teacher -> student pair; mdistiller's distance / angle weights 25 / 50 and the
teacher-training supplement's gamma_1 = 25, gamma_2 = 50 (section 2) agree.
"""


def space(trial, ctx):
    trial.suggest_float("w_dist", 2.5, 250.0, log=True)
    trial.suggest_float("w_angle", 5.0, 500.0, log=True)


DEFAULT = [{"w_dist": 25.0, "w_angle": 50.0}]
