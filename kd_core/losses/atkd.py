"""ATKD: adaptive teaching KD for autoregressive LMs.

Zhong et al. 2024, "Revisiting Knowledge Distillation for Autoregressive Language
Models" (ACL 2024, arXiv:2402.11890).

Decomposition (per position, target token g, p = teacher, q = student)
-----------------------------------------------------------------------
* ``UNC = 1 - p_g``: the teacher's mass on non-target tokens (teacher-only;
  "uncertainty" of the position).
* ``TKD`` (target-oriented KD) = ``D([p_g, 1 - p_g] || [q_g, 1 - q_g])``: the
  divergence on the binary target / non-target distributions.
* ``DKD`` (diversity-oriented KD) = ``D(p_hat || q_hat)`` with the non-target
  distributions renormalised, ``p_hat_k = p_k / (1 - p_g)`` for ``k != g``.

For forward KL (``D = fkl``) this is exact::

    KL(p || q) = TKD + UNC * DKD                                      (1)

(:func:`classic_kd_from_parts` recombines the parts; the tests check (1)).  So
classic KD couples DKD to the teacher's uncertainty: on confident ("easy")
tokens, UNC ~ 0 and the diversity knowledge is suppressed.  For other
divergences the same construction is applied (TKD / DKD are that divergence on
the binary / renormalised non-target distributions), but (1) does not hold.

Objective implemented by :func:`atkd_per_token`
-----------------------------------------------
Within one call (one micro-batch), the valid (``mask``) positions are ranked by
teacher UNC; the ``ceil(hard_fraction * n_valid)`` positions with the highest
UNC are *hard*, the rest *easy*::

    hard:  tkd_weight * TKD + dkd_weight * DKD
    easy:                     dkd_weight * DKD
    masked-out positions: 0 (and they never take part in the ranking)

DKD is deliberately **not** multiplied by UNC: ATKD's point is to decouple the
two parts, so that every token receives the diversity-oriented signal at full
strength, and the target-oriented signal is kept only on the uncertain (hard)
tokens.  Any further re-weighting of the parts is expressed through
``tkd_weight`` / ``dkd_weight``; the token reduction is left to the caller
(:func:`kd_core.losses.divergences.reduce_tokens`).  Ranking happens per call,
so with gradient accumulation the hard set is chosen per micro-batch.
Temperature scaling applies to both models; no ``T**2`` factor is applied.

Numerics: ``1 - p_g`` is computed as the log-sum-exp of the non-target
log-probs (not ``1 - exp(log p_g)``), so it stays accurate when ``p_g -> 1``;
when the non-target mass is exactly 0 (all other tokens masked with ``-inf``)
the renormalised distribution is empty and DKD is 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kd_core.losses.divergences import _up, get_divergence, logprobs, shared_vocab

__all__ = ["decompose", "atkd_per_token", "classic_kd_from_parts"]

_NEG_INF = float("-inf")


def _safe_logsumexp(x: Tensor) -> Tensor:
    """``logsumexp`` over the last dim that returns ``-inf`` with zero gradient for all ``-inf`` rows."""
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    s = (x - m).exp().sum(-1)
    dead = s == 0
    out = torch.where(dead, 1.0, s).log() + m.squeeze(-1)
    return out.masked_fill(dead, _NEG_INF)


def _split(lp: Tensor, target_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Binary and renormalised non-target log-probs.

    ``lp`` [..., V], ``target_ids`` [...] -> (``binary`` [..., 2] = [log p_g, log(1-p_g)],
    ``hat`` [..., V] = log p_k - log(1-p_g) for k != g, ``-inf`` at g).
    """
    idx = target_ids.long().unsqueeze(-1)
    lp_g = lp.gather(-1, idx).squeeze(-1)
    non_target = lp.scatter(-1, idx, _NEG_INF)
    lp_rest = _safe_logsumexp(non_target)  # log(1 - p_g), accurate as p_g -> 1
    # if the non-target mass is 0, every non-target entry is already -inf: keep hat all -inf (DKD = 0)
    dead = (lp_rest == _NEG_INF).unsqueeze(-1)
    hat = non_target - torch.where(dead, 0.0, lp_rest.unsqueeze(-1))
    return torch.stack([lp_g, lp_rest], dim=-1), hat


