"""The alignment of two tokenizations of one batch (cross-tokenizer distillation, :mod:`kd_core.losses.cross_tokenizer`):
G aligned *spans*, one pair of token runs per span, row by row, left to right.

* positional (ULD, Boizard et al. 2024): the i-th response token of each side, i < min(n_s, n_t) (one token per
  span): :func:`positional_alignment`.
* text (GOLD, TRL ``trl/experimental/gold``): tokens grouped into the shortest runs that end at the same byte of
  the response text on both sides: :func:`align_spans`, :func:`text_alignment`.

Positions index the unshifted logits: the logits at (b, t) predict token t + 1, so a response token at sequence
index j is predicted by position j − 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kd_core.data.tokenize import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "NOT_TEXT", "Prefix", "SpanAlignment", "positional_alignment", "align_spans",
           "text_alignment"]

NOT_TEXT = -1  # the text end of a token that is no text of the response (prompt, padding, EOS)


class Prefix(NamedTuple):
    """The earlier tokens of multi-token spans, M of them: logits positions ``b, t`` ``[M]`` predicting them, their
    ids ``token`` ``[M]`` and the index ``span`` ``[M]`` of the span they belong to."""

    b: Tensor
    t: Tensor
    token: Tensor
    span: Tensor


class SpanAlignment(NamedTuple):
    """G aligned spans: the logits position ``(student_b, student_t)`` ``[G]`` predicting each span's last student
    token, ``(teacher_b, teacher_t)`` the same for the teacher, and each side's :class:`Prefix`."""

    student_b: Tensor
    student_t: Tensor
    teacher_b: Tensor
    teacher_t: Tensor
    student_prefix: Prefix
    teacher_prefix: Prefix

    @property
    def num_spans(self) -> int:
        return int(self.student_b.numel())

    def student_mask(self, shape: torch.Size | tuple[int, int]) -> Tensor:
        """``[B, T_s]`` bool: the student logits positions that predict a span's last token."""
        mask = torch.zeros(shape, dtype=torch.bool, device=self.student_b.device)
        mask[self.student_b, self.student_t] = True
        return mask

    def per_position(self, values: Tensor, shape: torch.Size | tuple[int, int]) -> Tensor:
        """Span values ``[G]`` at their student positions: ``[B, T_s]``, 0 elsewhere (differentiable)."""
        out = torch.zeros(shape, dtype=values.dtype, device=values.device)
        return out.index_put((self.student_b, self.student_t), values)


def _response_positions(labels: Tensor) -> list[list[int]]:
    """Per row, the sequence indices j ≥ 1 of the response tokens (labels[j] != -100), in order."""
    rows = labels.detach().cpu()
    return [torch.nonzero(row[1:] != IGNORE_INDEX).flatten().add(1).tolist() for row in rows]


def _build(pairs: list[tuple[int, list[int], list[int]]], student_labels: Tensor, teacher_labels: Tensor
           ) -> SpanAlignment:
    """A :class:`SpanAlignment` from spans ``(row, student token indices, teacher token indices)`` (sequence
    indices, each run non-empty and increasing)."""
    device = student_labels.device
    sides = []
    for labels, which in ((student_labels, 1), (teacher_labels, 2)):
        ids = labels.detach().cpu()
        last_b, last_t, pb, pt, ptok, pspan = [], [], [], [], [], []
        for g, pair in enumerate(pairs):
            row, run = pair[0], pair[which]
            last_b.append(row)
            last_t.append(run[-1] - 1)
            for j in run[:-1]:
                pb.append(row)
                pt.append(j - 1)
                ptok.append(int(ids[row, j]))
                pspan.append(g)
        long = dict(dtype=torch.long, device=device)
        sides.append((torch.tensor(last_b, **long), torch.tensor(last_t, **long),
                      Prefix(*(torch.tensor(x, **long) for x in (pb, pt, ptok, pspan)))))
    (sb, st, sp), (tb, tt, tp) = sides
    return SpanAlignment(sb, st, tb, tt, sp, tp)


