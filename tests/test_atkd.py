"""Tests for kd_core.losses.atkd (ATKD decomposition and per-token objective)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kd_core.losses.atkd import atkd_per_token, classic_kd_from_parts, decompose
from kd_core.losses.divergences import fkl, rkl
from kd_core.losses.tokens import logprobs

DIVS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}), ("skl", {}), ("srkl", {}), ("akl", {})]


def rand_logits(shape, seed, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def rand_targets(shape, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


# ----------------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("shape", [(7,), (4, 9), (2, 5, 11), (2, 2, 3, 6)], ids=str)
def test_fkl_identity_tkd_plus_unc_dkd(shape, dtype, tol):
    s = logprobs(rand_logits(shape, 1, dtype=dtype))
    t = logprobs(rand_logits(shape, 2, dtype=dtype))
    g = rand_targets(shape[:-1], shape[-1], 3)
    tkd, dkd, unc = decompose(s, t, g, "fkl")
    assert tkd.shape == dkd.shape == unc.shape == shape[:-1]
    assert tkd.dtype == dtype
    torch.testing.assert_close(classic_kd_from_parts(tkd, dkd, unc), fkl(s, t), rtol=0, atol=tol)
    assert (dkd > 1e-6).all() and (tkd > 0).all()  # non-trivial parts


def test_fkl_identity_when_teacher_is_confident():
    # p_g -> 1: UNC tiny but must stay accurate and everything finite
    s = logprobs(rand_logits((3, 4, 10), 5, dtype=torch.float32))
    lt = rand_logits((3, 4, 10), 6, dtype=torch.float32)
    g = rand_targets((3, 4), 10, 7)
    lt = lt.scatter(-1, g.unsqueeze(-1), 40.0)  # teacher nearly one-hot on the target
    t = logprobs(lt)
    tkd, dkd, unc = decompose(s, t, g, "fkl")
    for x in (tkd, dkd, unc):
        assert torch.isfinite(x).all()
    assert (unc > 0).all() and (unc < 1e-14).all()  # 1 - p_g is not rounded to 0
    torch.testing.assert_close(classic_kd_from_parts(tkd, dkd, unc), fkl(s, t), rtol=1e-6, atol=1e-6)


def test_rkl_construction_identity_with_student_weight():
    # same construction on reverse KL: KL(q||p) = TKD_rkl + (1 - q_g) * DKD_rkl
    s = logprobs(rand_logits((2, 5, 8), 11))
    t = logprobs(rand_logits((2, 5, 8), 12))
    g = rand_targets((2, 5), 8, 13)
    tkd, dkd, _ = decompose(s, t, g, "rkl")
    q_unc = 1 - s.gather(-1, g.unsqueeze(-1)).squeeze(-1).exp()
    torch.testing.assert_close(tkd + q_unc * dkd, rkl(s, t))


def _ref_parts(p, q, g, div_ref):
    pg, qg = p[g], q[g]
    pb, qb = [pg, 1 - pg], [qg, 1 - qg]
    ph = [p[k] / (1 - pg) for k in range(len(p)) if k != g]
    qh = [q[k] / (1 - qg) for k in range(len(q)) if k != g]
    return div_ref(pb, qb), div_ref(ph, qh), 1 - pg


def _kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


REF = {
    "fkl": lambda p, q: _kl(p, q),
    "rkl": lambda p, q: _kl(q, p),
    "tvd": lambda p, q: 0.5 * sum(abs(x - y) for x, y in zip(p, q)),
}


@pytest.mark.parametrize("name", sorted(REF))
def test_decompose_matches_bruteforce(name):
    shape = (2, 3, 6)
    s = logprobs(rand_logits(shape, 21))
    t = logprobs(rand_logits(shape, 22))
    g = rand_targets(shape[:-1], shape[-1], 23)
    tkd, dkd, unc = decompose(s, t, g, name)
    for idx in itertools.product(range(2), range(3)):
        rt, rd, ru = _ref_parts(t[idx].exp().tolist(), s[idx].exp().tolist(), int(g[idx]), REF[name])
        assert tkd[idx].item() == pytest.approx(rt, rel=1e-9, abs=1e-12)
        assert dkd[idx].item() == pytest.approx(rd, rel=1e-9, abs=1e-12)
        assert unc[idx].item() == pytest.approx(ru, rel=1e-9, abs=1e-12)


def test_unc_is_teacher_only():
    t = logprobs(rand_logits((3, 7), 31))
    g = rand_targets((3,), 7, 32)
    _, _, unc1 = decompose(logprobs(rand_logits((3, 7), 33)), t, g)
    _, _, unc2 = decompose(logprobs(rand_logits((3, 7), 34)), t, g)
    torch.testing.assert_close(unc1, unc2)
    torch.testing.assert_close(unc1, 1 - t.exp().gather(-1, g.unsqueeze(-1)).squeeze(-1))


def test_decompose_passes_divergence_params():
    s = logprobs(rand_logits((4, 6), 41))
    t = logprobs(rand_logits((4, 6), 42))
    g = rand_targets((4,), 6, 43)
    a = decompose(s, t, g, "jsd", beta=0.1)
    b = decompose(s, t, g, "jsd", beta=0.9)
    assert not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="beta"):
        decompose(s, t, g, "jsd", beta=3.0)
    with pytest.raises(KeyError):
        decompose(s, t, g, "unknown")


# ----------------------------------------------------------------------------- atkd_per_token


def _handmade():
    """B=1, T=4, V=4, target id 0 everywhere; teacher p_g = 0.9, 0.2, 0.6, 0.4 -> UNC 0.1, 0.8, 0.4, 0.6."""
    pg = torch.tensor([0.9, 0.2, 0.6, 0.4], dtype=torch.float64)
    rest = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    probs = torch.cat([pg[:, None], (1 - pg)[:, None] * rest[None, :]], dim=-1)
    teacher_logits = probs.log().unsqueeze(0)  # [1, 4, 4]
    student_logits = rand_logits((1, 4, 4), 51)
    targets = torch.zeros(1, 4, dtype=torch.long)
    return student_logits, teacher_logits, targets


@pytest.mark.parametrize(
    "hard_fraction,hard_positions",
    [(0.0, []), (0.25, [1]), (0.3, [1, 3]), (0.5, [1, 3]), (0.75, [1, 3, 2]), (1.0, [0, 1, 2, 3])],
)
def test_hard_easy_selection_handmade(hard_fraction, hard_positions):
    s, t, g = _handmade()
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = atkd_per_token(s, t, g, mask, hard_fraction=hard_fraction, tkd_weight=2.0, dkd_weight=0.5)
    tkd, dkd, unc = decompose(logprobs(s), logprobs(t), g)
    torch.testing.assert_close(unc[0], torch.tensor([0.1, 0.8, 0.4, 0.6], dtype=torch.float64))
    for i in range(4):
        want = 2.0 * tkd[0, i] + 0.5 * dkd[0, i] if i in hard_positions else 0.5 * dkd[0, i]
        torch.testing.assert_close(out[0, i], want)
    assert (tkd > 1e-3).all()  # hard vs easy is distinguishable


def test_masked_tokens_excluded_from_output_and_ranking():
    s, t, g = _handmade()
    # mask out the most uncertain position (1); valid UNC: pos0 0.1, pos2 0.4, pos3 0.6 -> ceil(0.5*3)=2 hard: 3, 2
    mask = torch.tensor([[True, False, True, True]])
    g_pad = g.clone()
    g_pad[0, 1] = -100  # ignore-index labels at masked positions must be fine
    out = atkd_per_token(s, t, g_pad, mask, hard_fraction=0.5)
    tkd, dkd, _ = decompose(logprobs(s), logprobs(t), g)
    assert out[0, 1].item() == 0.0
    torch.testing.assert_close(out[0, 0], dkd[0, 0])
    torch.testing.assert_close(out[0, 2], tkd[0, 2] + dkd[0, 2])
    torch.testing.assert_close(out[0, 3], tkd[0, 3] + dkd[0, 3])
    # values at the masked position never matter
    s2, t2 = s.clone(), t.clone()
    s2[0, 1] = 100.0
    t2[0, 1] = torch.tensor([-50.0, 3.0, 0.0, 9.0])
    torch.testing.assert_close(atkd_per_token(s2, t2, g_pad, mask, hard_fraction=0.5), out)


def test_ranking_is_over_the_whole_batch():
    s, t, g = _handmade()
    # second sequence: all positions very confident (UNC ~ 0) -> all hard tokens come from sequence 0
    t_conf = t.clone()
    t_conf[..., 0] = 30.0
    S, T, G = torch.cat([s, s]), torch.cat([t, t_conf]), torch.cat([g, g])
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = atkd_per_token(S, T, G, mask, hard_fraction=0.5, dkd_weight=0.0)  # only hard tokens are non-zero
    assert (out[0] > 0).all() and (out[1] == 0).all()


def test_hard_fraction_one_gives_tkd_plus_dkd_everywhere():
    s = rand_logits((2, 5, 9), 61)
    t = rand_logits((2, 5, 9), 62)
    g = rand_targets((2, 5), 9, 63)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = atkd_per_token(s, t, g, mask, hard_fraction=1.0)
    tkd, dkd, unc = decompose(logprobs(s), logprobs(t), g)
    torch.testing.assert_close(out[mask], (tkd + dkd)[mask])
    assert (out[~mask] == 0).all()
    # decoupled: differs from classic KD (DKD not scaled by UNC)
    assert not torch.allclose(out[mask], classic_kd_from_parts(tkd, dkd, unc)[mask])


def test_temperature_and_vocab_mismatch():
    s = rand_logits((2, 3, 8), 71)
    t = rand_logits((2, 3, 10), 72)  # teacher has 2 padded vocab rows
    g = rand_targets((2, 3), 8, 73)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = atkd_per_token(s, t, g, mask, hard_fraction=1.0, temperature=2.0)
    tkd, dkd, _ = decompose(torch.log_softmax(s / 2, -1), torch.log_softmax(t[..., :8] / 2, -1), g)
    torch.testing.assert_close(out, tkd + dkd)


def test_invalid_hard_fraction():
    s, t, g = _handmade()
    with pytest.raises(ValueError, match="hard_fraction"):
        atkd_per_token(s, t, g, torch.ones(1, 4, dtype=torch.bool), hard_fraction=1.5)


def test_empty_mask_gives_zeros():
    s, t, g = _handmade()
    out = atkd_per_token(s, t, g, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name,params", DIVS, ids=lambda x: str(x))
def test_gradients_finite(name, params):
    ninf = float("-inf")
    ls = rand_logits((2, 6, 10), 81, dtype=torch.float32)
    lt = rand_logits((2, 6, 10), 82, dtype=torch.float32)
    g = rand_targets((2, 6), 5, 83)  # targets among the first 5 ids
    vocab_mask = torch.zeros(2, 6, 10, dtype=torch.bool)
    vocab_mask[..., 7:] = True  # masked vocabulary rows (both models)
    lt = lt.scatter(-1, g.unsqueeze(-1), 60.0)  # some teacher positions ~one-hot (UNC -> 0)
    lt[1] = rand_logits((6, 10), 84, dtype=torch.float32)
    ls[0, 0] = ls[0, 0].scatter(-1, g[0, 0:1], 80.0)  # a student ~one-hot on the target
    # one position where every non-target token is masked: 1 - p_g = 1 - q_g = 0 exactly
    vocab_mask[1, 2] = True
    vocab_mask[1, 2, g[1, 2]] = False
    ls = ls.masked_fill(vocab_mask, ninf).requires_grad_(True)
    lt = lt.masked_fill(vocab_mask, ninf).requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 5] = False
    out = atkd_per_token(ls, lt, g, mask, divergence=name, hard_fraction=0.5, **params)
    assert torch.isfinite(out).all()
    assert out[1, 2].abs() < 1e-6  # both distributions are the same one-hot
    out.sum().backward()
    for grad in (ls.grad, lt.grad):
        assert torch.isfinite(grad).all()
        assert (grad[vocab_mask] == 0).all()
    assert (ls.grad[0, 5] == 0).all()  # padding position
    assert ls.grad.abs().sum() > 0


def test_full_decompose_gradients_finite_with_confident_teacher():
    ls = rand_logits((3, 7), 91).requires_grad_(True)
    lt = rand_logits((3, 7), 92)
    g = torch.tensor([0, 3, 6])
    lt = lt.scatter(-1, g.unsqueeze(-1), 1e3)  # p_g == 1 in float64 up to rounding
    tkd, dkd, unc = decompose(logprobs(ls), logprobs(lt), g)
    (tkd + dkd).sum().backward()
    assert torch.isfinite(ls.grad).all()
    assert torch.isfinite(dkd).all() and (unc >= 0).all()