def decompose(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    target_ids: Tensor,
    divergence: str = "fkl",
    **div_params: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split a divergence into target-oriented and diversity-oriented parts.

    Args:
        student_logprobs, teacher_logprobs: ``[..., V]`` log-probs (temperature applied).
        target_ids: ``[...]`` integer ids of the target token g (must be valid indices).
        divergence: registered divergence name; ``div_params`` are its parameters.

    Returns:
        ``(tkd, dkd, unc)``, each ``[...]``: TKD = D(binary_p || binary_q),
        DKD = D(p_hat || q_hat), UNC = 1 - p_g (teacher).  For ``"fkl"``,
        ``tkd + unc * dkd == KL(p || q)`` (see module docstring).
    """
    div = get_divergence(divergence)
    lq, lp = _up(student_logprobs), _up(teacher_logprobs)
    q_bin, q_hat = _split(lq, target_ids)
    p_bin, p_hat = _split(lp, target_ids)
    tkd = div(q_bin, p_bin, **div_params)
    dkd = div(q_hat, p_hat, **div_params)
    unc = p_bin[..., 1].exp()
    return tkd, dkd, unc


def classic_kd_from_parts(tkd: Tensor, dkd: Tensor, unc: Tensor) -> Tensor:
    """Classic (coupled) recombination ``tkd + unc * dkd``; equals forward KL for the ``fkl`` parts."""
    return tkd + unc * dkd


def atkd_per_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    *,
    divergence: str = "fkl",
    hard_fraction: float = 0.5,
    temperature: float = 1.0,
    tkd_weight: float = 1.0,
    dkd_weight: float = 1.0,
    **div_params: float,
) -> Tensor:
    """Per-token ATKD loss (see module docstring for the exact objective).

    Args:
        student_logits: ``[B, T, V_s]``; teacher_logits: ``[B, T, V_t]`` (sliced to the
            shared vocabulary with :func:`shared_vocab`).
        target_ids: ``[B, T]`` target token ids (values at masked positions are
            ignored, e.g. ``-100``).
        mask: ``[B, T]`` bool/0-1, True on response tokens.
        hard_fraction: share of valid tokens (ceil) treated as hard, in ``[0, 1]``.

    Returns:
        ``[B, T]``: ``tkd_weight*TKD + dkd_weight*DKD`` on hard tokens,
        ``dkd_weight*DKD`` on easy tokens, 0 on masked positions.  Reduce with
        :func:`kd_core.losses.divergences.reduce_tokens`.
    """
    if not 0.0 <= float(hard_fraction) <= 1.0:
        raise ValueError(f"hard_fraction={hard_fraction!r} is outside the allowed interval [0.0, 1.0]")
    s, t = shared_vocab(student_logits, teacher_logits)
    valid = mask.bool()
    safe_targets = torch.where(valid, target_ids, torch.zeros_like(target_ids))
    tkd, dkd, unc = decompose(
        logprobs(s, temperature), logprobs(t, temperature), safe_targets, divergence, **div_params
    )

    n_valid = int(valid.sum().item())
    n_hard = min(n_valid, math.ceil(float(hard_fraction) * n_valid))
    hard = torch.zeros_like(valid)
    if n_hard > 0:
        score = unc.detach().masked_fill(~valid, _NEG_INF).flatten()
        top = torch.topk(score, n_hard, sorted=False).indices
        hard = hard.flatten().index_fill(0, top, True).view_as(valid)

    dkd_part = dkd_weight * dkd
    per_token = torch.where(hard, tkd_weight * tkd + dkd_part, dkd_part)
    return torch.where(valid, per_token, 0.0)