def positional_alignment(student_labels: Tensor, teacher_labels: Tensor, student_eos: int | None = None,
                         teacher_eos: int | None = None, skip_eos: bool = False) -> SpanAlignment:
    """ULD's alignment: the i-th response token of each side (``[B, T_s]`` / ``[B, T_t]`` labels), i < min(n_s, n_t),
    one token per span. ``skip_eos``: first drop each row's last response token when it is that side's EOS (every
    last token when the EOS id is None, as the ULD code does)."""
    if student_labels.shape[0] != teacher_labels.shape[0]:
        raise ValueError(f"student and teacher batches differ in rows ({student_labels.shape[0]} vs "
                         f"{teacher_labels.shape[0]})")
    pairs = []
    s_rows, t_rows = _response_positions(student_labels), _response_positions(teacher_labels)
    for row, (s, t) in enumerate(zip(s_rows, t_rows)):
        if skip_eos:
            s, t = _drop_eos(s, student_labels[row], student_eos), _drop_eos(t, teacher_labels[row], teacher_eos)
        pairs += [(row, [js], [jt]) for js, jt in zip(s, t)]
    return _build(pairs, student_labels, teacher_labels)


def _drop_eos(positions: list[int], labels: Tensor, eos: int | None) -> list[int]:
    if positions and (eos is None or int(labels[positions[-1]]) == eos):
        return positions[:-1]
    return positions


def align_spans(student_ends: list[int], teacher_ends: list[int]) -> list[tuple[int, int, int, int]]:
    """The shortest common spans of two tokenizations of one text, from each token's end offset (bytes or
    characters, non-decreasing; a decrease is clipped to the running maximum): half-open token ranges
    ``(s_start, s_stop, t_start, t_stop)``, in order.

    TRL GOLD's ``_align_by_byte_offsets``: walk both sides, advancing the one whose current token ends earlier;
    where both end at the same offset, close a span (one token more on each side). The tokens of a span therefore
    cover the same text on both sides. Tokens after the last common end (a side truncated earlier) are dropped
    (GOLD keeps them as a last span, which then covers different text on the two sides).

    >>> align_spans([3, 5, 9], [2, 5, 7, 9])
    [(0, 2, 0, 2), (2, 3, 2, 4)]
    """
    s_ends, t_ends = _running_max(student_ends), _running_max(teacher_ends)
    spans = []
    s = t = s_start = t_start = 0
    while s < len(s_ends) and t < len(t_ends):
        if s_ends[s] < t_ends[t]:
            s += 1
        elif s_ends[s] > t_ends[t]:
            t += 1
        else:
            s, t = s + 1, t + 1
            spans.append((s_start, s, t_start, t))
            s_start, t_start = s, t
    return spans


def _running_max(ends: list[int]) -> list[int]:
    out, top = [], None
    for e in ends:
        top = e if top is None else max(top, e)
        out.append(top)
    return out


def text_alignment(student_labels: Tensor, student_ends: Tensor, teacher_labels: Tensor, teacher_ends: Tensor,
                   skip_eos: bool = True) -> SpanAlignment:
    """GOLD's alignment of a paired batch: per row, the response tokens with a text end (``*_ends`` ``[B, T]``:
    the token's end offset in the response text, :data:`NOT_TEXT` elsewhere; see
    :func:`kd_core.data.paired.token_ends`) grouped by :func:`align_spans`. Unless ``skip_eos``, a row whose last
    response token is no text on both sides (the EOS) gets those two as one more span."""
    pairs = []
    s_rows, t_rows = _response_positions(student_labels), _response_positions(teacher_labels)
    s_end, t_end = student_ends.detach().cpu(), teacher_ends.detach().cpu()
    for row, (s_pos, t_pos) in enumerate(zip(s_rows, t_rows)):
        s_text = [j for j in s_pos if int(s_end[row, j]) != NOT_TEXT]
        t_text = [j for j in t_pos if int(t_end[row, j]) != NOT_TEXT]
        for s0, s1, t0, t1 in align_spans([int(s_end[row, j]) for j in s_text], [int(t_end[row, j]) for j in t_text]):
            pairs.append((row, s_text[s0:s1], t_text[t0:t1]))
        if not skip_eos and s_pos and t_pos and int(s_end[row, s_pos[-1]]) == NOT_TEXT \
                and int(t_end[row, t_pos[-1]]) == NOT_TEXT:
            pairs.append((row, [s_pos[-1]], [t_pos[-1]]))
    return _build(pairs, student_labels, teacher_labels)
