"""Divergences against a sparse teacher: its top-k log-probabilities plus one tail bucket.

The teacher-logit cache (:mod:`kd_core.teachers.cache`) keeps, per response token, the teacher's k most likely
tokens K with their log-probabilities log p_v (v in K) at temperature tau, and the log of the remaining mass
log P_tail = log sum_{v not in K} p_v. A divergence is then computed between the two *coarsened*
distributions over k + 1 categories, the k tokens and the tail bucket::

    p~ = (p_v for v in K, P_tail)          p = teacher
    q~ = (q_v for v in K, Q_tail)          q = student,  Q_tail = 1 - sum_K q_v = sum_{v not in K} q_v

and D(p~ || q~) is any registered divergence (:mod:`kd_core.losses.divergences`) applied to those
(k + 1)-vectors: ``fkl`` = KL(p~ || q~) (forward), ``rkl`` = KL(q~ || p~) (reverse), ``jsd`` (beta), ...

Exactness and error at k < V (p_bar, q_bar: p and q renormalised on the tail, P = P_tail, Q = Q_tail)
-------------------------------------------------------------------------------------------------
* k = V: the tail is empty (P = Q = 0, log-mass -inf) and every divergence equals the dense one.
* For f-divergences (fkl, rkl, jsd, tvd, skl, srkl) coarsening can only lose information (data processing
  inequality), so 0 <= D(p || q) - D(p~ || q~), and the chain rule of KL gives the error in closed form::

      FKL:  KL(p || q) - KL(p~ || q~) = P * KL(p_bar || q_bar)  <=  P * max_{v in tail} log(p_v Q / (q_v P))
      RKL:  KL(q || p) - KL(q~ || p~) = Q * KL(q_bar || p_bar)
      JSD_beta (0 < beta < 1):  0 <= error <= beta log(1/beta) * P + (1 - beta) log(1/(1 - beta)) * Q

  (JSD: JSD_beta = sum_v g(p_v, q_v) with g(a, b) = beta a log(a/m) + (1 - beta) b log(b/m), m = beta a +
  (1 - beta) b; g >= 0 is jointly convex and 1-homogeneous, so g(P, Q) <= sum_tail g(p_v, q_v), and
  a/m <= 1/beta, b/m <= 1/(1 - beta) bound each tail term.) ``akl`` ranks the k + 1 categories; at k < V it
  is an approximation without such a bound. ``abkd`` is an f-divergence (Amari's alpha-divergence) only when
  alpha + beta = 1, where the data-processing bound 0 <= D - D~ holds; otherwise its terms are homogeneous of
  degree alpha + beta, not 1, and at k < V it is an approximation without a bound (with alpha + beta > 1 the
  coarsened value can exceed the dense one; exact at k = V, like all).

The gradient reaches the student through q_v (v in K) and Q_tail, i.e. through every logit.

ATKD needs the target token g as a category of its own: :func:`coarsen_with_target` (the choice made when g is
not among the cached tokens is documented there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kd_core.losses.divergences import upcast, get_divergence
from kd_core.losses.tokens import logprobs

__all__ = ["tail_logmass", "logmass_outside", "spread_tail", "coarsen_to", "top_k_with_tail", "coarsen_student",
           "coarsen_with_target", "sparse_divergence", "sparse_token_divergence"]

_NEG_INF = float("-inf")


def tail_logmass(logprobs_: Tensor, top_ids: Tensor) -> Tensor:
    """log sum_{v not in top_ids} exp(logprobs_v): ``[..., V]``, ``[..., k]`` (int64) -> ``[...]``.

    Computed as a log-sum-exp over the entries *outside* ``top_ids`` (never as log(1 - sum), which cancels
    catastrophically when the tail is small). An empty tail (k = V) gives -inf with zero, finite gradient.
    """
    return _logsumexp_or_neginf(logprobs_.scatter(-1, top_ids, _NEG_INF))


def logmass_outside(logprobs_: Tensor, inside: Tensor) -> Tensor:
    """:func:`tail_logmass` with the kept tokens given as a mask: ``[..., V]``, bool ``[..., V]`` -> ``[...]``."""
    return _logsumexp_or_neginf(logprobs_.masked_fill(inside, _NEG_INF))


def _logsumexp_or_neginf(rest: Tensor) -> Tensor:
    all_out = torch.isneginf(rest).all(-1, keepdim=True)  # k = V, or logits masked with -inf outside the top-k
    lse = rest.masked_fill(all_out, 0.0).logsumexp(-1)
    return lse.masked_fill(all_out.squeeze(-1), _NEG_INF)


def spread_tail(top_logprobs: Tensor, top_ids: Tensor, tail: Tensor, vocab_size: int) -> Tensor:
    """A cached teacher as a full distribution: its k cached log-probs, and the tail mass spread evenly over the
    other V - k tokens (log P_tail - log(V - k) each: the maximum-entropy completion, the estimate
    :func:`coarsen_with_target` takes for a target outside the top-k). ``[n, k]``, ``[n, k]``, ``[n]`` ->
    ``[n, V]``; exactly the teacher when k = V."""
    fill = upcast(tail) - math.log(max(vocab_size - top_ids.shape[-1], 1))
    full = fill.unsqueeze(-1).expand(*fill.shape, vocab_size)
    return full.scatter(-1, top_ids.long(), upcast(top_logprobs))


def coarsen_to(logprobs_: Tensor, inside: Tensor | None) -> Tensor:
    """A distribution coarsened to the tokens ``inside`` (each its own category) + one bucket for the rest:
    ``[n, V]``, bool ``[n, V]`` -> ``[n, V + 1]`` (log-probs, -inf off ``inside``, then the rest's log-mass);
    ``inside`` None: every token is a category, ``[n, V]`` as is. Categories empty for both distributions
    (-inf) add nothing to any divergence, so this equals the divergence on the k + 1 kept categories."""
    if inside is None:
        return logprobs_
    lp = upcast(logprobs_)
    return torch.cat([lp.masked_fill(~inside, _NEG_INF), logmass_outside(lp, inside).unsqueeze(-1)], dim=-1)


@torch.no_grad()
def top_k_with_tail(teacher_logprobs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's k most likely tokens: ``[..., V]`` log-probs -> (log-probs ``[..., k]`` in descending
    order, token ids ``[..., k]`` int64, tail log-mass ``[...]``). k is capped at V (k = V is exact)."""
    k = min(int(k), teacher_logprobs.shape[-1])
    top_lp, top_ids = upcast(teacher_logprobs).topk(k, dim=-1)
    return top_lp, top_ids, tail_logmass(upcast(teacher_logprobs), top_ids)


def coarsen_student(student_logprobs: Tensor, top_ids: Tensor) -> Tensor:
    """The student on the teacher's k + 1 categories: ``[..., V]``, ``[..., k]`` -> ``[..., k + 1]``
    (log q_v at the teacher's top-k ids, then log Q_tail)."""
    lq = upcast(student_logprobs)
    return torch.cat([lq.gather(-1, top_ids), tail_logmass(lq, top_ids).unsqueeze(-1)], dim=-1)


def coarsen_with_target(student_logprobs: Tensor | None, top_logprobs: Tensor, top_ids: Tensor, tail: Tensor,
                        targets: Tensor, vocab_size: int) -> tuple[Tensor | None, Tensor, Tensor]:
    """Teacher and student on k + 2 categories with the target token g as its own: for ATKD's target /
    non-target split (:func:`kd_core.losses.atkd.decompose`) on the cached teacher.

    Categories: the k cached tokens K, then a target slot, then the rest of the tail R = V − K − {g}.

    * g in K: g keeps its slot in K; the target slot is empty (log-prob -inf for both models) and R is the
      whole tail. Everything the decomposition uses about the teacher is then known: p_g exactly, and the
      non-target distribution coarsened to (p_v for v in K − {g}; P_tail).
    * g not in K: the teacher's p_g is not in the cache; all that is known is 0 <= p_g <= min(P_tail, p_min),
      p_min the smallest cached probability. It is taken as the tail's mean token mass,
      p^_g = P_tail / (V - k) (the maximum-entropy completion of the tail, always inside that interval), and
      R gets P_tail - p^_g. The error in p_g, and so in UNC = 1 - p_g, is at most min(P_tail, p_min).
    * The student is exact in every case: q_v (v in K), q_g, Q_R = sum over R, all from its full
      distribution.

    With k = V every target is in K and R is empty: the categories are the vocabulary (permuted) plus two
    empty ones, so every divergence, TKD, DKD and UNC equal the dense ones.

    Shapes: student_logprobs ``[n, V]`` (at the cache's temperature, sliced to ``vocab_size``; None for the
    teacher side only), top_logprobs / top_ids ``[n, k]``, tail ``[n]``, targets ``[n]`` (ids < V) ->
    (student ``[n, k + 2]`` or None, teacher ``[n, k + 2]``, target index ``[n]`` into the k + 2 categories).
    """
    top_ids = top_ids.long()
    k = top_ids.shape[-1]
    hit = top_ids.eq(targets.unsqueeze(-1))
    in_top = hit.any(-1)
    target_index = torch.where(in_top, hit.float().argmax(-1), k)
    tail = upcast(tail)
    outside = max(vocab_size - k, 1)  # (g outside K implies V - k >= 1)
    t_target = torch.where(in_top, _NEG_INF, tail - math.log(outside))
    t_rest = torch.where(in_top, tail, tail + math.log1p(-1.0 / outside) if outside > 1 else _NEG_INF)
    teacher = torch.cat([upcast(top_logprobs), t_target.unsqueeze(-1), t_rest.unsqueeze(-1)], dim=-1)
    if student_logprobs is None:
        return None, teacher, target_index
    lq = upcast(student_logprobs)
    q_target = torch.where(in_top, _NEG_INF, lq.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1))
    q_rest = tail_logmass(lq, torch.cat([top_ids, targets.long().unsqueeze(-1)], dim=-1))
    student = torch.cat([lq.gather(-1, top_ids), q_target.unsqueeze(-1), q_rest.unsqueeze(-1)], dim=-1)
    return student, teacher, target_index


