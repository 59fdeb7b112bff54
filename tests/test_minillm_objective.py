"""MiniLLM's objective (kd_core/methods/minillm.py, docs/methods_onpolicy.md) against hand computations and
brute force: the PPO clip of the importance ratio, the policy gradient with (`single_step: true`) and without
(`false`) the exact single-step reverse-KL term, both equal in expectation to the gradient of the sequence-level
reverse KL enumerated over every sequence, and `lm_coef` (exactly lm_coef · CE on the references)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from kd_core.data.tokenize import IGNORE_INDEX as IG
from kd_core.methods import StepContext, get_method
from kd_core.methods.minillm import MiniLLMArgs, minillm_terms
from tests.method_harness import student_config

V, PROMPT = 3, 0  # vocabulary of the table models; the one prompt token


class TableLM(torch.nn.Module):
    """A causal LM on sequences [x, y0, y1] given as tables: logits θ0 for y0 and θ1[y0] for y1 (float64), zeros
    elsewhere, so that q(y) = softmax(θ0)[y0] · softmax(θ1[y0])[y1] exactly."""

    def __init__(self, seed: int, scale: float = 1.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.first = torch.nn.Parameter(scale * torch.randn(V, generator=g, dtype=torch.float64))
        self.second = torch.nn.Parameter(scale * torch.randn(V, V, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, V, dtype=torch.float64)
        logits = logits.index_put((torch.arange(b), torch.zeros(b, dtype=torch.long)), self.first.expand(b, V))
        logits = logits.index_put((torch.arange(b), torch.ones(b, dtype=torch.long)), self.second[input_ids[:, 1]])
        return SimpleNamespace(logits=logits)

    def log_q(self, y) -> torch.Tensor:
        return torch.log_softmax(self.first, -1)[y[0]] + torch.log_softmax(self.second[y[0]], -1)[y[1]]


def _row(y) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[PROMPT, *y]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
            "labels": torch.tensor([[IG, *y]])}


def _method(**args):
    cfg = student_config("minillm", method_args=args)
    return get_method("minillm")(cfg, cfg.method_args)


def _ctx(student, teacher, batch) -> StepContext:
    n = int(batch["labels"][:, 1:].ne(IG).sum())
    return StepContext(student=student, batch=batch, num_items=n, teacher=teacher, tokenizer=None, progress=0.5,
                       state={}, trainer=None)


# ------------------------------------------------------------------------------------------------ PPO clip
def test_clipped_surrogate_value_and_gradient_by_hand():
    """pg_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)) with ρ_t = w_t = q/(α p + (1−α) q) at the step: a token
    whose ratio is beyond the clip on the side the advantage pushes it (A > 0 and ρ > 1+ε, A < 0 and ρ < 1−ε)
    gets no gradient; every other token gets −A_t w_t ∇log q(y_t). (Wrong: min instead of max clips the other
    side; a clip ignoring the advantage's sign, or no clip, gives those tokens a gradient.)"""
    g = torch.Generator().manual_seed(7)
    b, t, v, mix, eps = 6, 9, 5, 0.5, 0.2
    s = (3 * torch.randn(b, t, v, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = IG
    labels[0, 6:] = IG
    args = MiniLLMArgs(teacher_mix=mix, clip_range=eps, whiten=False, length_norm=False, gamma=1.0)
    terms = minillm_terms(s, teacher, labels, args)

    # by hand, token by token
    lq, lp = torch.log_softmax(s.detach()[:, :-1], -1), torch.log_softmax(teacher[:, :-1], -1)
    expect_pg = torch.zeros(b, t - 1)
    expect_grad = torch.zeros(b, t, v)
    kinds = set()
    for i in range(b):
        valid = [j for j in range(t - 1) if labels[i, j + 1] != IG]
        reward = {j: float(lp[i, j, labels[i, j + 1]] - lq[i, j, labels[i, j + 1]]) for j in valid}
        for j in valid:
            y = int(labels[i, j + 1])
            q, p = math.exp(float(lq[i, j, y])), math.exp(float(lp[i, j, y]))
            w = q / (mix * p + (1 - mix) * q)
            adv = sum(reward[k] for k in valid if k > j)  # R_{t+1}: the future rewards, undiscounted
            clipped_w = min(max(w, 1 - eps), 1 + eps)
            expect_pg[i, j] = max(-adv * w, -adv * clipped_w)
            frozen = (adv > 0 and w > 1 + eps) or (adv < 0 and w < 1 - eps)
            kinds.add((adv > 0, "frozen" if frozen else "outside" if abs(w - 1) > eps else "inside"))
            if not frozen:
                expect_grad[i, j] = -adv * w * (torch.nn.functional.one_hot(torch.tensor(y), v) - lq[i, j].exp())
    # the example has clipped tokens of both signs and unclipped ones outside the clip range of both signs
    assert {(True, "frozen"), (False, "frozen"), (True, "outside"), (False, "outside")} <= kinds, kinds
    torch.testing.assert_close(terms.pg[terms.mask], expect_pg[terms.mask], rtol=1e-5, atol=1e-6)
    assert torch.equal(terms.pg[~terms.mask], torch.zeros(int((~terms.mask).sum())))
    (grad,) = torch.autograd.grad(terms.pg[terms.mask].sum(), s)
    torch.testing.assert_close(grad, expect_grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ brute-force expectation
@pytest.mark.parametrize("single_step", [True, False])
def test_expected_gradient_is_the_sequence_level_reverse_kl_gradient(single_step):
    """Over every sequence y of two tokens (3² of them) weighted by q(y): E_y[∇ loss(y)] equals ∇ KL(q‖p) of the
    sequence distributions enumerated exactly. With `single_step` the step-t reward enters as the exact
    per-step reverse KL (differentiated) and the advantage holds the future rewards only; without it the
    single-step term carries no gradient and the advantage includes r_t (the plain policy gradient). (Wrong:
    the current reward counted in both, or in neither, gives another expectation.)"""
    student, teacher = TableLM(seed=1), TableLM(seed=2)
    teacher.requires_grad_(False)
    method = _method(teacher_mix=0.0, whiten=False, length_norm=False, gamma=1.0, single_step=single_step)
    params = list(student.parameters())
    expected = [torch.zeros_like(p) for p in params]
    sequences = list(itertools.product(range(V), repeat=2))
    for y in sequences:
        batch = _row(y)
        out = method.loss_on(_ctx(student, teacher, batch), batch)
        grads = torch.autograd.grad(out.loss, params)
        weight = float(student.log_q(y).detach().exp()) * 2  # the loss is the mean over the row's two tokens
        for acc, grad in zip(expected, grads):
            acc += weight * grad
    kl = sum(student.log_q(y).exp() * (student.log_q(y) - teacher.log_q(y)) for y in sequences)
    exact = torch.autograd.grad(kl, params)
    assert float(kl.detach()) > 0.05 and all(float(e.abs().max()) > 1e-3 for e in exact)
    for got, want in zip(expected, exact):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_single_step_value_is_the_exact_reverse_kl_and_plain_pg_takes_no_gradient_from_it():
    """The logged loss is the token mean of KL(q_t‖p_t) (the surrogate adds gradient, no value) with either
    setting; with `single_step: false` the same value carries no gradient of the single-step term."""
    student, teacher = TableLM(seed=3), TableLM(seed=4)
    teacher.requires_grad_(False)
    y = (2, 0)
    batch = _row(y)
    lq0, lp0 = torch.log_softmax(student.first, -1), torch.log_softmax(teacher.first, -1)
    lq1, lp1 = torch.log_softmax(student.second[y[0]], -1), torch.log_softmax(teacher.second[y[0]], -1)
    by_hand = float(((lq0.exp() * (lq0 - lp0)).sum() + (lq1.exp() * (lq1 - lp1)).sum()).detach() / 2)
    for single_step in (True, False):
        out = _method(teacher_mix=0.0, whiten=False, length_norm=False, single_step=single_step).loss_on(
            _ctx(student, teacher, batch), batch)
        assert float(out.loss.detach()) == pytest.approx(by_hand, rel=1e-6)
        assert out.logs["rkl"] == pytest.approx(by_hand, rel=1e-6)


# ------------------------------------------------------------------------------------------------ lm_coef
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_lm_coef_adds_exactly_lm_coef_times_the_reference_ce(alpha):
    """loss(lm_coef = c) − loss(lm_coef = 0) = c · CE(references) (Σ −log q over the reference tokens / N), in
    value and in gradient, on top of α's own CE share. (Wrong: c scaled by 1 − α, c replacing α, a CE on the
    generated tokens instead of the references.)"""
    student, teacher = TableLM(seed=5), TableLM(seed=6)
    teacher.requires_grad_(False)
    reference, generated = _row((1, 2)), _row((0, 1))
    params = list(student.parameters())
    coef = 0.7

    def loss_and_grads(lm_coef: float):
        cfg = student_config("minillm", alpha=alpha, method_args={"lm_coef": lm_coef})
        method = get_method("minillm")(cfg, cfg.method_args)
        loss = method.loss_on(_ctx(student, teacher, reference), generated).loss
        return loss.detach(), torch.autograd.grad(loss, params)

    base, base_grads = loss_and_grads(0.0)
    with_lm, lm_grads = loss_and_grads(coef)
    ce = -(torch.log_softmax(student.first, -1)[1] + torch.log_softmax(student.second[1], -1)[2]) / 2
    ce_grads = torch.autograd.grad(ce, params)
    torch.testing.assert_close(with_lm - base, coef * ce.detach(), rtol=1e-6, atol=1e-9)
    for a, b, c in zip(lm_grads, base_grads, ce_grads):
        torch.testing.assert_close(a - b, coef * c, rtol=1e-6, atol=1e-9)
