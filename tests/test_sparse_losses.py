"""Sparse divergences over the teacher's top-k + tail bucket: exact at k = V, bounded error at k < V."""

from __future__ import annotations

import math

import pytest
import torch

from kd_core.losses.divergences import DIVERGENCES, fkl, rkl
from kd_core.losses.tokens import logprobs, token_divergence
from kd_core.losses.sparse import sparse_divergence, sparse_token_divergence, tail_logmass, top_k_with_tail

V = 13


def _logits(seed: int, shape=(4, 5, V), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_equals_dense_at_k_equal_vocab_values_and_gradients(name, temperature):
    student = _logits(0).requires_grad_(True)
    teacher = torch.cat([_logits(1), torch.full((4, 5, 3), 50.0, dtype=torch.float64)], -1)  # 3 padded rows
    dense = token_divergence(student, teacher, name, temperature=temperature)
    (g_dense,) = torch.autograd.grad(dense.sum(), student)

    top_lp, top_ids, tail = top_k_with_tail(logprobs(teacher[..., :V], temperature), k=V)
    assert torch.isneginf(tail).all()
    sparse = sparse_token_divergence(student, top_lp, top_ids, tail, name, temperature=temperature, vocab_size=V)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), student)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-10, atol=1e-12)


def test_tail_logmass_is_exact_when_the_tail_is_tiny():
    # a peaked distribution: log(1 - sum(top)) would cancel to 0 or NaN in float32, the log-sum-exp does not
    logits = torch.tensor([[30.0, 0.0, -1.0, -2.0, -3.0]])
    lp = torch.log_softmax(logits, -1)
    top_ids = torch.tensor([[0]])
    expected = torch.log(torch.exp(logits[0, 1:].double()).sum()) - torch.logsumexp(logits[0].double(), -1)
    got = tail_logmass(lp, top_ids)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), float(expected), rel_tol=1e-6)
    naive = torch.log1p(-lp.gather(-1, top_ids).exp().sum(-1))
    assert not torch.isfinite(naive).all() or abs(float(naive) - float(expected)) > 1.0  # what the naive form loses


def _coarse_error(name: str, k: int, seed: int, **params):
    """(true - sparse) per position and the pieces of the closed forms, for random logits."""
    s_lp, t_lp = logprobs(_logits(seed, (64, V), 2.0)), logprobs(_logits(seed + 100, (64, V), 2.0))
    top_lp, top_ids, tail = top_k_with_tail(t_lp, k)
    dense = DIVERGENCES[name](s_lp, t_lp, **params)
    sparse = sparse_divergence(s_lp, top_lp, top_ids, tail, name, **params)
    in_tail = torch.ones_like(t_lp, dtype=torch.bool).scatter(-1, top_ids, False)
    P, Q = tail.exp(), tail_logmass(s_lp, top_ids).exp()
    return dense - sparse, t_lp, s_lp, in_tail, P, Q


def _renormalised_on_tail(lp: torch.Tensor, in_tail: torch.Tensor) -> torch.Tensor:
    masked = lp.masked_fill(~in_tail, float("-inf"))
    return masked - masked.logsumexp(-1, keepdim=True)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_forward_kl_error_is_the_tail_chain_rule_term_and_within_its_bound(k):
    err, t_lp, s_lp, in_tail, P, Q = _coarse_error("fkl", k, seed=k)
    closed_form = P * fkl(_renormalised_on_tail(s_lp, in_tail), _renormalised_on_tail(t_lp, in_tail))
    torch.testing.assert_close(err, closed_form, rtol=1e-9, atol=1e-12)
    assert (err >= -1e-12).all()
    # bound: P * max_{v in tail} log(p_v Q / (q_v P))
    ratio = (t_lp - s_lp + (Q / P).log().unsqueeze(-1)).masked_fill(~in_tail, float("-inf")).amax(-1)
    assert (err <= P * ratio + 1e-12).all()
    assert err.max() > 1e-3  # the bound is not checked on a vacuous case


@pytest.mark.parametrize("k", [1, 3, 8])
def test_reverse_kl_error_is_the_student_tail_term(k):
    err, t_lp, s_lp, in_tail, P, Q = _coarse_error("rkl", k, seed=10 + k)
    closed_form = Q * rkl(_renormalised_on_tail(s_lp, in_tail), _renormalised_on_tail(t_lp, in_tail))
    torch.testing.assert_close(err, closed_form, rtol=1e-9, atol=1e-12)
    assert (err >= -1e-12).all() and err.max() > 1e-3


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_jsd_error_within_derived_bound(k, beta):
    err, _, _, _, P, Q = _coarse_error("jsd", k, seed=20 + k, beta=beta)
    bound = beta * math.log(1 / beta) * P + (1 - beta) * math.log(1 / (1 - beta)) * Q
    assert (err >= -1e-12).all()
    assert (err <= bound + 1e-12).all()
    assert err.max() > 1e-4


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_error_shrinks_as_k_grows_and_vanishes_at_vocab_size(name):
    errors = [_coarse_error(name, k, seed=3)[0] for k in range(1, V + 1)]
    for coarse, fine in zip(errors, errors[1:]):  # refining the partition can only increase an f-divergence
        assert (fine <= coarse + 1e-12).all()
    assert errors[-1].abs().max() < 1e-12
