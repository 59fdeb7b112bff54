"""Intermediate-representation losses: hidden-state matching and attention-map matching.

Conventions (shared with :mod:`kd_core.losses.divergences`): ``p`` / ``A_t`` is the **teacher**, ``q`` /
``A_s`` the **student``.  Everything here is a pure function over tensors; the method
(:mod:`kd_core.methods.intermediate`) runs the models, owns the projections and does the weighting.

Layer indexing
--------------
Layers are numbered like ``output_hidden_states``: ``0`` is the embedding output and ``l`` (1..L) is the
output of decoder block ``l`` (``hidden_states[l]``; in GPT-2 and Llama the last entry has the final norm
applied).  The attention map of layer ``l >= 1`` is ``attentions[l - 1]`` (the softmax of block ``l``);
layer 0 has no attention map, so pairs with a 0 are skipped by the attention term.

Reductions
----------
Per-position values ``[B, T]`` are reduced by :func:`scaled_position_mean`: the mean over the selected
positions of the micro-batch, scaled by that micro-batch's share of the accumulated batch's response tokens
(``n_resp_local / num_items``).  Summed over the micro-batches of one optimizer step this is the average of
the micro-batch means weighted by their response-token counts; when the positions are the response positions
it is exactly ``sum / num_items``, the same token mean as the logit terms.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_core.losses.divergences import upcast, get_divergence

__all__ = [
    "uniform_pairs",
    "last_k_pairs",
    "resolve_layer_map",
    "hidden_state_loss",
    "attention_logprobs",
    "attention_divergence",
    "scaled_position_mean",
]

_NEG_INF = float("-inf")
_TINY = 1e-30  # floor for attention probabilities that underflowed to 0 in only one of the two maps


# --------------------------------------------------------------------------- layer maps


def uniform_pairs(n_student: int, n_teacher: int, include_embeddings: bool = False) -> list[tuple[int, int]]:
    """Student block ``i`` (1..L_s) <-> teacher block ``round(i * L_t / L_s)`` (at least 1).

    The last student layer always meets the last teacher layer; ``L_s = L_t`` gives the identity map.
    With ``include_embeddings`` the pair ``(0, 0)`` (embedding outputs) comes first.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"need at least one layer in each model (student {n_student}, teacher {n_teacher})")
    pairs = [(0, 0)] if include_embeddings else []
    for i in range(1, n_student + 1):
        pairs.append((i, max(1, math.floor(i * n_teacher / n_student + 0.5))))
    return pairs


def last_k_pairs(n_student: int, n_teacher: int, k: int) -> list[tuple[int, int]]:
    """The last ``k`` student blocks <-> the last ``k`` teacher blocks, in order (shallowest first)."""
    if not 1 <= k <= min(n_student, n_teacher):
        raise ValueError(f"last_k={k} must be in [1, {min(n_student, n_teacher)}] "
                         f"(student {n_student} layers, teacher {n_teacher})")
    return [(n_student - j, n_teacher - j) for j in range(k - 1, -1, -1)]


def resolve_layer_map(layer_map: str | Sequence[Sequence[int]], n_student: int, n_teacher: int, *,
                      last_k: int = 1, include_embeddings: bool = False) -> list[tuple[int, int]]:
    """``"uniform"`` | ``"last_k"`` | an explicit list of ``(student_layer, teacher_layer)``.

    Explicit indices follow the module convention (0 = embeddings, l = block l); negative indices count from
    the end like Python (``-1`` = last block).  Out-of-range indices are a ``ValueError``.
    """
    if isinstance(layer_map, str):
        if layer_map == "uniform":
            return uniform_pairs(n_student, n_teacher, include_embeddings)
        if layer_map == "last_k":
            pairs = last_k_pairs(n_student, n_teacher, last_k)
            return ([(0, 0)] if include_embeddings else []) + pairs
        raise ValueError(f"unknown layer_map {layer_map!r} (allowed: uniform, last_k, or a list of pairs)")
    pairs = []
    for pair in layer_map:
        if len(pair) != 2:
            raise ValueError(f"layer_map entry {list(pair)} is not a (student_layer, teacher_layer) pair")
        s, t = (int(x) for x in pair)
        s_res = s + n_student + 1 if s < 0 else s
        t_res = t + n_teacher + 1 if t < 0 else t
        if not 0 <= s_res <= n_student:
            raise ValueError(f"layer_map: student layer {s} out of range (student has {n_student} layers)")
        if not 0 <= t_res <= n_teacher:
            raise ValueError(f"layer_map: teacher layer {t} out of range (teacher has {n_teacher} layers)")
        pairs.append((s_res, t_res))
    if not pairs:
        raise ValueError("layer_map: the explicit list is empty")
    return pairs


# --------------------------------------------------------------------------- hidden states


