"""Token-level helpers of the training losses: log-probabilities at a temperature, the vocabulary shared by
teacher and student, a divergence per position from logits, and the masked reductions over response tokens
(normalised by the accumulated batch's response tokens, correct under padding and gradient accumulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_core.losses.divergences import get_divergence, upcast


# --------------------------------------------------------------------------- helpers


def logprobs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature, -1)`` computed in (at least) fp32. Shape [..., V] -> [..., V]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    x = upcast(logits)
    return F.log_softmax(x if temperature == 1 else x / temperature, dim=-1)


TEMPERATURE_SCALES = ("none", "tau_squared")


def temperature_factor(temperature_scale: str, temperature: float) -> float:
    """The factor multiplying a temperature-scaled distillation divergence: ``1`` (``"none"``) or ``tau**2``
    (``"tau_squared"``).

    ``tau_squared`` is the T² of Hinton et al. (2015) and of the OKD paper's eq. 2
    (``L_KL = tau^2 sum p(tau; teacher) log(p(tau; teacher) / p(tau; student))``): the gradient of a KL between
    distributions at temperature tau scales as 1/tau^2 with respect to the logits, and the factor keeps its
    magnitude comparable to a CE term as tau changes.  At tau = 1 both are 1.
    """
    if temperature_scale == "none":
        return 1.0
    if temperature_scale == "tau_squared":
        return float(temperature) ** 2
    raise ValueError(f"unknown temperature_scale {temperature_scale!r} (allowed: {', '.join(TEMPERATURE_SCALES)})")


def shared_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Slice both ``[..., V_s]`` / ``[..., V_t]`` tensors to ``V = min(V_s, V_t)`` along the last dim.

    Models of one tokenizer family often differ only by padded embedding rows
    (``resize_token_embeddings(pad_to_multiple_of=...)``) appended *after* the real
    vocabulary; those rows are dropped so that both distributions live on the same
    (real) vocabulary.  Differing tokenizers are out of scope (that needs
    cross-tokenizer alignment).  Returns the inputs unchanged when V matches.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs == vt:
        return student_logits, teacher_logits
    v = min(vs, vt)
    return student_logits[..., :v], teacher_logits[..., :v]


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    name: str,
    temperature: float = 1.0,
    **params: float,
) -> Tensor:
    """Per-position divergence ``name`` between student and teacher logits.

    ``[B, T, V_s]``, ``[B, T, V_t]`` -> ``[B, T]`` (any leading shape works):
    :func:`shared_vocab`, then :func:`logprobs` of both at ``temperature``, then
    ``get_divergence(name)(student_lp, teacher_lp, **params)``.  The teacher is not
    detached here; produce its logits under ``torch.no_grad()``.
    """
    div = get_divergence(name)
    s, t = shared_vocab(student_logits, teacher_logits)
    return div(logprobs(s, temperature), logprobs(t, temperature), **params)


def masked_token_sum_and_count(per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(per_token * mask), sum(mask))`` over all elements; ``[B, T]``, ``[B, T]`` -> scalars.

    ``mask`` is bool or numeric (numeric values act as weights).  Masked-out
    positions are *selected away* (``torch.where``), so NaN/inf values at padding
    positions never leak into the sum.
    """
    if mask.shape != per_token.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != per_token shape {tuple(per_token.shape)}")
    keep = mask.bool() if mask.dtype != torch.bool else mask
    weights = per_token if mask.dtype == torch.bool else per_token * mask.to(per_token.dtype)
    total = torch.where(keep, weights, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()
    count = mask.sum() if mask.dtype != torch.bool else keep.sum()
    return total, count.to(per_token.dtype)


def reduce_tokens(per_token: Tensor, mask: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    """``sum(per_token * mask) / num_items`` -> scalar; ``num_items`` defaults to ``mask.sum()``.

    The denominator is clamped to >= 1 (a batch without response tokens gives 0). ``num_items`` is an int or
    a 0-dim tensor, not moved: on ``per_token``'s device (the trainer puts it there) or the CPU (a 0-dim CPU
    tensor acts as a scalar).

    Gradient accumulation: the trainer passes ``num_items`` = number of response
    tokens in the *whole* accumulated batch (all micro-batches, all ranks if it is
    all-reduced).  Each micro-batch then returns its partial sum over that global
    count, so summing the micro-batch losses gives exactly the token mean over the
    full batch, independent of how padding is distributed between micro-batches
    (averaging per-micro-batch means would not).
    """
    total, count = masked_token_sum_and_count(per_token, mask)
    if num_items is None:
        denom = count
    elif isinstance(num_items, Tensor):
        denom = num_items.to(dtype=total.dtype)
    else:
        denom = torch.tensor(float(num_items), device=total.device, dtype=total.dtype)
    return total / denom.clamp_min(1.0)
