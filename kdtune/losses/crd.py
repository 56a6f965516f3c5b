"""CRD, contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020), **as the official code computes it** (HobbitLong/RepDistiller @ b84f547:
``crd/criterion.py`` -- ``CRDLoss``, ``ContrastLoss``, ``Embed``, ``Normalize`` --, ``crd/memory.py`` --
``ContrastMemory`` --, ``dataset/cifar100.py::CIFAR100InstanceSample`` for the contrastive indices, and
``train_student.py`` / ``helper/loops.py``; fact sheet ``FEATURE_METHODS.md`` section 9). mdistiller's
``distillers/CRD.py`` is the same code.

**Objective.** ``L = w_ce CE + beta (L_NCE(out_s) + L_NCE(out_t))`` with ``beta = 0.8`` (RepDistiller's
``-b 0.8``, ``-a 0``: CE weight 1, no KD term), logged as the terms ``crd`` and ``ce``.

More: docs/methods.md §CRD.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses._features import W_CE, feature_sizes, with_ce
from kdtune.losses.base import HParam, Method, MethodContext, StepOutputs, fp32, register_method

CRD_EPS = 1e-7  # crd/criterion.py: eps = 1e-7
CRD_FEAT_DIM = 128  # --feat_dim
CRD_NCE_K = 16384  # --nce_k
CRD_NCE_T = 0.07  # --nce_t
CRD_NCE_M = 0.5  # --nce_m


def l2_normalize(x: Tensor) -> Tensor:
    """RepDistiller's ``Normalize(2)``: ``x / ||x||_2`` per row, as ``x.pow(2).sum(1).pow(1/2)``, no eps."""
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class Embed(nn.Module):
    """RepDistiller's ``Embed(dim_in, dim_out)``: flatten, ``nn.Linear``, L2 normalisation (no eps). Same
    attribute name (``linear``), so a state dict of one loads into the other."""

    def __init__(self, dim_in: int, dim_out: int = CRD_FEAT_DIM):
        super().__init__()
        self.linear = nn.Linear(int(dim_in), int(dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return l2_normalize(self.linear(x.reshape(x.shape[0], -1)))


def contrast_indices(index: Tensor, labels: Tensor, k: int, generator: torch.Generator | None = None,
                     mode: str = "exact") -> Tensor:  # fmt: skip
    """The ``(B, K+1)`` contrastive indices of a batch (RepDistiller's ``contrast_idx``): column 0 the
    positive (``index`` itself, or in ``relax`` mode a uniformly random sample of the same class), columns
    1..K negatives drawn uniformly without replacement from the samples of the other classes. ``labels`` are
    the training split's ``(N,)`` labels, ``index`` the batch's ``(B,)`` indices into it, ``generator`` on
    their device.

    One ``(B, N)`` draw of uniform scores: the negatives are the ``topk(K)`` over the other-class entries (the
    same-class ones set to -1, below every draw), the relax positive the arg-max over the same-class entries.
    K must not exceed the number of other-class samples of any batch member (the method checks it once)."""
    b, n = index.shape[0], labels.shape[0]
    same = labels.unsqueeze(0) == labels[index].unsqueeze(1)  # (B, N)
    u = torch.rand(b, n, generator=generator, device=labels.device)
    if mode == "exact":
        pos = index
    elif mode == "relax":
        pos = u.masked_fill(~same, -1.0).argmax(dim=1)
    else:
        raise ValueError(f"unknown CRD mode {mode!r}; use 'exact' or 'relax'")
    neg = u.masked_fill_(same, -1.0).topk(int(k), dim=1, sorted=False).indices
    return torch.cat([pos.reshape(b, 1).to(neg.dtype), neg], dim=1)


def contrast_scores(anchor: Tensor, memory: Tensor, contrast_idx: Tensor, t: float) -> Tensor:
    """Unnormalised scores ``exp(memory[J_ik] . anchor_i / t)``, ``(B, K+1)``, as
    ``ContrastMemory.forward`` computes them with ``index_select`` + ``bmm``; here one GEMM
    ``anchor @ memory^T`` (``B x N``) and a gather of the ``B x (K+1)`` dot products asked for (same dot
    products, another summation order). ``memory`` is a constant (no gradient); the gradient reaches
    ``anchor``."""
    dots = (anchor @ memory.detach().t()).gather(1, contrast_idx)
    return torch.exp(torch.div(dots, t))


def nce_loss(x: Tensor, n_data: int, eps: float = CRD_EPS) -> Tensor:
    """RepDistiller's ``ContrastLoss`` (the paper's eq. 18) of normalised scores ``x`` ``(B, K+1)``,
    column 0 the positive: with ``c = K / N`` (``m P_n``),
    ``-(1/B) [sum_i log(x_i0 / (x_i0 + c + eps)) + sum_{i, k >= 1} log(c / (x_ik + c + eps))]``. A 0-dim
    tensor (the official returns shape ``(1,)``)."""
    bsz, m = x.shape[0], x.shape[1] - 1
    c = m * (1 / float(n_data))
    p_pos = x[:, 0]
    log_d1 = torch.div(p_pos, p_pos.add(c + eps)).log()
    p_neg = x[:, 1:]
    log_d0 = torch.div(torch.full_like(p_neg, c), p_neg.add(c + eps)).log()
    return -(log_d1.sum() + log_d0.sum()) / bsz


def memory_update(memory: Tensor, index: Tensor, v: Tensor, momentum: float) -> Tensor:
    """``memory`` with rows ``index`` replaced by ``normalize(m memory[index] + (1 - m) v)`` (the official
    update, same operations in the same order), as a **new** tensor: the old one stays as autograd saw it."""
    with torch.no_grad():
        pos = torch.index_select(memory, 0, index)
        pos.mul_(momentum)
        pos.add_(torch.mul(v, 1 - momentum))
        return memory.index_copy(0, index, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))


def _memory_generator(seed: int) -> torch.Generator:
    """The CPU generator of the initial banks: ``Method.generator``'s formula at epoch -1, which no
    ``(epoch >= 0, step >= 0)`` of the same seed reaches; on the CPU, so the banks are the same on every
    device."""
    return torch.Generator().manual_seed((seed * 1_000_003 - 100_003 + 12345) & 0x7FFFFFFFFFFFFFFF)


class CRDHead(nn.Module):
    """CRD's trainable embeddings and its state: ``embed_s``, ``embed_t`` (:class:`Embed`), the buffers
    ``memory_s`` (official ``memory_v1``, updated with the student's embeddings), ``memory_t`` (``memory_v2``)
    and ``z = [Z_s, Z_t]`` (official ``params[2:4]``, -1 until the first batch sets them)."""

    def __init__(self, d_s: int, d_t: int, n_data: int, dim: int = CRD_FEAT_DIM, seed: int = 0):
        super().__init__()
        self.embed_s = Embed(d_s, dim)
        self.embed_t = Embed(d_t, dim)
        stdv = 1.0 / math.sqrt(dim / 3)
        g = _memory_generator(seed)
        self.register_buffer("memory_s", torch.rand(n_data, dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n_data, dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))

    @property
    def n_data(self) -> int:
        return int(self.memory_s.shape[0])


def crd_step(head: CRDHead, h_s: Tensor, h_t: Tensor, index: Tensor, contrast_idx: Tensor, t: float,
             momentum: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One step of RepDistiller's ``CRDLoss.forward``: ``(L_NCE(out_s), L_NCE(out_t))``, setting
    ``head.z`` on the first call and writing the updated banks into ``head``. fp32, autocast and TF32 off."""
    with fp32():
        z_s = head.embed_s(h_s.float())
        z_t = head.embed_t(h_t.detach().float())
        raw_s = contrast_scores(z_s, head.memory_t, contrast_idx, t)  # official out_v1
        raw_t = contrast_scores(z_t, head.memory_s, contrast_idx, t)  # official out_v2
        n = head.n_data
        with torch.no_grad():
            est = torch.stack([raw_s.detach().mean(), raw_t.detach().mean()]) * n
            zz = torch.where(head.z < 0, est, head.z)
            head.z.copy_(zz)
        loss_s = nce_loss(torch.div(raw_s, zz[0]), n)
        loss_t = nce_loss(torch.div(raw_t, zz[1]), n)
        head.memory_s = memory_update(head.memory_s, index, z_s.detach(), momentum)
        head.memory_t = memory_update(head.memory_t, index, z_t.detach(), momentum)
    return loss_s, loss_t


@register_method
class CRD(Method):
    """CRD as RepDistiller trains it (see the module docstring)."""

    name = "crd"
    summary = ("Tian et al. ICLR 2020 as RepDistiller codes it: w_ce*CE + beta*(NCE_s + NCE_t) against two "
               "N x 128 memories, K negatives of other classes")  # fmt: skip
    needs_teacher = True
    needs_student_features = True
    needs_teacher_features = True
    needs_indices = True
    hparams = {
        "beta": HParam(0.8, "weight of the CRD term NCE_s + NCE_t (RepDistiller's -b 0.8)", float, 0.0, None),
        "embed_dim": HParam(CRD_FEAT_DIM, "width of the two embeddings and of the memory rows (--feat_dim)",
                            int, 1, None),
        "nce_k": HParam(CRD_NCE_K, "negatives per sample, drawn from the other classes (--nce_k)", int, 1,
                        None),
        "nce_t": HParam(CRD_NCE_T, "temperature of the scores exp(m.z / T) (--nce_t)", float, 0.0, None,
                        low_open=True),
        "nce_m": HParam(CRD_NCE_M, "momentum of the memory update (--nce_m)", float, 0.0, 1.0),
        "mode": HParam("exact", "positive: the sample itself (exact) or a random one of its class (relax)",
                       str, choices=("exact", "relax")),
        "w_ce": W_CE,
    }  # fmt: skip

    def __init__(self, hp: dict[str, Any], ctx: MethodContext):
        super().__init__(hp, ctx)
        d_s, d_t = feature_sizes(ctx, "crd")
        if ctx.num_train is None or ctx.train_targets is None:
            raise ConfigError("crd needs the training split's size and labels (MethodContext.num_train, "
                              "train_targets) and each sample's index; the engine passes them for in-memory "
                              "data")  # fmt: skip
        n, k = int(ctx.num_train), int(hp["nce_k"])
        labels = ctx.train_targets
        if labels.shape != (n,):
            raise ConfigError(f"crd: train_targets has shape {tuple(labels.shape)}, not ({n},) (num_train)")
        counts = torch.bincount(labels.detach().long().cpu())
        fewest = n - int(counts.max()) if n else 0
        if k > fewest:
            big = int(counts.argmax()) if n else 0
            raise ConfigError(f"crd.nce_k={k} needs {k} negatives of other classes per sample, but the "
                              f"training split has {n} samples and class {big} leaves only {fewest} of other "
                              f"classes; set crd.nce_k <= {fewest}")  # fmt: skip
        self.labels = labels
        self.head = CRDHead(d_s, d_t, n, int(hp["embed_dim"]), ctx.seed)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"crd": self.head}

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        if out.student_features is None or out.teacher_features is None:
            raise ConfigError("crd needs the student's and the teacher's features; the engine must pass them")
        if out.indices is None:
            raise ConfigError("crd needs each sample's index into the training split; the engine passes none")
        index = out.indices.to(device=self.head.memory_s.device, dtype=torch.long)
        labels = self.labels.to(index.device)
        contrast_idx = contrast_indices(index, labels, self.hp["nce_k"], self.generator(out.epoch, out.step),
                                        self.hp["mode"])  # fmt: skip
        loss_s, loss_t = crd_step(self.head, out.student_features, out.teacher_features, index, contrast_idx,
                                  self.hp["nce_t"], self.hp["nce_m"])  # fmt: skip
        return with_ce({"crd": self.hp["beta"] * (loss_s + loss_t)}, out, self.hp["w_ce"])
