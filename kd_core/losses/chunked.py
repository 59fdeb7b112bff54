"""Token divergences computed in chunks of positions, so that peak memory holds no full ``B×T×V`` temporaries.

A dense divergence on ``[B, T, V]`` logits materialises several full-size float32 tensors (both
log-softmaxes, the element-wise terms, and the ones autograd saves for backward). Here the positions that
count (the response mask) are processed ``chunk_rows`` at a time: for each chunk the divergence *and its
gradient with respect to that chunk of student logits* are computed at once (``torch.autograd.grad`` on the
chunk), the gradient rows are written into one buffer of the student logits' shape, and backward only
scales that buffer by the incoming per-position gradient. This is exact because a position's divergence
depends on that position's logits only (the Jacobian is block diagonal), so values and gradients match the
unchunked computation (``tests/test_chunked_losses.py``). The same idea as Liger-Kernel's chunked losses,
in pure PyTorch; positions outside the mask (prompt, padding) are never computed at all.

Peak memory of the loss: the student and teacher logits (inputs), the gradient buffer (which backward
needs anyway), and O(chunk_rows × V) temporaries.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kd_core.losses.divergences import get_divergence
from kd_core.losses.tokens import logprobs, shared_vocab
from kd_core.losses.sparse import sparse_token_divergence

__all__ = ["CHUNK_ELEMENTS", "chunk_rows_for", "chunked_rows", "chunked_token_divergence", "chunked_sparse_divergence"]

# Elements (rows × vocabulary) per chunk: 4M fp32 = 16 MB per temporary; ~128 positions at V = 32k.
CHUNK_ELEMENTS = 1 << 22

RowFn = Callable[[Tensor, slice], Tensor]


def chunk_rows_for(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one ``[rows, V]`` temporary has about ``chunk_elements`` elements."""
    return max(1, chunk_elements // max(1, vocab_size))


class _ChunkedRows(torch.autograd.Function):
    """values[b, t] = row_fn(logits[b, t]) at the given positions (0 elsewhere), gradient computed per chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows_b: Tensor, rows_t: Tensor, row_fn: RowFn, chunk_rows: int) -> Tensor:
        dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32  # as the dense divergences
        values = torch.zeros(logits.shape[:-1], dtype=dtype, device=logits.device)
        grad = torch.zeros_like(logits) if ctx.needs_input_grad[0] else None
        for start in range(0, rows_b.numel(), chunk_rows):
            sl = slice(start, start + chunk_rows)
            b, t = rows_b[sl], rows_t[sl]
            with torch.enable_grad():
                x = logits[b, t].detach().requires_grad_(grad is not None)
                v = row_fn(x, sl)
                if grad is not None:
                    (g,) = torch.autograd.grad(v.sum(), x)
                    grad[b, t] = g
            values[b, t] = v.detach().to(dtype)
        ctx.grad = grad  # not save_for_backward: backward scales it in place (no second full-size tensor)
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("chunked divergence: backward called twice (retain_graph is not supported)")
        grad.mul_(grad_values.unsqueeze(-1).to(grad.dtype))
        return grad, None, None, None, None


def chunked_rows(logits: Tensor, mask: Tensor, row_fn: RowFn, chunk_rows: int | None = None) -> Tensor:
    """Apply a per-position function to ``logits[mask]`` in chunks: ``[B, T, V]``, ``[B, T]`` -> ``[B, T]``.

    ``row_fn(x, sl)`` gets the student rows ``x`` ``[n, V]`` of the chunk and ``sl``, the chunk's slice into
    the list of masked positions (row-major order, as ``mask.nonzero()``), to pick the matching teacher rows;
    it returns ``[n]``. Positions outside ``mask`` are 0 and get zero gradient.
    """
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape without vocab {tuple(logits.shape[:-1])}")
    rows_b, rows_t = mask.bool().nonzero(as_tuple=True)
    return _ChunkedRows.apply(logits, rows_b, rows_t, row_fn, chunk_rows or chunk_rows_for(logits.shape[-1]))


def chunked_token_divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, name: str,
                             temperature: float = 1.0, chunk_rows: int | None = None, **params: float) -> Tensor:
    """Chunked :func:`~kd_core.losses.tokens.token_divergence` on the masked positions.

    ``[B, T, V_s]`` (student, with grad), ``[B, T, V_t]`` (teacher, no grad), ``[B, T]`` -> ``[B, T]``, 0 off
    the mask. Same definition: :func:`shared_vocab`, both at ``temperature``, divergence ``name`` (fkl =
    KL(teacher || student)).
    """
    div = get_divergence(name)
    resolved = div.resolve_params(**params)
    rows_b, rows_t = mask.bool().nonzero(as_tuple=True)

    def row_fn(x: Tensor, sl: slice) -> Tensor:
        s, t = shared_vocab(x, teacher_logits[rows_b[sl], rows_t[sl]])
        return div.fn(logprobs(s, temperature), logprobs(t, temperature), **resolved)

    return chunked_rows(student_logits, mask, row_fn, chunk_rows)


def chunked_sparse_divergence(student_logits: Tensor, mask: Tensor, top_logprobs: Tensor, top_ids: Tensor,
                              tail: Tensor, name: str, temperature: float = 1.0, vocab_size: int | None = None,
                              chunk_rows: int | None = None, **params: float) -> Tensor:
    """Chunked :func:`~kd_core.losses.sparse.sparse_token_divergence` on the masked positions.

    student_logits ``[B, T, V_s]``, mask ``[B, T]`` with N true positions; the teacher's cached rows for those
    positions in row-major order: top_logprobs ``[N, k]``, top_ids ``[N, k]``, tail ``[N]`` -> ``[B, T]``.
    """
    n = int(mask.sum())
    if top_logprobs.shape[0] != n:
        raise ValueError(f"{top_logprobs.shape[0]} cached teacher rows for {n} masked positions")
    get_divergence(name).resolve_params(**params)  # unknown or out-of-range params fail before any work

    def row_fn(x: Tensor, sl: slice) -> Tensor:
        return sparse_token_divergence(x, top_logprobs[sl], top_ids[sl], tail[sl], name, temperature=temperature,
                                       vocab_size=vocab_size, **params)

    return chunked_rows(student_logits, mask, row_fn, chunk_rows)