def sparse_divergence(student_logprobs: Tensor, top_logprobs: Tensor, top_ids: Tensor, tail: Tensor, name: str,
                      **params: float) -> Tensor:
    """Divergence ``name`` between the coarsened teacher and student (see the module docstring).

    student_logprobs ``[..., V]`` (already at the temperature), top_logprobs ``[..., k]``, top_ids ``[..., k]``
    (int), tail ``[...]`` (teacher's tail log-mass) -> ``[...]``. Argument order of the divergence as in
    :mod:`kd_core.losses.divergences`: student first, teacher second (fkl = KL(teacher || student)).
    """
    teacher = torch.cat([upcast(top_logprobs), upcast(tail).unsqueeze(-1)], dim=-1)
    return get_divergence(name)(coarsen_student(student_logprobs, top_ids.long()), teacher, **params)


def sparse_token_divergence(student_logits: Tensor, top_logprobs: Tensor, top_ids: Tensor, tail: Tensor, name: str,
                            temperature: float = 1.0, vocab_size: int | None = None, **params: float) -> Tensor:
    """Per-position sparse divergence from student logits ``[..., V_s]`` -> ``[...]``.

    The student is sliced to ``vocab_size`` (the vocabulary the teacher's log-probs were normalised over: the
    shared vocabulary of teacher and student, see :func:`~kd_core.losses.tokens.shared_vocab`), then
    log-softmaxed at ``temperature``; the teacher's cached values are already at that temperature.
    """
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    return sparse_divergence(logprobs(student_logits, temperature), top_logprobs, top_ids, tail, name, **params)
