"""Per-position objectives that are not a registered divergence, computed like the divergences are: in chunks of
positions from the student's logits (:func:`kd_core.losses.chunked.chunked_rows`), or from the models' last hidden
states and LM heads without the batch's logits (:func:`kd_core.losses.fused.fused_rows`). Values and gradients are
the same either way (``tests/test_methods_onpolicy_new.py``).

* :func:`pair_rows`: ``fn(student_logprobs, teacher_logprobs, rows)`` of both full next-token distributions at a
  temperature (the vocabulary shared by the two: ``V = min(V_s, V_t)``), e.g. the entropy-gated KL of
  ``entropy_aware_opd``.
* :func:`token_logprobs`: log softmax(z / T)[y] of given tokens over the first V logits (the sampled tokens of
  ``sampled_rkl``), for the student (with gradient) or the teacher (under no_grad).

Positions ``[B, T]`` (bool) index the unshifted rows (position t predicts token t + 1); outputs are ``[B, T]``,
0 off the positions, and ``fn`` gets rows in the row-major order of ``positions.nonzero()`` (``rows``: their slice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_core.losses.chunked import chunked_rows
from kd_core.losses.fused import fused_rows
from kd_core.losses.divergences import upcast
from kd_core.losses.tokens import logprobs

if TYPE_CHECKING:
    from kd_core.models.lm import HeadInputs

__all__ = ["pair_rows", "token_logprobs"]

PairFn = Callable[[Tensor, Tensor, slice], Tensor]  # (student lp [n, V], teacher lp [n, V], rows) -> [n]


def _sliced(head: HeadInputs, vocab: int | None) -> tuple[Tensor, Tensor | None]:
    """The head's first ``vocab`` rows (itself when it has no more or vocab is None: no full-size gradient copy)."""
    if vocab is None or head.weight.shape[0] == vocab:
        return head.weight, head.bias
    return head.weight[:vocab], None if head.bias is None else head.bias[:vocab]


def _placed(values: Tensor, positions: Tensor) -> Tensor:
    return values.new_zeros(positions.shape).masked_scatter(positions, values)


def _teacher_blocks(teacher: HeadInputs | Tensor, positions: Tensor, vocab: int) -> Callable[[slice], Tensor]:
    """The teacher's logits ``[rows, V]`` of a block of the positions' rows, without gradient: projected per block
    from its hidden states (in the autocast dtype when autocast is on), or sliced from its logits ``[B, T, V_t]``."""
    if isinstance(teacher, Tensor):
        rows_b, rows_t = positions.nonzero(as_tuple=True)
        logits = teacher.detach()
        return lambda blk: logits[rows_b[blk], rows_t[blk], :vocab]
    hidden = teacher.hidden.detach()[positions]
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    weight, bias = (t if t is None else t.detach().to(dtype) for t in _sliced(teacher, vocab))

    def block(blk: slice) -> Tensor:
        with torch.no_grad():
            return F.linear(hidden[blk].to(dtype), weight, bias)

    return block


def pair_rows(student: HeadInputs | Tensor, teacher: HeadInputs | Tensor, positions: Tensor, fn: PairFn,
              temperature: float = 1.0) -> Tensor:
    """``fn`` of the student's and the teacher's log-probs at ``temperature`` per position: ``[B, T]``.

    ``student``: its logits ``[B, T, V_s]`` (chunked) or its head inputs (fused); ``teacher``: its logits
    ``[B, T, V_t]`` or head inputs (no gradient reaches it). Both are sliced to ``V = min(V_s, V_t)``."""
    positions = positions.bool()
    s_vocab = student.shape[-1] if isinstance(student, Tensor) else student.weight.shape[0]
    t_vocab = teacher.shape[-1] if isinstance(teacher, Tensor) else teacher.weight.shape[0]
    vocab = min(s_vocab, t_vocab)
    teacher_block = _teacher_blocks(teacher, positions, vocab)
    if isinstance(student, Tensor):
        def chunk_fn(x: Tensor, sl: slice) -> Tensor:
            return fn(logprobs(x[..., :vocab], temperature), logprobs(teacher_block(sl), temperature), sl)

        return chunked_rows(student, positions, chunk_fn)

    def row_fn(x: Tensor, rows: slice, t: Tensor | None) -> Tensor:
        return fn(logprobs(x, temperature), logprobs(t, temperature), rows)

    weight, bias = _sliced(student, vocab)
    return _placed(fused_rows(student.hidden[positions], weight, bias, row_fn, block_fn=teacher_block), positions)


def token_logprobs(model_out: HeadInputs | Tensor, positions: Tensor, targets: Tensor, vocab: int | None,
                   temperature: float = 1.0) -> Tensor:
    """log softmax(z[:V] / T)[target] per position (``targets`` ``[B, T]``, ids < V at the positions; V = ``vocab``,
    None: all logits): ``[B, T]`` in fp32 (fp64 for fp64 logits), from the logits ``[B, T, V']`` (chunked) or the
    head inputs (fused); gradient as the caller's grad mode."""
    positions = positions.bool()
    flat = targets[positions]

    def logp(x: Tensor, rows: slice) -> Tensor:
        return -F.cross_entropy(upcast(x[..., :vocab]) / temperature, flat[rows], reduction="none")

    if isinstance(model_out, Tensor):
        return chunked_rows(model_out, positions, logp)
    weight, bias = _sliced(model_out, vocab)
    values = fused_rows(model_out.hidden[positions], weight, bias, lambda x, rows, _: logp(x, rows))
    return _placed(values, positions)
