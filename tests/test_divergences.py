"""Tests for kd_core.losses.divergences against brute-force references (plain Python loops)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import pytest
import torch

from kd_core.losses.divergences import (DIVERGENCES, Divergence, ParamSpec, abkd, akl, fkl, get_divergence, jsd,
                                        register_divergence, rkl, skl, srkl, tvd)
from kd_core.losses.tokens import logprobs, masked_token_sum_and_count, reduce_tokens, shared_vocab, token_divergence

SHAPES = [(5,), (3, 6), (2, 3, 7), (2, 2, 3, 4)]
NAMES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "abkd"]


# ----------------------------------------------------------------------------- brute-force references
# p = teacher, q = student; lists of python floats.


def _kl(a: list[float], b: list[float]) -> float:
    return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)


def ref_fkl(p, q):
    return _kl(p, q)


def ref_rkl(p, q):
    return _kl(q, p)


def ref_jsd(p, q, beta=0.5):
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def ref_tvd(p, q):
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))


def ref_skl(p, q, alpha=0.1):
    return _kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)])


def ref_srkl(p, q, alpha=0.1):
    return _kl(q, [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q)])


def ref_akl_weights(p, q, mu=0.5):
    order = sorted(range(len(p)), key=lambda i: -p[i])
    g_head = g_tail = 0.0
    mass_before = 0.0
    for i in order:
        if mass_before < mu:
            g_head += abs(p[i] - q[i])
        else:
            g_tail += abs(p[i] - q[i])
        mass_before += p[i]
    tot = g_head + g_tail
    return (0.5, 0.5) if tot == 0 else (g_head / tot, g_tail / tot)


def ref_akl(p, q, mu=0.5):
    wh, wt = ref_akl_weights(p, q, mu)
    return wh * _kl(p, q) + wt * _kl(q, p)


def ref_abkd(p, q, alpha=0.2, beta=0.7):
    """The alpha-beta divergence as ABKD's eq. / Cichocki et al. 2011 eq. 4 write it, one token at a time."""
    a, b = alpha, beta
    s = a + b
    total = 0.0
    for pi, qi in zip(p, q):
        if pi == 0 and qi == 0:
            continue  # a token neither distribution supports
        if pi == 0:  # the formula's limit p -> 0: p^a, p^s -> 0 when a, s > 0, else the term blows up
            total += qi ** s / (a * s) if a > 0 and s > 0 else math.inf
        elif qi == 0:
            total += pi ** s / (b * s) if b > 0 and s > 0 else math.inf
        elif a == 0 and b == 0:
            total += 0.5 * (math.log(pi) - math.log(qi)) ** 2
        elif b == 0:
            total += (pi ** a * math.log(pi ** a / qi ** a) - pi ** a + qi ** a) / a ** 2
        elif a == 0:
            total += (qi ** b * math.log(qi ** b / pi ** b) - qi ** b + pi ** b) / b ** 2
        elif s == 0:
            total += ((pi / qi) ** a - math.log((pi / qi) ** a) - 1) / a ** 2
        else:
            total += -(pi ** a * qi ** b - a / s * pi ** s - b / s * qi ** s) / (a * b)
    return total


REFS = {
    "abkd": ref_abkd,
    "fkl": ref_fkl,
    "rkl": ref_rkl,
    "jsd": ref_jsd,
    "tvd": ref_tvd,
    "skl": ref_skl,
    "srkl": ref_srkl,
    "akl": ref_akl,
}


def apply_ref(ref, student_lp: torch.Tensor, teacher_lp: torch.Tensor, **kw) -> torch.Tensor:
    """Loop over all leading indices and apply the scalar reference to each vocab row."""
    q_all, p_all = student_lp.double().exp(), teacher_lp.double().exp()
    out = torch.empty(student_lp.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*[range(d) for d in student_lp.shape[:-1]]):
        out[idx] = ref(p_all[idx].tolist(), q_all[idx].tolist(), **kw)
    return out


