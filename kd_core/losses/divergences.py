"""Token-level divergences between a student and a teacher next-token distribution.

Conventions
-----------
* ``p`` is the **teacher** distribution, ``q`` the **student** distribution.
  Forward KL is ``KL(p || q)`` (mode covering), reverse KL is ``KL(q || p)``
  (mode seeking).
* Every divergence is a pure function over *log-probabilities*::

      fn(student_logprobs: Tensor[..., V], teacher_logprobs: Tensor[..., V], **params) -> Tensor[...]

  The last (vocabulary) dimension is reduced; one value per position is returned.
  Log-probabilities are expected to be already temperature-scaled by the caller
  (see :func:`logprobs` / :func:`token_divergence`). No ``T**2`` factor is applied here;
  methods that offer it multiply by :func:`temperature_factor`.
* Inputs in half precision are cast up to fp32 (fp64 stays fp64).
* Zero probabilities (log-prob ``-inf``, e.g. from vocabulary entries masked with
  ``-inf`` logits) are handled with the convention ``0 * log(0 / x) = 0``: they
  give finite values and finite gradients.  Mixtures ``w*p + (1-w)*q`` are formed
  in log space (log-add-exp), never as ``log(p + q)`` on probabilities.  The only
  way to get ``inf`` is a genuinely infinite divergence, e.g. ``KL(p || q)`` where
  the student puts exactly zero mass on a token the teacher supports.  Mixture
  based divergences (``jsd`` with 0 < beta < 1, ``skl``/``srkl`` with alpha > 0,
  ``tvd``) are always finite.

Registry: :func:`register_divergence` / :func:`get_divergence`; a :class:`Divergence` fills parameter
defaults and checks their ranges when called (``get_divergence("jsd")(student_lp, teacher_lp, beta=0.9)``).
The names and parameters of the built-in divergences live in :mod:`kd_core.config.divergence_params` (no torch:
params are validated against it).
The training loop's token-level helpers (log-probabilities at a temperature, shared vocabulary, masked
reductions) are in :mod:`kd_core.losses.tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_core.config.divergence_params import DIVERGENCE_PARAMS, ParamSpec

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- registry


DivergenceFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Divergence:
    """A registered divergence: ``fn(student_logprobs, teacher_logprobs, **params) -> Tensor[...]``."""

    name: str
    fn: DivergenceFn
    params: dict[str, ParamSpec] = field(default_factory=dict)
    doc: str = ""

    def resolve_params(self, **overrides: float) -> dict[str, float]:
        """Defaults updated with ``overrides``; unknown names -> ``TypeError``, out of range -> ``ValueError``."""
        unknown = set(overrides) - set(self.params)
        if unknown:
            raise TypeError(
                f"divergence {self.name!r} got unknown parameter(s) {sorted(unknown)}; "
                f"allowed: {sorted(self.params) or 'none'}"
            )
        resolved = {k: spec.default for k, spec in self.params.items()}
        for k, v in overrides.items():
            resolved[k] = self.params[k].check(k, v)
        return resolved

    def __call__(self, student_logprobs: Tensor, teacher_logprobs: Tensor, **overrides: float) -> Tensor:
        return self.fn(student_logprobs, teacher_logprobs, **self.resolve_params(**overrides))


DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(
    name: str, params: dict[str, ParamSpec] | None = None
) -> Callable[[DivergenceFn], DivergenceFn]:
    """Decorator registering ``fn`` in :data:`DIVERGENCES` under ``name`` (docstring becomes ``doc``); its
    parameters are ``params``, by default those of ``name`` in
    :data:`kd_core.config.divergence_params.DIVERGENCE_PARAMS`.

    The decorated function is returned unchanged, so it stays directly callable.
    """

    def deco(fn: DivergenceFn) -> DivergenceFn:
        if name in DIVERGENCES:
            raise ValueError(f"divergence {name!r} is already registered")
        specs = dict(DIVERGENCE_PARAMS.get(name, {}) if params is None else params)
        for k, spec in specs.items():
            spec.check(k, spec.default)  # defaults must lie in their own interval
        DIVERGENCES[name] = Divergence(name=name, fn=fn, params=specs, doc=(fn.__doc__ or "").strip())
        return fn

    return deco


def get_divergence(name: str) -> Divergence:
    """Look up a registered divergence; ``KeyError`` listing the allowed names if unknown."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise KeyError(f"unknown divergence {name!r}; allowed: {', '.join(sorted(DIVERGENCES))}") from None


# --------------------------------------------------------------------------- numerics


