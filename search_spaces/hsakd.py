"""HSAKD (Yang et al., IJCAI 2021), the student step as its official code trains it (kdtune/losses/hsakd.py):
four rotations of every image, ``w_ce CE(z_s[0::4], y) + w_aux sum_l T^2 KL(aux_t^l || aux_s^l)
+ w_main T^2 KL(z_t || z_s)`` over all four rotations, the teacher carrying auxiliary heads trained on it frozen
(the sweep's heads stage, ``kdtune.tune.stages.ensure_heads_stage``).

Searched: the two distillation weights on log scales around 1 and the temperature. The CE weight stays at 1
(the official loss, and Hamidi et al.'s ``CE + gamma L_distill``). Starting point: the official values, all
weights 1 and T = 3 (``train_student_cifar.py``: ``loss_cls + loss_div``, ``--kd_T 3``), which is the
teacher-training supplement's gamma = 1 for HSAKD.
"""


def space(trial, ctx):
    trial.suggest_float("w_aux", 0.1, 10.0, log=True)
    trial.suggest_float("w_main", 0.1, 10.0, log=True)
    trial.suggest_float("T", 1.0, 8.0)


def starts(ctx):
    return [{"w_aux": 1.0, "w_main": 1.0, "T": 3.0}]