def hidden_state_loss(student_h: Tensor, teacher_h: Tensor, kind: Literal["mse", "cosine"] = "mse") -> Tensor:
    """Per-position distance between (already projected) student and teacher hidden states.

    ``[B, T, D]``, ``[B, T, D]`` -> ``[B, T]`` in fp32:

    * ``mse``: ``mean_d (h_s - h_t)^2`` (the mean over the hidden dimension, as DistillKit's ``hs_mse``),
    * ``cosine``: ``1 - cos(h_s, h_t)``.
    """
    if student_h.shape != teacher_h.shape:
        raise ValueError(f"hidden shapes differ: student {tuple(student_h.shape)} vs teacher {tuple(teacher_h.shape)} "
                         "(project the student first)")
    hs, ht = upcast(student_h), upcast(teacher_h)
    if kind == "mse":
        return (hs - ht).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
    raise ValueError(f"unknown hidden_loss {kind!r} (allowed: mse, cosine)")


# --------------------------------------------------------------------------- attention maps


def attention_logprobs(student_attn: Tensor, teacher_attn: Tensor, heads: Literal["auto", "mean"] = "auto"
                       ) -> tuple[Tensor, Tensor]:
    """Log attention distributions over key positions for a matched layer pair.

    ``[B, H_s, T, T]``, ``[B, H_t, T, T]`` (softmax outputs) -> two ``[B, H, T, T]`` log-prob tensors with
    ``H = H_s = H_t`` (per-head) or ``H = 1`` (head-averaged maps, used when ``heads="mean"`` or the head
    counts differ).  Keys with probability 0 in **both** maps (causal / padding masked) get ``-inf`` in both
    and so contribute nothing; a probability that is 0 in only one map (fp underflow) is floored at 1e-30 so
    that the divergence stays finite.
    """
    a_s, a_t = upcast(student_attn), upcast(teacher_attn)
    if a_s.shape[-2:] != a_t.shape[-2:] or a_s.shape[0] != a_t.shape[0]:
        raise ValueError(f"attention shapes differ: {tuple(a_s.shape)} vs {tuple(a_t.shape)}")
    if heads == "mean" or a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    elif heads != "auto":
        raise ValueError(f"unknown attention heads mode {heads!r} (allowed: auto, mean)")
    support = (a_s > 0) | (a_t > 0)
    ls = torch.where(support, a_s.clamp_min(_TINY).log(), _NEG_INF)
    lt = torch.where(support, a_t.clamp_min(_TINY).log(), _NEG_INF)
    return ls, lt


def attention_divergence(student_attn: Tensor, teacher_attn: Tensor, *, divergence: str = "rkl",
                         heads: Literal["auto", "mean"] = "auto", **div_params: float) -> Tensor:
    """Per-query divergence between attention maps, averaged over heads: ``[B, H_s, T, T]``,
    ``[B, H_t, T, T]`` -> ``[B, T]``.

    ``divergence`` is any registered token divergence applied over the key axis with the teacher map as
    ``p`` and the student map as ``q``.  The default ``rkl`` is ``KL(A_s || A_t)``, the source's
    direction (large-to-small notes: ``L_attention = (1/N_heads) sum_j D_KL(A_student^(j) || A_teacher^(j))``);
    ``fkl`` is ``KL(A_t || A_s)`` (MiniLM's direction).  Per query position t and head h::

        rkl:  sum_k A_s[h, t, k] log(A_s[h, t, k] / A_t[h, t, k])
        fkl:  sum_k A_t[h, t, k] log(A_t[h, t, k] / A_s[h, t, k])

    then the mean over the H heads (or one head-averaged map, see :func:`attention_logprobs`).
    """
    ls, lt = attention_logprobs(student_attn, teacher_attn, heads)
    per = get_divergence(divergence)(ls, lt, **div_params)  # [B, H, T]
    return per.mean(1)


# --------------------------------------------------------------------------- reduction


def scaled_position_mean(per_pos: Tensor, positions: Tensor, n_resp_local: Tensor | int,
                         num_items: Tensor | int) -> Tensor:
    """``mean_{positions}(per_pos) * n_resp_local / num_items`` -> scalar (see module docstring).

    ``positions`` is a bool ``[B, T]`` mask; unselected values (even NaN/inf) never leak in.
    """
    keep = positions.bool()
    total = torch.where(keep, per_pos, torch.zeros((), dtype=per_pos.dtype, device=per_pos.device)).sum()
    count = keep.sum().to(per_pos.dtype).clamp_min(1.0)
    n_local = torch.as_tensor(n_resp_local, dtype=per_pos.dtype, device=per_pos.device)
    denom = torch.as_tensor(num_items, dtype=per_pos.dtype, device=per_pos.device).clamp_min(1.0)
    return total / count * (n_local / denom)