def upcast(x: Tensor) -> Tensor:
    """Cast half/bfloat16 (and integer) tensors up to fp32; fp32/fp64 are kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _kl(logp_a: Tensor, logp_b: Tensor, rows: Tensor | None = None) -> Tensor:
    """``KL(a || b) = sum_v a_v (log a_v - log b_v)`` over the last dim, from log-probs.

    Entries with ``a_v = 0`` (``log a_v = -inf``) contribute exactly 0, with zero
    (finite) gradient: both logs are replaced by 0 there *before* the product, so
    no ``0 * inf`` appears in forward or backward.

    ``rows`` (bool ``[...]``, optional): positions where the KL is wanted; elsewhere
    the result is exactly 0 with zero gradient, even where ``KL(a || b)`` is ``inf``
    (used to drop a term whose mixing weight is 0, see :func:`_weighted_kl`).
    """
    if rows is None and bool(logp_a.sum() > _NEG_INF):
        # no -inf (nor NaN) entry: full support, the same terms without the masking (a third of the passes)
        return (logp_a.exp() * (logp_a - logp_b)).sum(-1)
    support = logp_a > _NEG_INF
    if rows is not None:
        support = support & rows.unsqueeze(-1)
    la = torch.where(support, logp_a, 0.0)
    lb = torch.where(support, logp_b, 0.0)
    terms = torch.where(support, la.exp() * (la - lb), 0.0)
    return terms.sum(-1)


def _weighted_kl(weight: Tensor, logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """``weight * KL(a || b)`` with the convention ``0 * KL = 0``: ``[...]``, ``[..., V]``, ``[..., V]`` -> ``[...]``.

    Where ``weight == 0`` the term is exactly 0 with zero gradient even if ``KL(a || b)`` is
    infinite (b puts zero mass where a has some): a plain product would give ``0 * inf = NaN``.
    Where ``weight > 0`` an infinite KL stays infinite (a genuinely infinite divergence).
    """
    return weight * _kl(logp_a, logp_b, rows=weight > 0)


def _log_mix(logp_a: Tensor, logp_b: Tensor, w: float) -> Tensor:
    """``log(w * a + (1 - w) * b)`` elementwise from log-probs, computed in log space.

    ``w == 0`` / ``w == 1`` return ``logp_b`` / ``logp_a``.  Entries where both
    inputs are ``-inf`` give ``-inf`` with zero gradient (no NaN from logaddexp).
    """
    if w <= 0.0:
        return logp_b
    if w >= 1.0:
        return logp_a
    if bool(logp_a.sum() > _NEG_INF):  # no -inf (nor NaN) in a: no dead entry, the same values without masking
        return torch.logaddexp(logp_a + math.log(w), logp_b + math.log1p(-w))
    dead = (logp_a == _NEG_INF) & (logp_b == _NEG_INF)
    la = logp_a.masked_fill(dead, 0.0)
    lb = logp_b.masked_fill(dead, 0.0)
    mix = torch.logaddexp(la + math.log(w), lb + math.log1p(-w))
    return mix.masked_fill(dead, _NEG_INF)


# --------------------------------------------------------------------------- divergences


@register_divergence("fkl")
def fkl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Forward KL, KL(p || q) = sum_v p_v (log p_v - log q_v), p = teacher, q = student.

    Shapes: [..., V], [..., V] -> [...].
    """
    return _kl(upcast(teacher_logprobs), upcast(student_logprobs))


@register_divergence("rkl")
def rkl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Reverse KL, KL(q || p) = sum_v q_v (log q_v - log p_v), p = teacher, q = student.

    Shapes: [..., V], [..., V] -> [...].
    """
    return _kl(upcast(student_logprobs), upcast(teacher_logprobs))


@register_divergence("jsd")
def jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024, eq. 1), TRL convention.

    With p = teacher, q = student and M = beta * p + (1 - beta) * q::

        JSD_beta = beta * KL(p || M) + (1 - beta) * KL(q || M)        for 0 < beta < 1
        JSD_0    = KL(p || q)   (forward KL)
        JSD_1    = KL(q || p)   (reverse KL)

    This is exactly ``GKDTrainer.generalized_jsd_loss`` in TRL (checked against
    ``trl/experimental/gkd/gkd_trainer.py`` of trl 1.16.0 and
    ``trl/trainer/gkd_trainer.py`` of earlier releases): the endpoints are
    special-cased to forward / reverse KL.  Note that the interior formula itself
    tends to 0 as beta -> 0 or 1 (roughly ``beta * KL(p||q)`` for small beta), so
    the endpoint values are a *definition*, not a limit.  The value is bounded by
    the beta-entropy ``h(beta) <= log 2`` in the interior.

    Shapes: [..., V], [..., V] -> [...].
    """
    lq, lp = upcast(student_logprobs), upcast(teacher_logprobs)
    beta = float(beta)
    if beta <= 0.0:
        return _kl(lp, lq)
    if beta >= 1.0:
        return _kl(lq, lp)
    lm = _log_mix(lp, lq, beta)
    return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)


