"""Losses between a teacher and a student that read the same text through different tokenizers: the alignment of
their tokens and the two objectives built on it (`uld`, `gold`; the methods are :mod:`kd_core.methods.uld` and
:mod:`kd_core.methods.gold`, the exact objectives docs/methods_offpolicy.md).

Conventions (as everywhere in :mod:`kd_core.losses`): p = teacher, q = student; logits are unshifted
``[B, T, V]``, the logits at position t predict token t + 1, so a response token at sequence index j is predicted
by position j − 1. Each side has its own batch (``[B, T_s]`` and ``[B, T_t]``, right padded, labels -100 off the
response) and its own vocabulary (V_s, V_t).

Alignment (:class:`SpanAlignment`, built in :mod:`kd_core.losses.alignment` and re-exported here): G aligned
*spans*, one pair of token runs per span (row by row, left to right). A span is compared through the distribution predicting its last token on each side; the earlier tokens
of a multi-token span enter through their log-probabilities (:class:`Prefix`, the chain rule below).

* positional (ULD, Boizard et al. 2024): the i-th response token of each side, i < min(n_s, n_t) (one token per
  span, no prefix): :func:`positional_alignment`.
* text (GOLD, TRL ``trl/experimental/gold``): tokens are grouped into the shortest runs that end at the same
  byte of the response text on both sides: :func:`align_spans`, :func:`text_alignment`.

Chain rule (TRL GOLD's ``uld_token_merge_strategy="bayesian"``): a span of tokens y_1 … y_k (k ≥ 1) at
temperature τ is the vector, over the vocabulary v,

    log m(v) = Σ_{i<k} log q_τ(y_i | y_<i) + log q_τ(v | y_<k)

(unnormalised: its mass is q_τ(y_1 … y_{k−1})). Both sides alike; a one-token span is the plain distribution.

Memory: every per-span value is computed in chunks of spans, each chunk's gradient with respect to the student
logits written into one buffer of the logits' shape (the scheme of :mod:`kd_core.losses.chunked`), so no
``G × V`` sort or gather of the whole batch is kept for backward.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from kd_core.losses.alignment import (NOT_TEXT, Prefix, SpanAlignment, align_spans, positional_alignment,
                                      text_alignment)
from kd_core.losses.chunked import chunk_rows_for
from kd_core.losses.divergences import get_divergence
from kd_core.losses.tokens import logprobs

__all__ = ["Prefix", "SpanAlignment", "positional_alignment", "align_spans", "text_alignment", "sorted_l1",
           "span_values", "prefix_logprobs", "uld_divergence", "VocabMatch", "match_vocabularies", "identity_match",
           "gold_divergence", "NOT_TEXT"]


# ----------------------------------------------------------------------------------------------- chunked spans
RowFn = Callable[[Tensor, Tensor, slice], Tensor]


class _SpanRows(torch.autograd.Function):
    """values[g] = row_fn(logits[b_g, t_g], offsets[g]) per span, gradients (to the logits rows and the offsets)
    computed chunk by chunk in forward; backward scales them by the incoming gradient (as `_ChunkedRows`)."""

    @staticmethod
    def forward(ctx, logits: Tensor, offsets: Tensor, rows_b: Tensor, rows_t: Tensor, row_fn: RowFn,
                chunk_rows: int) -> Tensor:
        dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
        values = torch.zeros(rows_b.numel(), dtype=dtype, device=logits.device)
        grad = torch.zeros_like(logits) if ctx.needs_input_grad[0] else None
        goff = torch.zeros_like(offsets) if ctx.needs_input_grad[1] else None
        for start in range(0, rows_b.numel(), chunk_rows):
            sl = slice(start, start + chunk_rows)
            b, t = rows_b[sl], rows_t[sl]
            with torch.enable_grad():
                x = logits[b, t].detach().requires_grad_(grad is not None)
                o = offsets[sl].detach().requires_grad_(goff is not None)
                v = row_fn(x, o, sl)
                wrt = [z for z in (x, o) if z.requires_grad]
                if wrt and v.requires_grad:
                    found = dict(zip(map(id, wrt), torch.autograd.grad(v.sum(), wrt, allow_unused=True)))
                    gx, go = found.get(id(x)), found.get(id(o))
                    if gx is not None:
                        grad[b, t] = gx.to(grad.dtype)
                    if go is not None:
                        goff[sl] = go.to(goff.dtype)
            values[sl] = v.detach().to(dtype)
        ctx.grad, ctx.goff = grad, goff
        ctx.save_for_backward(rows_b, rows_t)
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        rows_b, rows_t = ctx.saved_tensors
        grad, goff = ctx.grad, ctx.goff
        if getattr(ctx, "done", False):
            raise RuntimeError("cross-tokenizer span loss: backward called twice (retain_graph is not supported)")
        ctx.grad = ctx.goff = None
        ctx.done = True
        if grad is not None:
            scale = torch.zeros(grad.shape[:-1], dtype=grad.dtype, device=grad.device)
            scale[rows_b, rows_t] = grad_values.to(grad.dtype)
            grad.mul_(scale.unsqueeze(-1))
        if goff is not None:
            goff = goff * grad_values.to(goff.dtype)
        return grad, goff, None, None, None, None


def span_values(student_logits: Tensor, rows_b: Tensor, rows_t: Tensor, offsets: Tensor, row_fn: RowFn,
                chunk_rows: int | None = None, chunked: bool = True) -> Tensor:
    """``row_fn(x, o, sl)`` over G spans in chunks: ``x`` the student logits rows ``[n, V_s]`` at ``(rows_b, rows_t)``
    (``[G]`` each, distinct positions), ``o`` the chunk's ``offsets`` ``[n]``, ``sl`` its slice of the G spans (for
    the teacher's rows); returns ``[G]``, differentiable in the logits and the offsets. Gradients are exact (a
    span's value depends on its own row and offset only); one backward per forward. ``chunked=False``: one plain
    autograd graph over all spans instead (reentrant backward, ``G × V`` saved: for tests and gradcheck)."""
    if rows_b.numel() and (rows_b * student_logits.shape[1] + rows_t).unique().numel() != rows_b.numel():
        raise ValueError("span_values: two spans end at the same student position")
    if offsets.shape != rows_b.shape:
        raise ValueError(f"offsets {tuple(offsets.shape)} for {rows_b.numel()} spans")
    if not chunked:
        return row_fn(student_logits[rows_b, rows_t], offsets, slice(None))
    return _SpanRows.apply(student_logits, offsets, rows_b, rows_t, row_fn,
                           chunk_rows or chunk_rows_for(student_logits.shape[-1]))


def prefix_logprobs(logits: Tensor, prefix: Prefix, num_spans: int, temperature: float = 1.0,
                    vocab_size: int | None = None) -> Tensor:
    """Σ of the prefix tokens' log-probabilities per span, ``[G]`` (0 for one-token spans): log q_τ(y_i | y_<i)
    read from ``logits`` ``[B, T, V]`` (sliced to ``vocab_size``) at the prefix positions. Differentiable when the
    logits are (run it under ``no_grad`` for the teacher)."""
    out = torch.zeros(num_spans, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                      device=logits.device)
    vocab = vocab_size or logits.shape[-1]
    step = chunk_rows_for(vocab)
    for start in range(0, prefix.b.numel(), step):
        sl = slice(start, start + step)
        rows = logprobs(logits[prefix.b[sl], prefix.t[sl], :vocab], temperature)
        out = out.index_add(0, prefix.span[sl], rows.gather(-1, prefix.token[sl, None]).squeeze(-1).to(out.dtype))
    return out


# ----------------------------------------------------------------------------------------------- ULD
def sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """ULD's Wasserstein-1 between two distributions over different vocabularies: Σ_i |q_(i) − p_(i)|, both sorted in
    decreasing order, the shorter padded with zeros. ``[..., V_s]``, ``[..., V_t]`` -> ``[...]``."""
    q = student_probs.sort(dim=-1, descending=True).values
    p = teacher_probs.sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    return (q - p.to(q.dtype)).abs().sum(-1)


def uld_divergence(student_logits: Tensor, teacher_logits: Tensor, alignment: SpanAlignment, temperature: float = 1.0,
                   student_vocab: int | None = None, teacher_vocab: int | None = None,
                   chunk_rows: int | None = None, chunked: bool = True) -> Tensor:
    """ULD per span ``[G]``: :func:`sorted_l1` of softmax(student / τ) and softmax(teacher / τ) at each span's
    positions (``alignment``: one token per span, :func:`positional_alignment`). Logits ``[B, T_s, V_s]`` (grad),
    ``[B, T_t, V_t]`` (no grad), each sliced to its tokenizer's vocabulary (``*_vocab``: padded rows dropped)."""
    vs, vt = student_vocab or student_logits.shape[-1], teacher_vocab or teacher_logits.shape[-1]
    tb, tt = alignment.teacher_b, alignment.teacher_t

    def row_fn(x: Tensor, o: Tensor, sl: slice) -> Tensor:
        teacher = logprobs(teacher_logits[tb[sl], tt[sl], :vt], temperature).exp()
        return sorted_l1(logprobs(x[:, :vs], temperature).exp(), teacher)

    offsets = torch.zeros(alignment.num_spans, dtype=student_logits.dtype, device=student_logits.device)
    return span_values(student_logits, alignment.student_b, alignment.student_t, offsets, row_fn, chunk_rows, chunked)


