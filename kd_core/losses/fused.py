"""Divergences from the LM heads' inputs: hidden states and head weights in, the batch's logits never materialised.

The student's logits are ``z = h W^T + b``: ``h`` its last hidden states ``[N, H]`` (after the final norm, at the N
positions that count), ``W`` its LM-head weight ``[V, H]``, ``b`` an optional bias ``[V]``. A loss that is a sum of
per-position terms, ``values[i] = row_fn(z[i])``, is computed a block of rows at a time: the block's logits
``[R, V]`` are projected (one matmul; the teacher's block too), then, sub-chunk by sub-chunk, the values and their
gradient with respect to the logits ``G = d values / d z`` are taken with autograd through the ordinary row function
(the divergences of :mod:`kd_core.losses.divergences`, not re-derived), ``G`` overwriting the logits it came from;
the block's share of the parameter gradients follows by the chain rule of the projection::

    dL/dh[i] = s_i G_i W          dL/dW = sum_i s_i G_i^T h_i          dL/db = sum_i s_i G_i

with ``s_i = dL/dvalues[i]`` the incoming gradient. What exists at a time: the student's and the teacher's block
logits, the row function's temporaries on one sub-chunk, and the gradient buffers of ``h`` and ``W`` (which backward
returns anyway); never either model's ``[N, V]`` logits. Sizes: :func:`chunk_sizes`.

When the gradients are taken: by default in the forward pass, for ``s = 1`` (4 matmuls per block with a dense
teacher: student and teacher projections, ``G W``, ``G^T h``), and backward only scales them by ``s`` when ``s``
is the same for every position (a token sum or mean over the rows: ``reduce_tokens``, ``token_mean_scaled``).
Otherwise (per-position weights), and always with ``recompute=True``, backward recomputes each block's logits and
takes the gradient of ``sum_i s_i values[i]`` there (the standard recompute: 6 matmuls per block). Both are exact:
the Jacobian of the values is block diagonal over positions (``tests/test_fused_loss.py``: values and gradients
equal to the unfused loss of :mod:`kd_core.losses.chunked` for every registered divergence). Without grad mode
(evaluation) only the values are computed.

Divergence arguments as everywhere: p = teacher, q = student, ``fkl`` = KL(p || q) (forward), ``rkl`` = KL(q || p);
both distributions at ``temperature`` (no T^2 factor here; see :func:`kd_core.losses.tokens.temperature_factor`).
The teacher is its own hidden states and head (no gradient reaches it), its logits, or its cached top-k log-probs
+ tail log-mass (:mod:`kd_core.losses.sparse`). Logits are projected in the compute dtype (the autocast dtype when
autocast is on, else the inputs'), the divergence runs in fp32 (fp64 stays fp64), the gradients accumulate in fp32.
The teacher's vocabulary may carry padded rows beyond the student's: both heads are sliced to the shared
``V = min(V_s, V_t)`` rows (:func:`kd_core.losses.tokens.shared_vocab`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_core.losses.divergences import get_divergence
from kd_core.losses.sparse import sparse_token_divergence
from kd_core.losses.tokens import logprobs

__all__ = ["chunk_sizes", "fused_rows", "fused_token_divergence", "fused_logits_divergence", "fused_sparse_divergence",
           "fused_cross_entropy"]

RowFn = Callable[[Tensor, slice, "Tensor | None"], Tensor]
BlockFn = Callable[[slice], Tensor]

# Rows per block: the projections and gradient matmuls run on [block_rows, V] (on 2 CPU cores a [32, 576] x
# [576, 128k] matmul runs at ~60 % of the rate of a [128, 576] one), at most BLOCK_ELEMENTS logits per block. The
# row function runs on sub-chunks of ~SUB_ELEMENTS logits: its autograd temporaries (a handful of [sub_rows, V]
# tensors) are, with the student's and the teacher's block logits, what the loss holds besides the gradients.
BLOCK_ROWS = 128
BLOCK_ELEMENTS = 1 << 25
SUB_ELEMENTS = 1 << 20


def chunk_sizes(vocab_size: int) -> tuple[int, int]:
    """(block_rows, sub_rows) for a vocabulary of ``vocab_size``: see :data:`BLOCK_ROWS`."""
    block = max(1, min(BLOCK_ROWS, BLOCK_ELEMENTS // max(1, vocab_size)))
    return block, max(1, min(block, SUB_ELEMENTS // max(1, vocab_size)))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the model's own LM head would run in: autocast's when it is on, else the input's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _cast(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The head in the compute dtype (no copy when it already is), detached: gradients are taken by hand."""
    return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def _addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into an fp32 (or fp64) ``acc``; half-precision products are not rounded before the sum.

    Half-precision operands are cast up (on a GPU, ``torch.addmm(..., out_dtype=torch.float32)`` would avoid the
    copy of ``b``; not used: untested here)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Grads:
    """fp32 (fp64 for fp64 inputs) gradient buffers of hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]``; None
    for an input that needs none."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, ...]):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        zeros = lambda t, need: torch.zeros(t.shape, dtype=acc, device=t.device) if need else None  # noqa: E731
        self.h, self.w = zeros(hidden, needs[0]), zeros(weight, needs[1])
        self.b = zeros(bias, needs[2]) if bias is not None else None

    def add_block(self, blk: slice, g: Tensor, h: Tensor, w: Tensor) -> None:
        """Add one block's share: ``g`` = d(values)/d(logits) ``[R, V]``, ``h`` its hidden states ``[R, H]``."""
        if self.h is not None:
            _addmm_fp32(self.h[blk], g, w)
        if self.w is not None:
            _addmm_fp32(self.w, g.t(), h)
        if self.b is not None:
            self.b += g.sum(0).to(self.b.dtype)

    def scale_(self, c: Tensor) -> None:
        for t in (self.h, self.w, self.b):
            if t is not None:
                t.mul_(c.to(t.dtype))

    def results(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple:
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(self.h, hidden), cast(self.w, weight), cast(self.b, bias)


@dataclass
class _Plan:
    row_fn: RowFn
    block_fn: BlockFn | None
    block_rows: int
    sub_rows: int
    dtype: torch.dtype


def _run(plan: _Plan, hidden: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor | None,
         grads: _Grads | None, scale: Tensor | None = None) -> None:
    """All blocks: write the values into ``values`` (if given); with ``grads``, add the gradient of
    ``sum(values * scale)`` (scale ``[N]``, None = 1) with respect to hidden, weight and bias.

    Per block: its logits ``[R, V]`` (one matmul); per sub-chunk the row function and, with autograd on that
    sub-chunk alone, d(values)/d(logits), written over the logits it came from; then the block's gradient
    matmuls. ``block_fn(blk)`` (e.g. the teacher's logits of the block) is computed once per block.
    """
    w, b = _cast(weight, bias, plan.dtype)
    n_rows = hidden.shape[0]
    for start in range(0, n_rows, plan.block_rows):
        blk = slice(start, min(start + plan.block_rows, n_rows))
        h = hidden[blk].to(w.dtype)
        logits = F.linear(h, w, b)
        aux = plan.block_fn(blk) if plan.block_fn is not None else None
        for s0 in range(0, logits.shape[0], plan.sub_rows):
            sub = slice(s0, s0 + plan.sub_rows)
            rows = slice(start + s0, start + s0 + logits[sub].shape[0])
            v = _sub_chunk(plan.row_fn, logits[sub], rows, None if aux is None else aux[sub], grads is not None, scale)
            if values is not None:
                values[rows] = v
        if grads is not None:
            grads.add_block(blk, logits, h, w)
        del logits, aux  # before the next block's are made


def _sub_chunk(row_fn: RowFn, logits: Tensor, rows: slice, aux: Tensor | None, want_grad: bool,
               scale: Tensor | None) -> Tensor:
    """The values ``[n]`` of one sub-chunk; with ``want_grad``, d(sum(values * scale))/d(logits) overwrites
    ``logits`` (a view into the block)."""
    with torch.enable_grad():
        x = logits.detach().requires_grad_(want_grad)
        v = row_fn(x, rows, aux)
        if want_grad:
            out = v if scale is None else v * scale[rows].to(v.dtype)
            (g,) = torch.autograd.grad(out.sum(), x)
            logits.copy_(g)  # the sub-chunk's logits are not needed any more
    return v.detach()


class _FusedHead(torch.autograd.Function):
    """values[i] = row_fn(hidden[i] @ weight^T + bias) for i < N, in blocks of rows (module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, eager: bool) -> Tensor:
        values = torch.zeros(hidden.shape[0], dtype=torch.float64 if hidden.dtype == torch.float64
                             else torch.float32, device=hidden.device)
        needs = tuple(ctx.needs_input_grad[:3])
        grads = _Grads(hidden, weight, bias, needs) if any(needs) and eager else None
        _run(plan, hidden, weight, bias, values, grads)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.plan, ctx.grads = plan, grads
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        hidden, weight, bias = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        if grads is not None and hidden.shape[0] > 0 and bool((grad_values == grad_values[0]).all()):
            grads.scale_(grad_values[0])  # a token sum / mean: the forward's gradients, scaled
        else:  # per-position weights (or recompute=True): recompute each block with them
            grads = _Grads(hidden, weight, bias, tuple(ctx.needs_input_grad[:3]))
            _run(ctx.plan, hidden, weight, bias, None, grads, scale=grad_values)
        return (*grads.results(hidden, weight, bias), None, None)


def fused_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, row_fn: RowFn, *, block_fn: BlockFn | None = None,
               block_rows: int | None = None, sub_rows: int | None = None, recompute: bool = False) -> Tensor:
    """``row_fn(hidden @ weight^T + bias)`` per row, in blocks, with gradients to hidden, weight and bias.

    hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None -> ``[N]`` (fp32; fp64 for fp64 inputs).
    ``row_fn(x, rows, aux)``: ``x`` the logits ``[n, V]`` of ``rows`` (a slice of the N), ``aux`` the same rows of
    ``block_fn``'s result (None without one); returns ``[n]`` and must treat rows independently.
    ``block_fn(blk)``: computed once per block of rows, without gradient (the teacher's logits of those rows).
    Sizes default to :func:`chunk_sizes`. ``recompute``: take the gradients in backward instead of forward (module
    docstring); a second backward (``retain_graph``) recomputes too.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    default_block, default_sub = chunk_sizes(weight.shape[0])
    block = block_rows or default_block
    plan = _Plan(row_fn, block_fn, block, min(block, sub_rows or default_sub), _compute_dtype(hidden))
    return _FusedHead.apply(hidden, weight, bias, plan, torch.is_grad_enabled() and not recompute)


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """``[N, H]`` as given (mask None), or the masked rows of ``[B, T, H]`` in row-major order."""
    if mask is None:
        return x
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} != hidden states shape without H {tuple(x.shape[:-1])}")
    return x[mask.bool()]


def _head(weight: Tensor, bias: Tensor | None, vocab: int) -> tuple[Tensor, Tensor | None]:
    """The first ``vocab`` rows of a head; itself when it has no more (a slice would cost a full-size gradient
    copy in backward)."""
    if weight.shape[0] == vocab:
        return weight, bias
    return weight[:vocab], None if bias is None else bias[:vocab]


def _placed(values: Tensor, mask: Tensor | None) -> Tensor:
    """``[N]`` as is (mask None), or put back on the mask's positions of ``[B, T]`` (0 elsewhere, no gradient)."""
    if mask is None:
        return values
    return values.new_zeros(mask.shape).masked_scatter(mask.bool(), values)


def _dense(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None, teacher_block: BlockFn,
           vocab: int, mask: Tensor | None, name: str, temperature: float, block_rows: int | None,
           sub_rows: int | None, recompute: bool, params: dict) -> Tensor:
    """The divergence against a dense teacher whose logits of a block of rows are ``teacher_block(blk)``."""
    div = get_divergence(name)
    resolved = div.resolve_params(**params)

    def row_fn(x: Tensor, rows: slice, t: Tensor | None) -> Tensor:
        return div.fn(logprobs(x, temperature), logprobs(t, temperature), **resolved)

    s_weight, s_bias = _head(student_weight, student_bias, vocab)
    values = fused_rows(_rows(student_hidden, mask), s_weight, s_bias, row_fn, block_fn=teacher_block,
                        block_rows=block_rows, sub_rows=sub_rows, recompute=recompute)
    return _placed(values, mask)


def fused_token_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                           teacher_weight: Tensor, name: str, temperature: float = 1.0, *,
                           student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                           mask: Tensor | None = None, block_rows: int | None = None, sub_rows: int | None = None,
                           recompute: bool = False, **params: float) -> Tensor:
    """Per-position divergence ``name`` between the teacher's and the student's next-token distributions at
    ``temperature``, from both models' hidden states and heads; equals
    :func:`~kd_core.losses.chunked.chunked_token_divergence` on the logits ``h W^T + b``.

    Shapes: hiddens ``[N, H_s]`` / ``[N, H_t]`` -> ``[N]``, or ``[B, T, H_s]`` / ``[B, T, H_t]`` with ``mask``
    ``[B, T]`` -> ``[B, T]`` (0 off the mask); weights ``[V_s, H_s]`` / ``[V_t, H_t]``, biases ``[V]`` or None.
    Gradients reach the student's hidden states, weight and bias; the teacher's inputs are detached. The
    teacher's logits are projected once per block of rows (``[block_rows, V]``, no gradient).
    """
    vocab = min(student_weight.shape[0], teacher_weight.shape[0])
    t_hidden = _rows(teacher_hidden, mask).detach()
    t_weight, t_bias = _cast(*_head(teacher_weight, teacher_bias, vocab), _compute_dtype(t_hidden))

    def teacher_block(blk: slice) -> Tensor:
        with torch.no_grad():
            return F.linear(t_hidden[blk].to(t_weight.dtype), t_weight, t_bias)

    return _dense(student_hidden, student_weight, student_bias, teacher_block, vocab, mask, name, temperature,
                  block_rows, sub_rows, recompute, params)