def rand_logits(shape, seed, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def rand_pair(shape, seed=0, scale=2.0, dtype=torch.float64):
    return logprobs(rand_logits(shape, seed, scale, dtype)), logprobs(rand_logits(shape, seed + 1000, scale, dtype))


PARAM_CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("tvd", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skl", {}),
    ("skl", {"alpha": 0.4}),
    ("srkl", {}),
    ("srkl", {"alpha": 0.4}),
    ("akl", {}),
    ("akl", {"mu": 0.2}),
    ("akl", {"mu": 0.9}),
    ("abkd", {}),
    ("abkd", {"alpha": 1.0, "beta": 0.0}),
    ("abkd", {"alpha": 0.0, "beta": 1.0}),
    ("abkd", {"alpha": 0.5, "beta": 0.5}),
    ("abkd", {"alpha": 0.0, "beta": 0.0}),
    ("abkd", {"alpha": 0.8, "beta": -0.8}),
    ("abkd", {"alpha": -0.5, "beta": 1.5}),
    ("abkd", {"alpha": 1.5, "beta": -0.4}),
]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,params", PARAM_CASES, ids=lambda x: str(x))
def test_matches_bruteforce_reference(name, params, shape):
    s, t = rand_pair(shape, seed=sum(map(ord, name)) + 10 * len(shape))
    got = get_divergence(name)(s, t, **params)
    defaults = {k: v.default for k, v in get_divergence(name).params.items()}
    want = apply_ref(REFS[name], s, t, **{**defaults, **params})
    assert got.shape == shape[:-1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,params", PARAM_CASES, ids=lambda x: str(x))
def test_peaked_distributions_match_reference(name, params):
    s, t = rand_pair((3, 4, 9), seed=7, scale=8.0)  # very peaked: tiny probabilities
    got = get_divergence(name)(s, t, **params)
    defaults = {k: v.default for k, v in get_divergence(name).params.items()}
    want = apply_ref(REFS[name], s, t, **{**defaults, **params})
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name,params", PARAM_CASES, ids=lambda x: str(x))
def test_zero_when_equal(name, params):
    s, _ = rand_pair((2, 3, 11), seed=3)
    out = get_divergence(name)(s, s.clone(), **params)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,params", PARAM_CASES, ids=lambda x: str(x))
def test_non_negative_and_positive_when_different(name, params, dtype):
    for seed in range(5):
        s, t = rand_pair((4, 5, 13), seed=seed, scale=3.0, dtype=dtype)
        out = get_divergence(name)(s, t, **params)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        assert (out >= -1e-6).all()
        assert (out > 1e-4).all()  # distinct random distributions -> strictly positive


def test_fkl_rkl_direction():
    # p = teacher puts mass on token 0, student q is near uniform
    p = torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    explicit_fkl = (p * (p.log() - q.log())).sum()
    explicit_rkl = (q * (q.log() - p.log())).sum()
    assert not torch.isclose(explicit_fkl, explicit_rkl)
    torch.testing.assert_close(fkl(q.log(), p.log()), explicit_fkl)
    torch.testing.assert_close(rkl(q.log(), p.log()), explicit_rkl)


def test_jsd_endpoints_follow_trl_convention():
    s, t = rand_pair((2, 3, 8), seed=11)
    p, q = t.exp(), s.exp()
    forward = (p * (t - s)).sum(-1)  # KL(p || q), p = teacher
    reverse = (q * (s - t)).sum(-1)  # KL(q || p)
    assert not torch.allclose(forward, reverse)
    torch.testing.assert_close(get_divergence("jsd")(s, t, beta=0.0), forward)
    torch.testing.assert_close(get_divergence("jsd")(s, t, beta=1.0), reverse)
    torch.testing.assert_close(jsd(s, t, beta=0.0), fkl(s, t))
    torch.testing.assert_close(jsd(s, t, beta=1.0), rkl(s, t))


@pytest.mark.parametrize("beta", [0.05, 0.25, 0.5, 0.75, 0.95])
def test_jsd_interior_explicit_formula_and_bound(beta):
    s, t = rand_pair((3, 4, 10), seed=5)
    p, q = t.exp(), s.exp()
    m = beta * p + (1 - beta) * q
    want = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    got = jsd(s, t, beta=beta)
    torch.testing.assert_close(got, want)
    entropy = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    assert (got <= entropy + 1e-12).all()
    if beta == 0.5:
        torch.testing.assert_close(got, jsd(t, s, beta=beta))  # classic JSD is symmetric
    else:
        assert not torch.allclose(got, jsd(t, s, beta=beta))  # generalized JSD is not
    # swapping roles is the same as beta -> 1 - beta
    torch.testing.assert_close(jsd(t, s, beta=1 - beta), got)


def test_skew_kl_endpoints_and_mixture_direction():
    s, t = rand_pair((3, 4, 10), seed=21)
    torch.testing.assert_close(skl(s, t, alpha=0.0), fkl(s, t))
    torch.testing.assert_close(srkl(s, t, alpha=0.0), rkl(s, t))
    torch.testing.assert_close(skl(s, t, alpha=1.0), torch.zeros(3, 4, dtype=torch.float64))
    torch.testing.assert_close(srkl(s, t, alpha=1.0), torch.zeros(3, 4, dtype=torch.float64))
    p, q, a = t.exp(), s.exp(), 0.3
    torch.testing.assert_close(skl(s, t, alpha=a), (p * (p / (a * p + (1 - a) * q)).log()).sum(-1))
    torch.testing.assert_close(srkl(s, t, alpha=a), (q * (q / ((1 - a) * p + a * q)).log()).sum(-1))


def test_tvd_range():
    for seed in range(4):
        s, t = rand_pair((5, 17), seed=seed, scale=5.0)
        out = tvd(s, t)
        assert ((out >= 0) & (out <= 1)).all()
    # disjoint supports -> exactly 1
    ninf = float("-inf")
    s = torch.tensor([[0.0, ninf, ninf]], dtype=torch.float64)
    t = torch.tensor([[ninf, math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    torch.testing.assert_close(tvd(s, t), torch.ones(1, dtype=torch.float64))


def _lp(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_akl_all_gap_in_head_equals_fkl_and_in_tail_equals_rkl():
    t = _lp(0.3, 0.3, 0.2, 0.2)  # mu=0.5 -> head = two 0.3 tokens (mass before 3rd = 0.6 >= 0.5)
    s_head = _lp(0.35, 0.25, 0.2, 0.2)  # gap only on head tokens
    s_tail = _lp(0.3, 0.3, 0.25, 0.15)  # gap only on tail tokens
    assert not torch.isclose(fkl(s_head, t), rkl(s_head, t))
    torch.testing.assert_close(akl(s_head, t, mu=0.5), fkl(s_head, t))
    torch.testing.assert_close(akl(s_tail, t, mu=0.5), rkl(s_tail, t))
    # mu = 1: every token with teacher mass is head; mu = 0: empty head
    torch.testing.assert_close(akl(s_tail, t, mu=1.0), fkl(s_tail, t))
    torch.testing.assert_close(akl(s_head, t, mu=0.0), rkl(s_head, t))


def test_akl_head_boundary_convention():
    # smallest prefix reaching mu: with p = [0.5, 0.3, 0.2] and mu = 0.5 the head is {token 0} only
    t = _lp(0.5, 0.3, 0.2)
    s = _lp(0.4, 0.4, 0.2)  # gaps: head 0.1, tail 0.1 -> weights 0.5 / 0.5
    torch.testing.assert_close(akl(s, t, mu=0.5), 0.5 * fkl(s, t) + 0.5 * rkl(s, t))
    # mu slightly above 0.5 -> head {0, 1}, all gap in head -> FKL
    torch.testing.assert_close(akl(s, t, mu=0.51), fkl(s, t))


def test_akl_weights_are_detached():
    logits_s = rand_logits((3, 9), seed=1).requires_grad_(True)
    t = logprobs(rand_logits((3, 9), seed=2))
    s = logprobs(logits_s)
    akl(s, t, mu=0.5).sum().backward()
    got = logits_s.grad.clone()
    wh = torch.tensor([ref_akl_weights(t[i].exp().tolist(), s[i].exp().tolist(), 0.5)[0] for i in range(3)],
                      dtype=torch.float64)
    logits_s.grad = None
    s = logprobs(logits_s)
    (wh * fkl(s, t) + (1 - wh) * rkl(s, t)).sum().backward()
    torch.testing.assert_close(got, logits_s.grad)


def test_akl_equal_distributions_safe():
    s = logprobs(rand_logits((2, 6), seed=4)).requires_grad_(True)
    out = akl(s, s.detach().clone())
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------- ABKD (alpha-beta divergence)


@pytest.mark.parametrize("alpha,beta", [(0.2, 0.7), (0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.9, -0.9),
                                        (-0.3, 1.2), (2.0, -0.5), (0.3, 0.0), (0.0, 0.4), (1.3, 0.6)])
def test_abkd_matches_the_formula_in_float64(alpha, beta):
    s, t = rand_pair((4, 3, 9), seed=int(100 * (alpha + 3 * beta)) % 97)
    torch.testing.assert_close(abkd(s, t, alpha=alpha, beta=beta), apply_ref(ref_abkd, s, t, alpha=alpha, beta=beta),
                               rtol=1e-10, atol=1e-12)


def test_abkd_special_cases_orientation():
    """(1, 0) is KL(p || q) with p = teacher, (0, 1) is KL(q || p): the formula's beta = 0 limit
    1/a^2 sum p^a log(p^a/q^a) - p^a + q^a at a = 1 is sum p log(p/q) (the -p + q sum to 0), the alpha = 0 one
    sum q log(q/p). (0.5, 0.5) is 4 x the squared Hellinger distance, alpha + beta = 1 Amari's alpha-divergence."""
    s, t = rand_pair((5, 11), seed=31)
    p, q = t.exp(), s.exp()
    forward = (p * (t - s)).sum(-1)
    reverse = (q * (s - t)).sum(-1)
    assert not torch.allclose(forward, reverse)
    torch.testing.assert_close(abkd(s, t, alpha=1.0, beta=0.0), forward, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(abkd(s, t, alpha=0.0, beta=1.0), reverse, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(get_divergence("abkd")(s, t, alpha=1.0, beta=0.0), fkl(s, t))
    torch.testing.assert_close(get_divergence("abkd")(s, t, alpha=0.0, beta=1.0), rkl(s, t))
    torch.testing.assert_close(abkd(s, t, alpha=0.5, beta=0.5), 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))
    a = 0.3
    torch.testing.assert_close(abkd(s, t, alpha=a, beta=1 - a), (1 - (p ** a * q ** (1 - a)).sum(-1)) / (a * (1 - a)))
    # swapping the roles is swapping the parameters: D^(a,b)(p || q) = D^(b,a)(q || p)
    torch.testing.assert_close(abkd(t, s, alpha=0.7, beta=0.2), abkd(s, t, alpha=0.2, beta=0.7))


@pytest.mark.parametrize("alpha,beta,direction", [
    (0.6, 0.0, (0.0, 1.0)),    # beta -> 0
    (0.0, 0.45, (1.0, 0.0)),   # alpha -> 0
    (0.7, -0.7, (0.0, 1.0)),   # alpha + beta -> 0
    (0.0, 0.0, (1.0, 1.0)),    # both -> 0 (along alpha = beta)
    (0.0, 0.0, (1.0, -2.0)),   # both -> 0 (along another ray)
    (1.0, 0.0, (0.0, -1.0)),   # the forward KL from below
])
def test_abkd_limits_are_continuous(alpha, beta, direction):
    """The value at a limit (computed from its own formula) is the limit of the general formula: at a distance
    h = 1e-6 along a ray it differs by O(h), and by 10x less at h = 1e-7."""
    s, t = rand_pair((3, 4, 10), seed=8)
    at = abkd(s, t, alpha=alpha, beta=beta)
    gaps = []
    for h in (1e-6, 1e-7):
        near = abkd(s, t, alpha=alpha + h * direction[0], beta=beta + h * direction[1])
        gaps.append(float((near - at).abs().max()))
        torch.testing.assert_close(near, at, rtol=1e-4, atol=0)
    assert gaps[1] < gaps[0] / 5 or gaps[0] < 1e-12


@pytest.mark.parametrize("alpha,beta", [(0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.6, -0.6), (-0.4, 1.1)])
def test_abkd_gradcheck(alpha, beta):
    ls = rand_logits((3, 6), seed=3).requires_grad_(True)
    lt = rand_logits((3, 6), seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: abkd(logprobs(a), logprobs(b), alpha=alpha, beta=beta), (ls, lt))
    # with vocabulary entries masked in both (zero probability): finite, zero gradient there
    masked = ls.detach().clone()
    masked[:, -2:] = float("-inf")
    masked_t = lt.detach().clone()
    masked_t[:, -2:] = float("-inf")
    x = masked.requires_grad_(True)
    abkd(logprobs(x), logprobs(masked_t), alpha=alpha, beta=beta).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, -2:] == 0).all()


def test_abkd_one_sided_zero_is_the_limit_of_small_probabilities():
    """A token the teacher gives 0 adds q^s / (alpha s) (alpha, s > 0): what the formula tends to as p_v -> 0;
    for alpha <= 0 the divergence is +inf (and so for the student's side with beta)."""
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p_zero = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)
    p_tiny = torch.tensor([0.6, 0.4 - 1e-60, 1e-60], dtype=torch.float64)
    for a, b in [(0.2, 0.7), (1.0, 0.0), (0.5, -0.2)]:
        torch.testing.assert_close(abkd(q.log(), p_zero.log(), alpha=a, beta=b),
                                   abkd(q.log(), p_tiny.log(), alpha=a, beta=b), rtol=1e-9, atol=0)
        torch.testing.assert_close(abkd(p_zero.log(), q.log(), alpha=b, beta=a),  # the student's zero
                                   abkd(p_tiny.log(), q.log(), alpha=b, beta=a), rtol=1e-9, atol=0)
    assert torch.isinf(abkd(q.log(), p_zero.log(), alpha=0.0, beta=1.0))  # KL(q || p) with p_v = 0 < q_v
    assert torch.isinf(abkd(q.log(), p_zero.log(), alpha=-0.3, beta=1.0))


def test_abkd_float32_is_accurate_near_the_limits_and_for_close_distributions():
    """The divided-difference form keeps float32 accurate where the formula as written cancels: close
    distributions and parameters near a limit (the formula in float32 is off by > 100 % there)."""
    s, _ = rand_pair((16, 200), seed=5, scale=3.0)
    near = logprobs(s + 0.01 * rand_logits((16, 200), seed=6))
    for a, b in [(0.2, 0.7), (0.5, 1e-4), (1e-4, 0.5), (0.7, -0.7 + 1e-4)]:
        want = abkd(s, near, alpha=a, beta=b)
        got = abkd(s.float(), near.float(), alpha=a, beta=b).double()
        assert float(((got - want).abs() / want).max()) < 1e-3


# ----------------------------------------------------------------------------- numerics: zeros / -inf / dtypes


@pytest.mark.parametrize("name,params", PARAM_CASES, ids=lambda x: str(x))
def test_masked_vocab_neg_inf_finite_values_and_grads(name, params):
    ninf = float("-inf")
    ls = rand_logits((2, 3, 8), seed=9).requires_grad_(True)
    lt = rand_logits((2, 3, 8), seed=10).requires_grad_(True)
    vocab_mask = torch.zeros(2, 3, 8, dtype=torch.bool)
    vocab_mask[..., 5:] = True  # masked vocabulary entries (both models)
    vocab_mask[0, 1, :4] = True  # one position with a single allowed token (p = q = one-hot)
    s = logprobs(ls.masked_fill(vocab_mask, ninf))
    t = logprobs(lt.masked_fill(vocab_mask, ninf))
    assert torch.isinf(s).any()
    out = get_divergence(name)(s, t, **params)
    assert torch.isfinite(out).all()
    assert out[0, 1].abs() < 1e-12  # identical one-hot distributions
    # reference ignores zero-probability entries (0 log 0 = 0)
    defaults = {k: v.default for k, v in get_divergence(name).params.items()}
    torch.testing.assert_close(out, apply_ref(REFS[name], s, t, **{**defaults, **params}))
    out.sum().backward()
    for g in (ls.grad, lt.grad):
        assert torch.isfinite(g).all()
        assert (g[vocab_mask] == 0).all()


@pytest.mark.parametrize(
    "name,params",
    [("fkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9}), ("tvd", {}), ("skl", {}), ("srkl", {}), ("abkd", {}),
     ("abkd", {"alpha": 1.0, "beta": 0.0}), ("abkd", {"alpha": 1.5, "beta": -0.4})],
    ids=lambda x: str(x),
)
def test_teacher_only_zero_probability_is_finite(name, params):
    # teacher gives 0 to a token the student supports: FKL and all mixture divergences stay finite
    ls = rand_logits((4, 6), seed=12).requires_grad_(True)
    lt = rand_logits((4, 6), seed=13).clone()
    lt[:, 0] = float("-inf")
    out = get_divergence(name)(logprobs(ls), logprobs(lt), **params)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(ls.grad).all()


@pytest.mark.parametrize(
    "name,params",
    [("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1}), ("tvd", {}), ("skl", {}), ("srkl", {}), ("abkd", {}),
     ("abkd", {"alpha": 0.0, "beta": 1.0}), ("abkd", {"alpha": -0.5, "beta": 1.5})],
    ids=lambda x: str(x),
)
def test_student_only_zero_probability_is_finite(name, params):
    ls = rand_logits((4, 6), seed=14).clone()
    ls[:, 2] = float("-inf")
    ls.requires_grad_(True)
    lt = rand_logits((4, 6), seed=15)
    out = get_divergence(name)(logprobs(ls), logprobs(lt), **params)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(ls.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_inputs_are_computed_in_fp32(name, dtype):
    s64, t64 = rand_pair((2, 3, 16), seed=17)
    out = get_divergence(name)(s64.to(dtype), t64.to(dtype))
    assert out.dtype == torch.float32
    ref = get_divergence(name)(s64.to(dtype).double(), t64.to(dtype).double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_logprobs_temperature_and_dtype():
    x = rand_logits((2, 5), seed=18, dtype=torch.bfloat16)
    lp = logprobs(x, temperature=2.0)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.log_softmax(x.float() / 2.0, -1))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2))
    with pytest.raises(ValueError):
        logprobs(x, temperature=0.0)


# ----------------------------------------------------------------------------- registry


def test_registry_contents_and_docs():
    assert set(NAMES) <= set(DIVERGENCES)
    for name in NAMES:
        d = DIVERGENCES[name]
        assert isinstance(d, Divergence) and d.name == name and d.doc
    assert DIVERGENCES["jsd"].params == {"beta": ParamSpec(0.5, 0.0, 1.0)}
    assert DIVERGENCES["skl"].params == {"alpha": ParamSpec(0.1, 0.0, 1.0)}
    assert DIVERGENCES["srkl"].params == {"alpha": ParamSpec(0.1, 0.0, 1.0)}
    assert DIVERGENCES["akl"].params == {"mu": ParamSpec(0.5, 0.0, 1.0)}
    assert DIVERGENCES["abkd"].params == {"alpha": ParamSpec(0.2, -5.0, 5.0), "beta": ParamSpec(0.7, -5.0, 5.0)}
    assert DIVERGENCES["fkl"].params == {}
    assert "KL(p || q)" in DIVERGENCES["fkl"].doc and "KL(q || p)" in DIVERGENCES["rkl"].doc
    with pytest.raises(dataclasses.FrozenInstanceError):
        DIVERGENCES["fkl"].name = "x"  # type: ignore[misc]


def test_unknown_name_lists_allowed():
    with pytest.raises(KeyError) as ei:
        get_divergence("not_a_divergence")
    msg = str(ei.value)
    assert "not_a_divergence" in msg
    for name in NAMES:
        assert name in msg


@pytest.mark.parametrize("name,param,value", [("jsd", "beta", 1.5), ("skl", "alpha", -0.1), ("akl", "mu", 2.0)])
def test_out_of_range_param_names_param(name, param, value):
    s, t = rand_pair((2, 4), seed=0)
    with pytest.raises(ValueError) as ei:
        get_divergence(name)(s, t, **{param: value})
    msg = str(ei.value)
    assert param in msg and str(value) in msg and "[0.0, 1.0]" in msg


def test_unknown_param_and_nan_rejected():
    s, t = rand_pair((2, 4), seed=0)
    with pytest.raises(TypeError, match="gamma"):
        get_divergence("jsd")(s, t, gamma=0.3)
    with pytest.raises(ValueError, match="beta"):
        get_divergence("jsd")(s, t, beta=float("nan"))


def test_defaults_filled_by_registry_call():
    s, t = rand_pair((3, 6), seed=1)
    torch.testing.assert_close(get_divergence("jsd")(s, t), jsd(s, t, beta=0.5))
    torch.testing.assert_close(get_divergence("skl")(s, t), skl(s, t, alpha=0.1))
    assert not torch.allclose(get_divergence("jsd")(s, t), jsd(s, t, beta=0.2))


def test_register_custom_divergence():
    seen = {}

    @register_divergence("_test_scaled_fkl", params={"scale": ParamSpec(default=2.0, low=0.0, high=10.0)})
    def _scaled(student_logprobs, teacher_logprobs, scale=2.0):
        """scaled forward KL (test only)"""
        seen["scale"] = scale
        return scale * fkl(student_logprobs, teacher_logprobs)

    try:
        s, t = rand_pair((3, 6), seed=2)
        torch.testing.assert_close(get_divergence("_test_scaled_fkl")(s, t), 2.0 * fkl(s, t))
        assert seen["scale"] == 2.0
        get_divergence("_test_scaled_fkl")(s, t, scale=3)
        assert seen["scale"] == 3.0
        with pytest.raises(ValueError):
            register_divergence("_test_scaled_fkl")(_scaled)  # duplicate name
        with pytest.raises(ValueError):
            register_divergence("_test_bad_default", params={"x": ParamSpec(5.0, 0.0, 1.0)})(_scaled)
    finally:
        DIVERGENCES.pop("_test_scaled_fkl", None)
        DIVERGENCES.pop("_test_bad_default", None)


# ----------------------------------------------------------------------------- shared vocab / token_divergence


def test_shared_vocab_slices_to_smaller():
    s = torch.randn(2, 3, 10)
    t = torch.randn(2, 3, 12)
    s2, t2 = shared_vocab(s, t)
    assert s2.shape == t2.shape == (2, 3, 10)
    assert torch.equal(s2, s) and torch.equal(t2, t[..., :10])
    t3, s3 = shared_vocab(t, s)
    assert torch.equal(t3, t[..., :10]) and torch.equal(s3, s)
    same_s, same_t = shared_vocab(s, s)
    assert same_s is s and same_t is s


def test_token_divergence_vocab_mismatch_and_temperature():
    s = rand_logits((2, 3, 10), seed=30)
    t = rand_logits((2, 3, 13), seed=31)
    out = token_divergence(s, t, "jsd", temperature=2.0, beta=0.3)
    want = jsd(torch.log_softmax(s / 2.0, -1), torch.log_softmax(t[..., :10] / 2.0, -1), beta=0.3)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, want)
    with pytest.raises(KeyError):
        token_divergence(s, t, "nope")


# ----------------------------------------------------------------------------- reductions


def _padded_batch():
    per_token = torch.arange(1, 25, dtype=torch.float64).reshape(4, 6)
    lengths = [6, 1, 4, 2]  # uneven padding
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return per_token, mask


def test_masked_token_sum_and_count():
    per_token, mask = _padded_batch()
    total, count = masked_token_sum_and_count(per_token, mask)
    assert count.item() == 13
    assert total.item() == sum(per_token[mask].tolist())
    total_f, count_f = masked_token_sum_and_count(per_token, mask.float())
    assert total_f.item() == total.item() and count_f.item() == 13
    with pytest.raises(ValueError):
        masked_token_sum_and_count(per_token, mask[:, :3])


def test_reduce_tokens_gradient_accumulation_sum_equals_full_mean():
    per_token, mask = _padded_batch()
    full = reduce_tokens(per_token, mask)
    torch.testing.assert_close(full, per_token[mask].mean())
    n_items = int(mask.sum())
    parts = [reduce_tokens(per_token[a:b], mask[a:b], num_items=n_items) for a, b in [(0, 2), (2, 4)]]
    torch.testing.assert_close(parts[0] + parts[1], full)
    parts_t = [reduce_tokens(per_token[a:b], mask[a:b], num_items=mask.sum()) for a, b in [(0, 2), (2, 4)]]
    torch.testing.assert_close(parts_t[0] + parts_t[1], full)
    # the naive average of micro-batch means is different here (uneven padding): the test can fail
    naive = 0.5 * (reduce_tokens(per_token[:2], mask[:2]) + reduce_tokens(per_token[2:], mask[2:]))
    assert not torch.isclose(naive, full)


def test_reduce_tokens_gradient_accumulation_gradients():
    torch.manual_seed(0)
    student_logits = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(4, 5, 7, dtype=torch.float64)
    _, mask6 = _padded_batch()
    mask = mask6[:, :5]
    per_token = token_divergence(student_logits, teacher_logits, "fkl")
    reduce_tokens(per_token, mask).backward()
    full_grad = student_logits.grad.clone()
    student_logits.grad = None
    n_items = int(mask.sum())
    for a, b in [(0, 1), (1, 3), (3, 4)]:
        pt = token_divergence(student_logits[a:b], teacher_logits[a:b], "fkl")
        reduce_tokens(pt, mask[a:b], num_items=n_items).backward()
    torch.testing.assert_close(student_logits.grad, full_grad)


def test_reduce_tokens_padding_never_contributes():
    per_token, mask = _padded_batch()
    base = reduce_tokens(per_token, mask)
    for junk in (float("nan"), float("inf"), -1e9, 5.0):
        garbage = per_token.clone()
        garbage[~mask] = junk
        assert reduce_tokens(garbage, mask).item() == base.item()
    # through the divergence: change logits at padded positions -> same loss, zero grads there
    torch.manual_seed(1)
    ls = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    lt = torch.randn(4, 6, 5, dtype=torch.float64)
    loss = reduce_tokens(token_divergence(ls, lt, "jsd"), mask)
    lt2 = lt.clone()
    lt2[~mask] = torch.randn(int((~mask).sum()), 5, dtype=torch.float64) * 10
    ls2 = ls.detach().clone()
    ls2[~mask] = 3.0
    torch.testing.assert_close(reduce_tokens(token_divergence(ls2, lt2, "jsd"), mask), loss)
    loss.backward()
    assert (ls.grad[~mask] == 0).all() and (ls.grad[mask] != 0).any()


def test_reduce_tokens_empty_mask_is_zero():
    per_token = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = reduce_tokens(per_token, mask)
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(per_token.grad).all()
    assert reduce_tokens(per_token, mask, num_items=0).item() == 0.0


# ----------------------------------------------------------------------------- TRL cross-check (optional)


def _trl_generalized_jsd_loss():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer  # trl >= 0.2x moved GKD to experimental
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            pytest.skip("GKDTrainer not found in installed trl")
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd_loss(beta):
    loss_fn = _trl_generalized_jsd_loss()
    s = rand_logits((2, 3, 11), seed=40)
    t = rand_logits((2, 3, 11), seed=41)
    trl_per_token = loss_fn(s, t, beta=beta, temperature=1.0, reduction="none").sum(-1)
    ours = token_divergence(s, t, "jsd", beta=beta)
    torch.testing.assert_close(ours, trl_per_token, rtol=1e-10, atol=1e-12)
