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

Objective (:func:`atkd_per_token`, and the `atkd` method on any teacher signal)
-------------------------------------------------------------------------------
The valid positions are ranked by teacher UNC; the ``ceil(hard_fraction * n_valid)``
most uncertain are *hard* (:func:`hard_selection`), the rest *easy*::

    hard:  tkd_weight * TKD + dkd_weight * DKD
    easy:                     dkd_weight * DKD
    masked-out positions: 0 (and they never take part in the ranking)

DKD is deliberately **not** multiplied by UNC (ATKD decouples the two parts).
Temperature applies to both models; no ``T**2`` factor.

Ranking scope (gradient accumulation)
-------------------------------------
The source ranks "tokens in each mini-batch".  Ranking happens per call, i.e. per
*micro-batch*: with gradient accumulation over M micro-batches of n_1..n_M valid
tokens (N = sum n_m) the hard set is H_mb = union_m top_ceil(f n_m)(UNC in m),
not the accumulated batch's H_acc = top_ceil(f N)(UNC of all N) (f = hard_fraction).
Ranking over the accumulated batch would need every micro-batch's teacher UNC before
the first micro-batch's backward (a second live-teacher pass, or trainer support),
so it is not done.  Since DKD counts on every token, the difference is exactly::

    L_mb - L_acc = tkd_weight / N * ( sum_{H_mb - H_acc} TKD_t - sum_{H_acc - H_mb} TKD_t )

(the same identity holds for the gradients; the hard set is a constant), so
``|L_mb - L_acc| <= tkd_weight * |H_mb xor H_acc| / N * max_t TKD_t``, and
``0 <= |H_mb| - |H_acc| <= M - 1`` (ceil per micro-batch).  It is 0 with one
micro-batch, with f = 0 or 1, and whenever each micro-batch's top set is its share
of the accumulated top set.  ``tests/test_fidelity.py`` checks the identity.

Numerics: ``1 - p_g`` is computed as the log-sum-exp of the non-target
log-probs (not ``1 - exp(log p_g)``), so it stays accurate when ``p_g -> 1``;
when the non-target mass is exactly 0 (all other tokens masked with ``-inf``)
the renormalised distribution is empty and DKD is 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kd_core.losses.divergences import upcast, get_divergence
from kd_core.losses.tokens import logprobs, shared_vocab

__all__ = ["decompose", "target_uncertainty", "hard_selection", "atkd_per_token", "classic_kd_from_parts"]

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
    lq, lp = upcast(student_logprobs), upcast(teacher_logprobs)
    q_bin, q_hat = _split(lq, target_ids)
    p_bin, p_hat = _split(lp, target_ids)
    tkd = div(q_bin, p_bin, **div_params)
    dkd = div(q_hat, p_hat, **div_params)
    unc = p_bin[..., 1].exp()
    return tkd, dkd, unc


def target_uncertainty(teacher_logprobs: Tensor, target_ids: Tensor) -> Tensor:
    """UNC = 1 - p_g, the teacher's non-target mass: ``[..., V]`` log-probs, ``[...]`` ids -> ``[...]``.
    The same value :func:`decompose` returns as ``unc``."""
    return _split(upcast(teacher_logprobs), target_ids)[0][..., 1].exp()


def hard_selection(unc: Tensor, hard_fraction: float) -> Tensor:
    """The ``ceil(hard_fraction * n)`` entries of ``unc`` ``[n]`` with the highest value: ``[n]`` bool.

    ``hard_fraction`` in ``[0, 1]`` (else ``ValueError``); ties are broken arbitrarily by ``torch.topk``.
    """
    if not 0.0 <= float(hard_fraction) <= 1.0:
        raise ValueError(f"hard_fraction={hard_fraction!r} is outside the allowed interval [0.0, 1.0]")
    n = unc.numel()
    n_hard = min(n, math.ceil(float(hard_fraction) * n))
    hard = torch.zeros(unc.shape, dtype=torch.bool, device=unc.device)
    if n_hard > 0:
        hard[torch.topk(unc.detach(), n_hard, sorted=False).indices] = True
    return hard


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
        :func:`kd_core.losses.tokens.reduce_tokens`.
    """
    s, t = shared_vocab(student_logits, teacher_logits)
    valid = mask.bool()
    safe_targets = torch.where(valid, target_ids, torch.zeros_like(target_ids))
    tkd, dkd, unc = decompose(
        logprobs(s, temperature), logprobs(t, temperature), safe_targets, divergence, **div_params
    )
    hard = torch.zeros_like(valid)
    hard[valid] = hard_selection(unc[valid], hard_fraction)
    dkd_part = dkd_weight * dkd
    per_token = torch.where(hard, tkd_weight * tkd + dkd_part, dkd_part)
    return torch.where(valid, per_token, 0.0)