def fused_logits_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_logits: Tensor, name: str,
                            temperature: float = 1.0, *, student_bias: Tensor | None = None,
                            mask: Tensor | None = None, block_rows: int | None = None, sub_rows: int | None = None,
                            recompute: bool = False, **params: float) -> Tensor:
    """As :func:`fused_token_divergence` for a teacher given by its logits ``[N, V_t]`` (or ``[B, T, V_t]`` with
    ``mask``): a teacher whose head is not a plain projection. The student's logits are still never formed."""
    vocab = min(student_weight.shape[0], teacher_logits.shape[-1])
    t_rows = _rows(teacher_logits.detach(), mask)
    return _dense(student_hidden, student_weight, student_bias, lambda blk: t_rows[blk, :vocab], vocab, mask, name,
                  temperature, block_rows, sub_rows, recompute, params)


def fused_sparse_divergence(student_hidden: Tensor, student_weight: Tensor, top_logprobs: Tensor, top_ids: Tensor,
                            tail: Tensor, name: str, temperature: float = 1.0, vocab_size: int | None = None, *,
                            student_bias: Tensor | None = None, mask: Tensor | None = None,
                            block_rows: int | None = None, sub_rows: int | None = None, recompute: bool = False,
                            **params: float) -> Tensor:
    """Per-position divergence ``name`` against the teacher's cached top-k (:mod:`kd_core.losses.sparse`: the k
    tokens + one tail bucket), from the student's hidden states and head; equals
    :func:`~kd_core.losses.chunked.chunked_sparse_divergence` on the logits ``h W^T + b``.

    student_hidden ``[N, H]`` (or ``[B, T, H]`` with ``mask`` ``[B, T]`` holding N true positions), the teacher's
    rows for those N positions in row-major order: top_logprobs ``[N, k]`` (at ``temperature``), top_ids ``[N, k]``,
    tail ``[N]``; ``vocab_size``: the vocabulary they are normalised over (the student's head is sliced to it)
    -> ``[N]`` (or ``[B, T]``, 0 off the mask).
    """
    hidden = _rows(student_hidden, mask)
    if top_logprobs.shape[0] != hidden.shape[0]:
        raise ValueError(f"{top_logprobs.shape[0]} cached teacher rows for {hidden.shape[0]} positions")
    get_divergence(name).resolve_params(**params)  # unknown or out-of-range params fail before any work
    vocab = student_weight.shape[0] if vocab_size is None else int(vocab_size)

    def row_fn(x: Tensor, rows: slice, _: None) -> Tensor:
        return sparse_token_divergence(x, top_logprobs[rows], top_ids[rows], tail[rows], name,
                                       temperature=temperature, **params)

    s_weight, s_bias = _head(student_weight, student_bias, vocab)
    values = fused_rows(hidden, s_weight, s_bias, row_fn, block_rows=block_rows, sub_rows=sub_rows,
                        recompute=recompute)
    return _placed(values, mask)


def fused_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                        mask: Tensor | None = None) -> Tensor:
    """Per-position cross-entropy ``-log softmax(h W^T + b)[target]`` (as ``methods.base.token_ce``), fused.

    hidden ``[N, H]`` with targets ``[N]`` -> ``[N]``, or ``[B, T, H]`` with targets and ``mask`` ``[B, T]`` ->
    ``[B, T]`` (0 off the mask). Targets must be valid ids (< V) at the counted positions.
    """
    flat = targets if mask is None else targets[mask.bool()]

    def row_fn(x: Tensor, rows: slice, _: None) -> Tensor:
        return F.cross_entropy(x.float(), flat[rows], reduction="none")  # in fp32, as token_ce

    return _placed(fused_rows(_rows(hidden, mask), weight, bias, row_fn), mask)
