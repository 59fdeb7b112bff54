"""Several teachers (kd_core/teachers/ensemble.py): the combined signal against brute-force formulas, one teacher of
weight 1 against the single-teacher signal, cached (top_k = V) against live, the fused path against the unfused."""

from __future__ import annotations

import pytest
import torch

from kd_core.models.lm import HeadInputs
from kd_core.losses.sparse import top_k_with_tail
from kd_core.losses.tokens import logprobs
from kd_core.teachers.ensemble import MultiTeacherSignal
from kd_core.teachers.signal import DenseTeacherSignal, TopKTeacherSignal

B, T, V, TAU = 2, 5, 13, 1.7
WEIGHTS = [0.7, 0.2, 0.1]


def brute(name: str, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """The divergences written out on full distributions [..., C] (p = teacher, q = student; 0 log 0 = 0)."""
    p, q = lp.exp(), lq.exp()

    def kl(a, la, lb):
        return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)

    if name == "fkl":
        return kl(p, lp, lq)
    if name == "rkl":
        return kl(q, lq, lp)
    if name == "jsd":  # beta 0.3
        m = 0.3 * p + 0.7 * q
        return 0.3 * kl(p, lp, m.log()) + 0.7 * kl(q, lq, m.log())
    raise AssertionError(name)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V + 2, generator=g, dtype=torch.float64)  # 2 padded rows beyond the teachers' V
    teachers = [3 * torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in WEIGHTS]
    positions = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)
    return student, teachers, positions


def dense(teachers):
    return [DenseTeacherSignal(t) for t in teachers]


def top_k(teachers, positions, k):
    out = []
    for t in teachers:
        lp, ids, tail = top_k_with_tail(logprobs(t[positions], TAU), k)
        out.append(TopKTeacherSignal(lp, ids, tail, V, TAU))
    return out


def value_and_grad(signal, student, positions, name, **params):
    x = student.clone().requires_grad_(True)
    v = signal.divergence(x, positions, name, temperature=TAU, **params)
    v.sum().backward()
    return v.detach(), x.grad


def student_lp(student):
    return logprobs(student[..., :V], TAU)


@pytest.mark.parametrize("name,params", [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3})])
def test_sum_and_mixture_of_live_teachers_against_brute_force(setup, name, params):
    student, teachers, positions = setup
    x = student.clone().requires_grad_(True)
    lq = student_lp(x)
    lps = [logprobs(t, TAU) for t in teachers]
    want_sum = sum(w * brute(name, lp, lq) for w, lp in zip(WEIGHTS, lps)) * positions
    mixture = sum(w * lp.exp() for w, lp in zip(WEIGHTS, lps)).log()
    want_mix = brute(name, mixture, lq) * positions
    for combine, want in (("sum", want_sum), ("mixture", want_mix)):
        (grad_want,) = torch.autograd.grad(want.sum(), x, retain_graph=True)
        got, grad = value_and_grad(MultiTeacherSignal(dense(teachers), WEIGHTS, combine), student, positions, name,
                                   **params)
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, grad_want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(want_sum, want_mix)  # the two combines are different objectives


def test_weights_are_normalised(setup):
    student, teachers, positions = setup
    a = MultiTeacherSignal(dense(teachers), [7.0, 2.0, 1.0], "sum").divergence(student, positions, "fkl", TAU)
    b = MultiTeacherSignal(dense(teachers), WEIGHTS, "sum").divergence(student, positions, "fkl", TAU)
    torch.testing.assert_close(a, b)


def test_fkl_sum_and_mixture_differ_by_the_teachers_disagreement_only(setup):
    """D_sum − D_mix = Σ_k w_k KL(p_k || p̄), which does not depend on the student: equal gradients."""
    student, teachers, positions = setup
    s_val, s_grad = value_and_grad(MultiTeacherSignal(dense(teachers), WEIGHTS, "sum"), student, positions, "fkl")
    m_val, m_grad = value_and_grad(MultiTeacherSignal(dense(teachers), WEIGHTS, "mixture"), student, positions, "fkl")
    lps = [logprobs(t, TAU) for t in teachers]
    mix = sum(w * lp.exp() for w, lp in zip(WEIGHTS, lps)).log()
    disagreement = sum(w * brute("fkl", lp, mix) for w, lp in zip(WEIGHTS, lps)) * positions  # KL(p_k || p̄)
    torch.testing.assert_close(s_val - m_val, disagreement)
    torch.testing.assert_close(s_grad, m_grad)


