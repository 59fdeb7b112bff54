"""Per-token objectives on the student's own samples (`sampled_rkl`, `entropy_aware_opd`): p = teacher, q = student.

Sampled-token reverse KL (Schulman, "Approximating KL divergence", 2020). A token y ~ q(·|c) of the student's
sample, its log-ratio r = log p(y|c) - log q(y|c); both estimators are unbiased for KL(q || p) at context c:

    k1 = -r                       E_q[k1] = KL(q || p)   (can be negative per token)
    k3 = (e^r - 1) - r            E_q[k3] = KL(q || p)   (>= 0 per token, lower variance; TorchRL's DistillationLoss)

Gradient (:func:`sampled_rkl_loss`): the score-function (REINFORCE) estimator g = sg(k1) · grad log q(y|c),
whose expectation over y ~ q is exactly grad KL(q(·|c) || p(·|c)) (sum_y q (log q - log p) grad log q, plus
E_q[grad log q] = 0): the per-token policy gradient with reward r and no discount used for on-policy
distillation (Thinking Machines' "On-Policy Distillation", 2025; Tinker: advantage = -(log q - log p)). It is
also the exact gradient of E_q[k3] (score term sg(k3) grad log q plus the pathwise term (1 - e^r) grad log q, whose
sum is k1 grad log q), so k1 and k3 give the same gradient per sample and differ only in the value reported.
Not used: differentiating k3 through log q only (TorchRL's DistillationLoss), whose expectation is
sum_y (q - p) grad log q = grad KL(p || q), the *forward* KL's gradient; nor k1 that way (expectation 0).
The context c (the sampled prefix) is held fixed: the sampling distribution of the prefix is not differentiated.
A sampled token the teacher gives probability 0 (log p(y|c) = -inf, a masked teacher logit) makes KL(q || p)
infinite and the surrogate NaN (k = +inf, inf · 0 in the gradient term): :func:`sampled_rkl_loss` raises
:class:`kd_core.errors.TeacherSupportError` naming the token instead (no finite value would be the KL).

Entropy-aware on-policy distillation (Jin et al. 2026, arXiv:2603.07079, "EOPD"): per position,

    l_t = KL(q_t || p_t) + 1{H(p_t) > h} · KL(p_t || q_t)        H(p) = -sum_v p_v log p_v  (nats)

with the full next-token distributions (:func:`entropy_gated_kl`); the gate carries no gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kd_core.errors import TeacherSupportError
from kd_core.losses.divergences import _weighted_kl, rkl, upcast

__all__ = ["ESTIMATORS", "check_teacher_support", "sampled_kl_value", "sampled_rkl_loss", "entropy", "entropy_gated_kl"]

ESTIMATORS = ("k1", "k3")
_NEG_INF = float("-inf")


def sampled_kl_value(log_ratio: Tensor, estimator: str) -> Tensor:
    """k1 = -r or k3 = (e^r - 1) - r from r = log p(y) - log q(y) (any shape)."""
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown estimator {estimator!r} (allowed: {', '.join(ESTIMATORS)})")


def sampled_rkl_loss(student_logq: Tensor, teacher_logp: Tensor, estimator: str = "k3",
                     tokens: Tensor | None = None, decode: Callable[[int], str] | None = None) -> Tensor:
    """Per sampled token: value ``k`` (k1 or k3 of r = log p(y) - log q(y)), gradient ``k1 · grad log q(y)``
    (module docstring), i.e. ``sg(k) + sg(k1) · (log q - sg(log q))``. ``[...]``, ``[...]`` -> ``[...]``; the
    teacher's log-probs carry no gradient. A teacher log-prob of -inf raises :class:`TeacherSupportError` naming
    its index and, given ``tokens`` (the sampled ids, same shape) and ``decode``, the token."""
    check_teacher_support(teacher_logp, tokens, decode)
    lq = upcast(student_logq)
    r = (upcast(teacher_logp) - lq).detach()
    return sampled_kl_value(r, estimator) - r * (lq - lq.detach())


def check_teacher_support(teacher_logp: Tensor, tokens: Tensor | None = None,
                          decode: Callable[[int], str] | None = None) -> None:
    """Raise :class:`TeacherSupportError` if the teacher gives a sampled token probability 0 (log-prob -inf):
    there KL(q || p) = +inf and the sampled estimator's value and gradient are NaN."""
    zero = torch.isneginf(teacher_logp.detach())
    if not bool(zero.any()):
        return
    index = tuple(int(i) for i in zero.nonzero()[0])
    where = f"at index {list(index)} of the sampled tokens"
    what = "a sampled token"
    if tokens is not None:
        token = int(tokens[index])
        shown = f" ({decode(token)!r})" if decode is not None else ""
        what = f"the sampled token {token}{shown}"
    raise TeacherSupportError(
        f"the teacher gives {what} probability 0 (log-prob -inf) {where}, {int(zero.sum())} such token(s) in the "
        "batch: the reverse KL KL(student || teacher) is infinite there and its sampled estimate NaN; the teacher "
        "masks a token the student can sample: mask it in the student as well, or distill with a divergence "
        "that stays finite there (e.g. kd with jsd)")


def entropy(logprobs_: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v over the last dim, 0 log 0 = 0 (``-inf`` log-probs add nothing): ``[..., V]`` -> ``[...]``."""
    lp = upcast(logprobs_)
    return -torch.where(lp > _NEG_INF, lp.exp() * lp, 0.0).sum(-1)


def entropy_gated_kl(student_logprobs: Tensor, teacher_logprobs: Tensor,
                     threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """The parts of ``l = KL(q || p) + 1{H(p) > threshold} · KL(p || q)`` per position: (``KL(q || p)``, the gated
    ``KL(p || q)``, ``H(p)`` without gradient); ``[..., V]``, ``[..., V]`` -> three ``[...]``. Where the gate is off
    the forward KL is left out (exactly 0 with zero gradient, also where it would be infinite)."""
    lq, lp = upcast(student_logprobs), upcast(teacher_logprobs)
    with torch.no_grad():
        h = entropy(lp)
    return rkl(lq, lp), _weighted_kl((h > float(threshold)).to(lq.dtype), lp, lq), h