# ----------------------------------------------------------------------------------------------- GOLD
class VocabMatch(NamedTuple):
    """The tokens two vocabularies share exactly (same token string): ``student_ids`` / ``teacher_ids`` ``[K]``
    (pairs, by increasing teacher id), the other ids of each side (``student_rest``, ``teacher_rest``), and GOLD's
    adaptive weight of the shared part, K / V_t. ``identity``: one vocabulary (every id matched to itself)."""

    student_ids: Tensor
    teacher_ids: Tensor
    student_rest: Tensor
    teacher_rest: Tensor
    adaptive_weight: float
    identity: bool = False

    def to(self, device) -> VocabMatch:
        return VocabMatch(*(x.to(device) for x in self[:4]), self.adaptive_weight, self.identity)


def match_vocabularies(student_vocab: dict[str, int], teacher_vocab: dict[str, int], student_size: int,
                       teacher_size: int) -> VocabMatch:
    """GOLD's vocabulary mapping (``ULDLoss._initialize_vocabulary_mapping``): a teacher token whose string is also
    a student token is matched to it; ids at or beyond ``*_size`` (the vocabulary kept) are left out."""
    pairs = sorted((t_id, student_vocab[tok]) for tok, t_id in teacher_vocab.items()
                   if tok in student_vocab and t_id < teacher_size and student_vocab[tok] < student_size)
    t_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    s_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
    identity = student_size == teacher_size == len(pairs) and bool((t_ids == s_ids).all())
    return VocabMatch(s_ids, t_ids, _rest(s_ids, student_size), _rest(t_ids, teacher_size),
                      len(pairs) / max(1, teacher_size), identity)