@register_divergence("tvd")
def tvd(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Total variation distance, 0.5 * sum_v |p_v - q_v| (symmetric, in [0, 1]).

    Shapes: [..., V], [..., V] -> [...].
    """
    return 0.5 * (upcast(teacher_logprobs).exp() - upcast(student_logprobs).exp()).abs().sum(-1)


@register_divergence("skl")
def skl(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew (forward) KL, KL(p || alpha * p + (1 - alpha) * q), p = teacher, q = student.

    ``alpha = 0`` is the plain forward KL ``KL(p || q)``; ``alpha = 1`` is 0.
    Finite for any alpha > 0 (the mixture covers the teacher's support).
    Shapes: [..., V], [..., V] -> [...].
    """
    lq, lp = upcast(student_logprobs), upcast(teacher_logprobs)
    return _kl(lp, _log_mix(lp, lq, float(alpha)))


@register_divergence("srkl")
def srkl(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew reverse KL, KL(q || (1 - alpha) * p + alpha * q), p = teacher, q = student.

    ``alpha = 0`` is the plain reverse KL ``KL(q || p)``; ``alpha = 1`` is 0.
    Shapes: [..., V], [..., V] -> [...].
    """
    lq, lp = upcast(student_logprobs), upcast(teacher_logprobs)
    return _kl(lq, _log_mix(lq, lp, float(alpha)))


@register_divergence("akl")
def akl(student_logprobs: Tensor, teacher_logprobs: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL (Wu et al. 2024, "Rethinking KL Divergence in KD for LLMs", arXiv:2404.02657).

    Sort the teacher probs p descending; the *head* is the smallest prefix whose
    cumulative teacher mass reaches ``mu`` (token i, in sorted order, is in the
    head iff the mass strictly before it is < mu; so mu = 0 gives an empty head),
    the *tail* is the rest.  With gaps g_head = sum_head |p - q| and
    g_tail = sum_tail |p - q|::

        AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p)

    The weights are computed under ``no_grad`` (detached).  When both gaps are 0
    (p == q) the weights are 0.5 / 0.5 (both KLs are 0 there anyway).
    Ties in p are ordered arbitrarily by ``torch.sort``.

    A KL whose weight is exactly 0 is left out (``0 * KL = 0``, also when that KL is
    infinite): e.g. ``mu = 0`` (empty head) is exactly the reverse KL even where the
    student gives a token zero probability (``-inf`` logit) that the teacher supports,
    where ``KL(p || q) = inf`` would otherwise turn the mix into ``0 * inf = NaN``.
    Student [0, 0, 0, -inf], teacher [0, 0, 0, 0] logits, ``mu = 0``: AKL = KL(q || p) =
    log(4/3).  An infinite KL with a positive weight still gives ``inf``.

    Note: the authors' reference code puts token i in the head iff the inclusive
    cumulative mass is <= mu (plus always the top-1 token); this implementation
    follows the "smallest prefix reaching mu" definition, which differs only in
    whether the token crossing mu belongs to the head.

    Shapes: [..., V], [..., V] -> [...].
    """
    lq, lp = upcast(student_logprobs), upcast(teacher_logprobs)
    with torch.no_grad():
        p_sorted, idx = lp.exp().sort(dim=-1, descending=True)
        q_sorted = lq.exp().gather(-1, idx)
        gap = (p_sorted - q_sorted).abs()
        mass_before = F.pad(p_sorted.cumsum(-1)[..., :-1], (1, 0))
        head = mass_before < float(mu)
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return _weighted_kl(w_head, lp, lq) + _weighted_kl(1.0 - w_head, lq, lp)


def _expm1_over(c: float, base: Tensor, z: Tensor) -> Tensor:
    """``exp(base) * expm1(c z) / c`` (``exp(base) * z`` at c = 0) without overflow: where ``c z > 0`` it is
    computed as ``-exp(base + c z) * expm1(-c z) / c``, so every exponential has the size of the result."""
    if c == 0.0:
        return base.exp() * z
    cz = c * z
    up = cz > 0
    return torch.where(up, -1.0, 1.0) * (base + torch.where(up, cz, 0.0)).exp() * torch.expm1(-cz.abs()) / c


def _ab_terms(lp: Tensor, lq: Tensor, a: float, b: float) -> Tensor:
    """The per-token terms of :func:`abkd` at finite log-probs, each written as a divided difference over the
    largest of |a|, |b|, |a + b| (so none of the three limits a, b, a + b -> 0 cancels catastrophically)."""
    s, x = a + b, lp - lq
    m = max(abs(a), abs(b), abs(s))
    if m == 0.0:
        return 0.5 * x * x
    if abs(b) == m:  # q^s [E(s, x) - E(a, x)] / b,  E(c, x) = expm1(c x) / c
        return (_expm1_over(s, s * lq, x) - _expm1_over(a, s * lq, x)) / b
    if abs(a) == m:  # the same with p <-> q, a <-> b (D^(a,b)(p||q) = D^(b,a)(q||p))
        return (_expm1_over(s, s * lp, -x) - _expm1_over(b, s * lp, -x)) / a
    return (_expm1_over(b, a * lp + b * lq, x) - _expm1_over(a, s * lq, x)) / s  # [p^a q^b E(b,x) - q^s E(a,x)] / s


@register_divergence("abkd")
def abkd(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.2, beta: float = 0.7) -> Tensor:
    """Alpha-beta divergence (ABKD, Wang et al., ICML 2025, arXiv:2505.04560; Cichocki, Cruces & Amari 2011),
    p = teacher, q = student, s = alpha + beta::

        D_AB(p || q) = -1/(alpha beta) sum_v ( p^alpha q^beta - alpha/s p^s - beta/s q^s )     alpha, beta, s != 0

    and at the zeros of alpha, beta or s its continuous limits (Cichocki et al. 2011, eq. 4)::

        beta = 0:          1/alpha^2 sum_v ( p^alpha log(p^alpha / q^alpha) - p^alpha + q^alpha )
        alpha = 0:         1/beta^2  sum_v ( q^beta log(q^beta / p^beta) - q^beta + p^beta )
        s = 0:             1/alpha^2 sum_v ( (p/q)^alpha - log((p/q)^alpha) - 1 )
        alpha = beta = 0:  1/2 sum_v ( log p - log q )^2

    So (1, 0) is the forward KL(p || q), (0, 1) the reverse KL(q || p), (0.5, 0.5) four times the squared
    Hellinger distance, alpha + beta = 1 Amari's alpha-divergence. The authors' code (ghwang-s/abkd,
    ``distillm/losses.py::ab_div``) uses 1/alpha, 1/beta, 1/alpha in the three one-parameter limits, which are
    those limits only at |alpha| = 1 / |beta| = 1; this function is continuous in (alpha, beta).

    Computed per token from the log-ratio x = log p - log q as a divided difference (``_ab_terms``), exact in
    every case above, without the cancellation of the formula as written near the limits or for p ~ q.
    Zero probabilities: a token where both are 0 adds nothing; p_v = 0 < q_v adds q^s / (alpha s) when
    alpha > 0 and s > 0, else +inf; q_v = 0 < p_v adds p^s / (beta s) when beta > 0 and s > 0, else +inf (the
    limits of the formula). Default (0.2, 0.7): the default of ``ab_div`` in a public derivative of the
    authors' code (the official function has none).

    Shapes: [..., V], [..., V] -> [...].
    """
    lq, lp = upcast(student_logprobs), upcast(teacher_logprobs)
    a, b = float(alpha), float(beta)
    if bool(lp.sum() > _NEG_INF) and bool(lq.sum() > _NEG_INF):  # no zero (nor NaN): no masking
        return _ab_terms(lp, lq, a, b).sum(-1)
    p0, q0 = torch.isneginf(lp), torch.isneginf(lq)
    lp_safe, lq_safe = torch.where(p0, 0.0, lp), torch.where(q0, 0.0, lq)
    s, inf = a + b, torch.full((), float("inf"), dtype=lp.dtype, device=lp.device)
    only_p0 = (s * lq_safe).exp() / (a * s) if a > 0 and s > 0 else inf
    only_q0 = (s * lp_safe).exp() / (b * s) if b > 0 and s > 0 else inf
    terms = torch.where(p0, only_p0, torch.where(q0, only_q0, _ab_terms(lp_safe, lq_safe, a, b)))
    return torch.where(p0 & q0, 0.0, terms).sum(-1)