@pytest.mark.parametrize("combine", ["sum", "mixture"])
@pytest.mark.parametrize("kind", ["dense", "top_k"])
def test_one_teacher_of_weight_one_is_the_single_teacher(setup, combine, kind):
    student, teachers, positions = setup
    single = dense(teachers[:1])[0] if kind == "dense" else top_k(teachers[:1], positions, 4)[0]
    multi = MultiTeacherSignal([single], [1.0], combine)
    for name, params in (("fkl", {}), ("jsd", {"beta": 0.3}), ("rkl", {})):
        want, want_grad = value_and_grad(single, student, positions, name, **params)
        got, grad = value_and_grad(multi, student, positions, name, **params)
        if combine == "sum" or kind == "dense":  # the same computation
            assert torch.equal(got, want) and torch.equal(grad, want_grad), (name, combine, kind)
        else:  # the same categories, summed in another order
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_cached_teachers_with_top_k_equal_to_the_vocabulary_are_the_live_ones(setup, combine):
    student, teachers, positions = setup
    live = MultiTeacherSignal(dense(teachers), WEIGHTS, combine)
    cached = MultiTeacherSignal(top_k(teachers, positions, V), WEIGHTS, combine)
    mixed = MultiTeacherSignal(dense(teachers[:1]) + top_k(teachers[1:], positions, V), WEIGHTS, combine)
    want, want_grad = value_and_grad(live, student, positions, "jsd", beta=0.3)
    for signal in (cached, mixed):
        got, grad = value_and_grad(signal, student, positions, "jsd", beta=0.3)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_mixture_of_top_k_caches_follows_the_documented_rule(setup):
    """Each cached teacher: its top-k, its tail spread evenly over its other V − k tokens; p̄ and q coarsened to
    the union U of the top-k ids + one tail bucket. Written out per position with Python sets."""
    student, teachers, positions = setup
    k = 3
    signals = top_k(teachers, positions, k)
    x = student.clone().requires_grad_(True)
    lq_rows = student_lp(x)[positions]
    want = []
    for n in range(int(positions.sum())):
        full = []
        for s in signals:
            ids = s.top_ids[n].tolist()
            p = torch.full((V,), float(s.tail_logmass[n].exp()) / (V - k), dtype=torch.float64)
            p[ids] = s.top_logprobs[n].exp()
            full.append(p)
        p_bar = sum(w * p for w, p in zip(WEIGHTS, full))
        union = sorted({i for s in signals for i in s.top_ids[n].tolist()})
        rest = [i for i in range(V) if i not in union]
        q = lq_rows[n].exp()
        p_c = torch.cat([p_bar[union], p_bar[rest].sum().reshape(1)])
        q_c = torch.cat([q[union], q[rest].sum().reshape(1)])
        want.append(brute("fkl", p_c.log(), q_c.log()))
    want = torch.stack(want)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    got, grad = value_and_grad(MultiTeacherSignal(signals, WEIGHTS, "mixture"), student, positions, "fkl")
    torch.testing.assert_close(got[positions], want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert float(got[~positions].abs().sum()) == 0


@pytest.mark.parametrize("combine", ["sum", "mixture"])
@pytest.mark.parametrize("kind", ["dense", "top_k"])
def test_fused_equals_unfused(combine, kind):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(B, T, 6, generator=g, dtype=torch.float64), torch.randn(V, 6, generator=g,
                                                                                          dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    teachers = [3 * torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in WEIGHTS]
    positions = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)
    signals = dense(teachers) if kind == "dense" else top_k(teachers, positions, 4)
    multi = MultiTeacherSignal(signals, WEIGHTS, combine)
    grads = []
    for fused in (False, True):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        if fused:
            v = multi.fused_divergence(HeadInputs(h, w, b), positions, "jsd", TAU, beta=0.3)
        else:
            v = multi.divergence(h @ w.T + b, positions, "jsd", TAU, beta=0.3)
        v.sum().backward()
        grads.append((v.detach(), h.grad, w.grad, b.grad))
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_target_uncertainty_is_one_minus_the_mixture_probability_of_the_target(setup, combine):
    student, teachers, positions = setup
    targets = torch.randint(0, V, (int(positions.sum()),), generator=torch.Generator().manual_seed(3))
    p_bar = sum(w * logprobs(t, TAU).exp() for w, t in zip(WEIGHTS, teachers))[positions]
    want = 1 - p_bar.gather(-1, targets[:, None]).squeeze(-1)
    got = MultiTeacherSignal(dense(teachers), WEIGHTS, combine).target_uncertainty(student, positions, targets, TAU)
    torch.testing.assert_close(got, want)


def test_decoupled_parts_of_one_cached_teacher_in_a_mixture_are_its_own(setup):
    """ATKD's TKD/DKD on the mixture's categories (the target its own category, estimated as coarsen_with_target
    does when it is outside the top-k) equal the single cached teacher's."""
    student, teachers, positions = setup
    n = int(positions.sum())
    (single,) = top_k(teachers[:1], positions, 3)
    targets = torch.where(torch.arange(n) % 2 == 0, single.top_ids[:, 1], (single.top_ids[:, :3].sum(-1) + 1) % V)
    outside = ~single.top_ids.eq(targets[:, None]).any(-1)
    assert outside.any() and not outside.all()  # targets inside and outside the top-k
    multi = MultiTeacherSignal([single], [1.0], "mixture")
    want = single.decoupled_divergence(student, positions, targets, "fkl", TAU, tkd_weight=0.5)
    got = multi.decoupled_divergence(student, positions, targets, "fkl", TAU, tkd_weight=0.5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    want = single.target_uncertainty(student, positions, targets, TAU)
    torch.testing.assert_close(multi.target_uncertainty(student, positions, targets, TAU), want, rtol=1e-10, atol=1e-12)


def test_bad_weights_and_combine_are_errors(setup):
    _, teachers, _ = setup
    with pytest.raises(ValueError, match="weight > 0"):
        MultiTeacherSignal(dense(teachers[:2]), [1.0, 0.0])
    with pytest.raises(ValueError, match="weight > 0"):
        MultiTeacherSignal(dense(teachers[:2]), [1.0])
    with pytest.raises(ValueError, match=r"unknown teacher combine 'mean' \(allowed: sum, mixture\)"):
        MultiTeacherSignal(dense(teachers[:2]), [1.0, 1.0], "mean")