def identity_match(size: int) -> VocabMatch:
    """One vocabulary of ``size`` tokens on both sides."""
    ids = torch.arange(size)
    return VocabMatch(ids, ids, _rest(ids, size), _rest(ids, size), 1.0, True)


def _rest(ids: Tensor, size: int) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().flatten()


def gold_divergence(student_logits: Tensor, teacher_logits: Tensor, alignment: SpanAlignment, match: VocabMatch,
                    name: str = "jsd", temperature: float = 1.0, matched_weight: float | None = None,
                    unmatched_weight: float | None = None, student_vocab: int | None = None,
                    teacher_vocab: int | None = None, chunk_rows: int | None = None, chunked: bool = True,
                    hybrid: bool = True, **params: float) -> Tensor:
    """GOLD's hybrid term per span ``[G]`` on the chain-rule span vectors m_q (student) and m_p (teacher) (see the
    module docstring; logits ``[B, T_s, V_s]`` with grad, ``[B, T_t, V_t]`` without, each sliced to ``*_vocab``):

        w_m · D(m_p[shared] || m_q[shared]) + w_u · sorted_l1(m_q[rest_s], m_p[rest_t])

    D is the registered divergence ``name`` (``params``) taken on the log-vectors restricted to the shared tokens as
    they are (not renormalised, as GOLD), the ``rest`` the ids of each side outside the shared ones (the L1 part is
    left out when either side has none). w_m = ``matched_weight``, w_u = ``unmatched_weight``; None: GOLD's adaptive
    w_m = K / V_t, w_u = 1 − w_m. A term whose weight is 0 is not computed. ``hybrid=False`` (GOLD without
    ``uld_use_hybrid_loss``): sorted_l1(m_q, m_p) over the whole vocabularies instead (the weights unused)."""
    div = get_divergence(name)
    resolved = div.resolve_params(**params)
    vs, vt = student_vocab or student_logits.shape[-1], teacher_vocab or teacher_logits.shape[-1]
    w_m = match.adaptive_weight if matched_weight is None else float(matched_weight)
    w_u = 1.0 - match.adaptive_weight if unmatched_weight is None else float(unmatched_weight)
    match = match.to(student_logits.device)
    g = alignment.num_spans
    s_off = prefix_logprobs(student_logits, alignment.student_prefix, g, temperature, vs)
    with torch.no_grad():
        t_off = prefix_logprobs(teacher_logits, alignment.teacher_prefix, g, temperature, vt)
    tb, tt = alignment.teacher_b, alignment.teacher_t
    use_shared = hybrid and w_m != 0 and match.student_ids.numel() > 0
    use_rest = hybrid and w_u != 0 and match.student_rest.numel() > 0 and match.teacher_rest.numel() > 0

    def row_fn(x: Tensor, o: Tensor, sl: slice) -> Tensor:
        lq = logprobs(x[:, :vs], temperature) + o.unsqueeze(-1).to(torch.promote_types(o.dtype, torch.float32))
        lp = logprobs(teacher_logits[tb[sl], tt[sl], :vt], temperature) + t_off[sl].unsqueeze(-1)
        if not hybrid:
            return sorted_l1(lq.exp(), lp.exp())
        out = torch.zeros(x.shape[0], dtype=lq.dtype, device=x.device)
        if use_shared:
            if match.identity:
                out = out + w_m * div.fn(lq, lp.to(lq.dtype), **resolved)
            else:
                out = out + w_m * div.fn(lq[:, match.student_ids], lp[:, match.teacher_ids].to(lq.dtype), **resolved)
        if use_rest:
            out = out + w_u * sorted_l1(lq[:, match.student_rest].exp(), lp[:, match.teacher_rest].exp())
        return out

    return span_values(student_logits, alignment.student_b, alignment.student_t, s_off, row_fn, chunk_rows, chunked)
