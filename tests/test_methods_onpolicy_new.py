"""The on-policy methods `sampled_rkl`, `entropy_aware_opd` and `speculative_kd`: their objectives against brute
force, the sampled estimator's gradient by exact enumeration (and Monte Carlo), the interleaving rule, the fused and
logits paths, padding, gradient accumulation, their specs, and a few training steps through the real trainer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.errors import TeacherSupportError
from kd_core.losses.chunked import chunked_token_divergence
from kd_core.losses.divergences import fkl, get_divergence, rkl
from kd_core.losses.fused import fused_token_divergence
from kd_core.losses.onpolicy_kl import entropy, entropy_gated_kl, sampled_kl_value, sampled_rkl_loss
from kd_core.losses.pairwise import pair_rows, token_logprobs
from kd_core.losses.sparse import sparse_divergence, top_k_with_tail
from kd_core.losses.tokens import logprobs
from kd_core.models.lm import lm_head_inputs
from kd_core.methods import StepContext, get_method
from kd_core.methods.batches import collate_rows, generation_batch
from kd_core.methods.onpolicy import distill_on_batch
from kd_core.methods.rollouts import Generation
from kd_core.methods.speculative_rollouts import interleave_step, interleaved_sample
from tests.method_harness import run_method, student_config, tiny_setup

IG = IGNORE_INDEX
EOS, PAD = 0, 1
TOKENIZER = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


# ----------------------------------------------------------------------------------------------- fixtures
class UnigramLM(torch.nn.Module):
    """A causal LM whose next-token logits are one vector θ whatever the context (a one-step policy)."""

    def __init__(self, logits: torch.Tensor, trainable: bool = True):
        super().__init__()
        self.theta = torch.nn.Parameter(logits.clone(), requires_grad=trainable)
        self.config = SimpleNamespace(vocab_size=logits.shape[0], n_positions=64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        logits = self.theta.expand(*input_ids.shape, self.theta.shape[0])
        return SimpleNamespace(logits=logits, past_key_values=(past_key_values or 0) + 1)


class TableLM(torch.nn.Module):
    """A fake causal LM: at generation step k, row i's next-token logits are table(k, i); records the ids it reads."""

    def __init__(self, table, vocab: int):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.table, self.vocab = table, vocab
        self.config = SimpleNamespace(vocab_size=vocab, n_positions=64)
        self.inputs: list[list[int]] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        step = past_key_values or 0
        self.inputs.append(input_ids[:, -1].tolist())
        logits = torch.stack([self.table(step, i) for i in range(input_ids.shape[0])])
        return SimpleNamespace(logits=logits.unsqueeze(1).expand(-1, input_ids.shape[1], -1),
                               past_key_values=step + 1)


def _gpt2(vocab: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)).double()


def _method(name: str, **fields):
    cfg = student_config(name, **fields)
    return get_method(name)(cfg, cfg.method_args)


def _rows(seed: int = 0, vocab: int = 40) -> list[tuple[list[int], list[int]]]:
    """Four prompt + response rows of different lengths (the responses play the student's samples; 2 is EOS)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_len, response_len in ((3, 5), (4, 2), (2, 7), (5, 1)):
        ids = torch.randint(3, vocab, (prompt_len + response_len,), generator=g).tolist()
        rows.append((ids, [IG] * prompt_len + ids[prompt_len:]))
    return rows


def _term(method, ctx: StepContext, batch: dict) -> torch.Tensor:
    """The method's distillation term on a given batch of responses (its loss without α and without sampling)."""
    if method.name == "speculative_kd":
        name, params = method.effective_divergence
        return distill_on_batch(ctx, method.cfg, batch, replaced=True, divergence=name, divergence_args=params).out.loss
    return method.loss_on(ctx, batch)[0]


def _ctx(student, teacher, batch, num_items) -> StepContext:
    """The batch of responses is its own reference batch (so each micro-batch supervises its reference count)."""
    return StepContext(student=student, batch=batch, num_items=num_items, teacher=teacher, tokenizer=TOKENIZER)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


CASES = [("sampled_rkl", {"method_args": {"estimator": "k1"}}), ("sampled_rkl", {}),
         ("entropy_aware_opd", {"method_args": {"entropy_threshold": 3.6}}),
         ("speculative_kd", {}), ("speculative_kd", {"divergence": "jsd", "divergence_args": {"beta": 0.3}})]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


# ----------------------------------------------------------------------------------------------- abkd on the cache
def test_abkd_on_the_sparse_cache_is_a_lower_bound_only_as_an_alpha_divergence():
    """At k < V: alpha + beta = 1 (an f-divergence) never exceeds the dense value (data processing); alpha + beta > 1
    can (kd_core/losses/sparse.py says so); k = V is exact (tests/test_sparse_losses.py, every registered name)."""
    g = torch.Generator().manual_seed(0)
    s = torch.log_softmax(torch.randn(200, 13, generator=g, dtype=torch.float64) * 2, -1)
    t = torch.log_softmax(torch.randn(200, 13, generator=g, dtype=torch.float64) * 2, -1)
    for (a, b), bounded in (((0.3, 0.7), True), ((0.8, 0.2), True), ((1.2, 0.5), False)):
        errors = []
        for k in (1, 3, 8):
            top_lp, top_ids, tail = top_k_with_tail(t, k)
            errors.append(get_divergence("abkd")(s, t, alpha=a, beta=b)
                          - sparse_divergence(s, top_lp, top_ids, tail, "abkd", alpha=a, beta=b))
        assert (min(float(e.min()) for e in errors) >= -1e-12) == bounded


# ----------------------------------------------------------------------------------------------- sampled_rkl
def _enumerate(theta: torch.Tensor, lp: torch.Tensor, per_token) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_y q(y) · (value, ∇θ value) of a per-token loss of the sampled token y ~ q = softmax(θ)."""
    q = torch.softmax(theta.detach(), -1)
    value, grad = 0.0, torch.zeros_like(theta)
    for y in range(theta.shape[0]):
        th = theta.detach().clone().requires_grad_(True)
        loss = per_token(torch.log_softmax(th, -1)[y], lp[y])
        (g,) = torch.autograd.grad(loss, th)
        value, grad = value + q[y] * loss.detach(), grad + q[y] * g
    return value, grad


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sampled_estimator_is_unbiased_and_its_gradient_expectation_is_the_reverse_kl_gradient(estimator):
    """Exact expectation over the sampled token (enumeration, one step): E[value] = KL(q || p) and
    E[gradient] = ∇ KL(q || p), for either estimator."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(7, generator=g, dtype=torch.float64) * 1.5
    lp = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64) * 1.5, -1)
    th = theta.clone().requires_grad_(True)
    exact = rkl(torch.log_softmax(th, -1), lp)
    (exact_grad,) = torch.autograd.grad(exact, th)
    value, grad = _enumerate(theta, lp, lambda lq, lp_y: sampled_rkl_loss(lq, lp_y, estimator))
    torch.testing.assert_close(value, exact.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-12, atol=1e-12)
    assert exact_grad.abs().max() > 0.05


def test_pathwise_k3_gradient_is_the_forward_kl_gradient_and_pathwise_k1_has_none():
    """Why the estimator differentiates with the score function: k3 differentiated only through log q (TorchRL's
    DistillationLoss) has expectation ∇ KL(p || q), the forward KL's gradient; k1 that way has expectation 0."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(6, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    th = theta.clone().requires_grad_(True)
    (forward_grad,) = torch.autograd.grad(fkl(torch.log_softmax(th, -1), lp), th)
    (reverse_grad,) = torch.autograd.grad(rkl(torch.log_softmax(th, -1), lp), th)
    _, pathwise_k3 = _enumerate(theta, lp, lambda lq, lp_y: sampled_kl_value(lp_y - lq, "k3"))
    _, pathwise_k1 = _enumerate(theta, lp, lambda lq, lp_y: sampled_kl_value(lp_y - lq, "k1"))
    torch.testing.assert_close(pathwise_k3, forward_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pathwise_k1, torch.zeros_like(theta), rtol=0, atol=1e-12)
    assert not torch.allclose(forward_grad, reverse_grad, atol=1e-3)


def _unigram_pair(vocab: int = 6, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    student = UnigramLM(torch.randn(vocab, generator=g, dtype=torch.float64))
    teacher = UnigramLM(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, trainable=False)
    return student, teacher


def _exact_rkl_grad(student, teacher, temperature: float) -> torch.Tensor:
    student.zero_grad()
    rkl(logprobs(student.theta, temperature), logprobs(teacher.theta, temperature)).backward()
    out = student.theta.grad.clone()
    student.zero_grad()
    return out


def test_sampled_rkl_method_gradient_expectation_by_enumerating_the_sampled_token():
    """Through the method (re-batching, log-probs of the sampled tokens at τ, normalisation): Σ_y q_τ(y) · ∇ loss(y)
    over every one-token response y equals ∇ KL(q_τ || p_τ), and Σ_y q_τ(y) · loss(y) the KL itself."""
    tau = 1.3
    student, teacher = _unigram_pair()
    reference = collate_rows([([2, 3, 4], [IG, IG, 4])], PAD)  # one reference token: norm 1
    for estimator in ("k1", "k3"):
        method = _method("sampled_rkl", temperature=tau, method_args={"estimator": estimator})
        q = torch.softmax(student.theta.detach() / tau, -1)
        value, grad = 0.0, torch.zeros_like(student.theta)
        for y in range(6):
            gen = Generation([[2, 3]], [[] if y == EOS else [y]], [y == EOS])
            student.zero_grad()
            loss, _ = method.loss_on(_ctx(student, teacher, reference, 1), generation_batch(gen, EOS, PAD))
            loss.backward()
            value, grad = value + q[y] * loss.detach(), grad + q[y] * student.theta.grad
        exact = rkl(logprobs(student.theta.detach(), tau), logprobs(teacher.theta, tau))
        torch.testing.assert_close(value, exact, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, _exact_rkl_grad(student, teacher, tau), rtol=1e-12, atol=1e-12)


def test_sampled_rkl_monte_carlo_gradient_through_sampling():
    """With the method's own sampling (20 000 one-token responses) the gradient is ∇ KL(q || p) up to Monte-Carlo
    error, and clearly not ∇ KL(p || q)."""
    student, teacher = _unigram_pair(seed=3)
    n = 20_000
    batch = collate_rows([([2, 3, 4], [IG, IG, 4])] * n, PAD)
    method = _method("sampled_rkl", method_args={"max_new_tokens": 1})
    torch.manual_seed(0)
    method.compute_loss(_ctx(student, teacher, batch, n)).loss.backward()
    mc = student.theta.grad.clone()
    exact = _exact_rkl_grad(student, teacher, 1.0)
    fkl(logprobs(student.theta, 1.0), logprobs(teacher.theta, 1.0)).backward()
    forward = student.theta.grad - mc
    assert float((mc - exact).norm()) < 0.05 * float(exact.norm())
    assert float((mc - forward).norm()) > 0.3 * float(exact.norm())


def test_sampled_rkl_loss_against_brute_force():
    """The value (token mean of k1 or k3 of the sampled tokens, at τ, over the shared vocabulary) and the gradient
    (of the token mean of sg(k1) · log q) against a direct computation from both models' logits."""
    student, teacher = _gpt2(40, 0), _gpt2(43, 1).eval()  # the teacher has 3 padded vocabulary rows
    batch = collate_rows(_rows(), PAD)
    n = int(batch["labels"][:, 1:].ne(IG).sum())
    for estimator in ("k1", "k3"):
        method = _method("sampled_rkl", temperature=1.7, fused_lm_head=False, method_args={"estimator": estimator})
        student.zero_grad()
        loss, logs = method.loss_on(_ctx(student, teacher, batch, n), batch)
        loss.backward()
        got = _grads(student)
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :40]
        values, surrogate = [], 0.0
        for i in range(batch["input_ids"].shape[0]):
            for j in range(1, batch["input_ids"].shape[1]):
                y = int(batch["labels"][i, j])
                if y == IG:
                    continue
                lq = torch.log_softmax(s_logits[i, j - 1] / 1.7, -1)[y]
                lp = torch.log_softmax(t_logits[i, j - 1] / 1.7, -1)[y]
                r = float((lp - lq).detach())
                values.append(-r if estimator == "k1" else math.exp(r) - 1 - r)
                surrogate = surrogate + (-r) * lq
        assert float(loss.detach()) == pytest.approx(sum(values) / n, rel=1e-12)
        assert logs[estimator] == pytest.approx(sum(values) / n, rel=1e-12)
        student.zero_grad()
        (surrogate / n).backward()
        for a, b in zip(got, _grads(student)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sampled_rkl_fused_path_reads_only_the_sampled_tokens_of_the_teacher():
    """With `fused_lm_head` neither model's head projects more than the last position (the teacher's log-prob of
    each sampled token comes from its hidden states, a block of rows at a time); same loss and gradient."""
    student, teacher = _gpt2(40, 0), _gpt2(43, 1).eval()
    batch = collate_rows(_rows(1), PAD)
    n = int(batch["labels"][:, 1:].ne(IG).sum())
    shapes = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
             for m in (student, teacher)]
    results = []
    for fused in (True, False):
        student.zero_grad()
        loss, _ = _method("sampled_rkl", temperature=1.3, fused_lm_head=fused).loss_on(
            _ctx(student, teacher, batch, n), batch)
        loss.backward()
        results.append((loss.detach(), _grads(student)))
        if fused:
            assert len(shapes) == 2 and all(s[1] == 1 for s in shapes)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_teacher_probability_of_zero_at_a_sampled_token_is_an_error_naming_it_never_nan():
    """A -inf teacher logit at a sampled token (KL(q || p) = +inf; the surrogate would be inf + inf · 0 = NaN):
    the loss function and the method raise TeacherSupportError naming the token and its place; other tokens with
    a -inf teacher logit that were not sampled change nothing (the loss stays the finite brute-force value)."""
    lq = torch.log_softmax(torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -1.0]], dtype=torch.float64), -1)
    lp = torch.tensor([[-1.0, -0.7, -2.0], [-0.4, float("-inf"), -1.2]], dtype=torch.float64)
    tokens = torch.tensor([[7, 8, 9], [10, 11, 12]])
    for estimator in ("k1", "k3"):
        with pytest.raises(TeacherSupportError, match=r"sampled token 11 \('tok11'\) probability 0 .*\[1, 1\]"):
            sampled_rkl_loss(lq, lp, estimator, tokens=tokens, decode=lambda t: f"tok{t}")
    with pytest.raises(TeacherSupportError, match=r"a sampled token probability 0 .*index \[1, 1\]"):
        sampled_rkl_loss(lq.requires_grad_(True), lp)
    # through the method: the teacher masks token 4; a response that samples 4 is refused, one that does not is finite
    theta = torch.tensor([0.2, -0.1, 0.4, 0.0, float("-inf"), 0.3], dtype=torch.float64)
    student, teacher = UnigramLM(torch.zeros(6, dtype=torch.float64)), UnigramLM(theta, trainable=False)
    reference = collate_rows([([2, 3, 4], [IG, IG, 4])], PAD)
    method = _method("sampled_rkl", method_args={"estimator": "k3"})
    ctx = StepContext(student=student, batch=reference, num_items=1, teacher=teacher,
                      tokenizer=SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, decode=lambda t: f"<{t}>"))
    with pytest.raises(TeacherSupportError, match=r"sampled token 4 \('<4>'\) probability 0"):
        method.loss_on(ctx, generation_batch(Generation([[2, 3]], [[5, 4]], [False]), EOS, PAD))
    loss, _ = method.loss_on(ctx, generation_batch(Generation([[2, 3]], [[5]], [False]), EOS, PAD))
    loss.backward()
    lp5 = float(torch.log_softmax(theta, -1)[5])
    r = lp5 - math.log(1 / 6)
    assert float(loss.detach()) == pytest.approx(math.expm1(r) - r, rel=1e-12)
    assert torch.isfinite(student.theta.grad).all() and float(student.theta.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------------------------- entropy_aware_opd
def _brute_gated(q: list[float], p: list[float], h: float) -> float:
    reverse = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p) if qi > 0)
    forward = sum(pi * math.log(pi / qi) for qi, pi in zip(q, p) if pi > 0)
    ent = -sum(pi * math.log(pi) for pi in p if pi > 0)
    return reverse + (forward if ent > h else 0.0)


def test_entropy_gated_kl_against_brute_force_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    ls = (torch.randn(5, 9, generator=g, dtype=torch.float64) * torch.linspace(0.2, 4, 5).unsqueeze(-1))
    lt = torch.randn(5, 9, generator=g, dtype=torch.float64) * torch.linspace(4, 0.2, 5).unsqueeze(-1)
    lq, lp = torch.log_softmax(ls, -1), torch.log_softmax(lt, -1)
    ent = entropy(lp)
    h = float(ent.median())
    gate = ent > h
    assert 0 < int(gate.sum()) < 5
    reverse, forward, got_ent = entropy_gated_kl(lq, lp, h)
    want = [_brute_gated(lq[i].exp().tolist(), lp[i].exp().tolist(), h) for i in range(5)]
    torch.testing.assert_close(reverse + forward, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_ent, -(lp.exp() * lp).sum(-1))
    # threshold extremes: all reverse KL, or reverse + forward everywhere
    torch.testing.assert_close(sum(entropy_gated_kl(lq, lp, 1e9)[:2]), rkl(lq, lp))
    torch.testing.assert_close(sum(entropy_gated_kl(lq, lp, 0.0)[:2]), rkl(lq, lp) + fkl(lq, lp))
    # gradient: the gate is a constant
    x = ls.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(sum(entropy_gated_kl(torch.log_softmax(x, -1), lp, h)[:2]).sum(), x)
    (gb,) = torch.autograd.grad((rkl(torch.log_softmax(x, -1), lp) + gate * fkl(torch.log_softmax(x, -1), lp)).sum(), x)
    torch.testing.assert_close(ga, gb)
    assert torch.autograd.gradcheck(lambda z: sum(entropy_gated_kl(torch.log_softmax(z, -1), lp, h)[:2]),
                                    (ls.clone().requires_grad_(True),))


def test_entropy_gated_kl_leaves_an_infinite_forward_kl_out_when_the_gate_is_off():
    lq = torch.tensor([[0.0, float("-inf")]], dtype=torch.float64).log_softmax(-1).requires_grad_(True)
    lp = torch.tensor([[0.0, -3.0]], dtype=torch.float64).log_softmax(-1)  # entropy 0.20 nats; KL(p || q) = inf
    reverse, forward, _ = entropy_gated_kl(lq, lp, 0.5)
    assert float(forward) == 0.0 and torch.isfinite(reverse).all()
    (reverse + forward).sum().backward()
    assert torch.isfinite(lq.grad).all()
    assert torch.isinf(sum(entropy_gated_kl(lq, lp, 0.1)[:2])).all()


def test_entropy_aware_opd_loss_against_brute_force():
    student, teacher = _gpt2(40, 0), _gpt2(43, 1).eval()
    batch = collate_rows(_rows(2), PAD)
    n = int(batch["labels"][:, 1:].ne(IG).sum())
    tau = 1.4
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :40]
    positions = [(i, j - 1) for i in range(batch["input_ids"].shape[0]) for j in range(1, batch["input_ids"].shape[1])
                 if int(batch["labels"][i, j]) != IG]
    ents = [float(entropy(torch.log_softmax(t_logits[i, t] / tau, -1))) for i, t in positions]
    h = sorted(ents)[len(ents) // 2]  # about half the positions gated
    want = sum(_brute_gated(torch.softmax(s_logits[i, t] / tau, -1).tolist(), torch.softmax(t_logits[i, t] / tau, -1)
                            .tolist(), h) for i, t in positions) / n
    for fused in (True, False):
        method = _method("entropy_aware_opd", temperature=tau, fused_lm_head=fused,
                         method_args={"entropy_threshold": h})
        loss, logs = method.loss_on(_ctx(student, teacher, batch, n), batch)
        assert float(loss) == pytest.approx(want, rel=1e-10)
        assert logs["gated"] == pytest.approx(sum(e > h for e in ents) / n)
        assert 0 < logs["gated"] < 1 and logs["teacher_entropy"] == pytest.approx(sum(ents) / n, rel=1e-10)


def test_pair_rows_equals_the_registered_divergences_chunked_and_fused():
    """The generic per-position machinery is the divergences' own: rkl through `pair_rows` equals
    chunked_token_divergence / fused_token_divergence (values and gradients; the teacher has padded rows)."""
    student, teacher = _gpt2(40, 0), _gpt2(43, 1).eval()
    batch = collate_rows(_rows(3), PAD)
    positions = torch.nn.functional.pad(batch["labels"][:, 1:].ne(IG), (0, 1))
    fn = lambda lq, lp, rows: rkl(lq, lp)  # noqa: E731
    s_head = lm_head_inputs(student, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        t_head = lm_head_inputs(teacher, batch["input_ids"], batch["attention_mask"])
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = chunked_token_divergence(s_logits, t_logits, positions, "rkl", temperature=1.2)
    for got in (pair_rows(s_logits, t_logits, positions, fn, 1.2), pair_rows(s_head, t_head, positions, fn, 1.2),
                pair_rows(s_head, t_logits, positions, fn, 1.2)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    fused = fused_token_divergence(s_head.hidden, s_head.weight, t_head.hidden, t_head.weight, "rkl", 1.2,
                                   student_bias=s_head.bias, teacher_bias=t_head.bias, mask=positions)
    w = torch.rand(positions.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g_ref = torch.autograd.grad((fused * w).sum(), list(student.parameters()), retain_graph=True, allow_unused=True)
    g_got = torch.autograd.grad((pair_rows(s_head, t_head, positions, fn, 1.2) * w).sum(), list(student.parameters()),
                                allow_unused=True)
    for a, b in zip(g_got, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # token log-probs: both paths, and what log_softmax says
    targets = torch.nn.functional.pad(batch["labels"][:, 1:].clamp(min=0), (0, 1))
    direct = torch.log_softmax(s_logits[..., :40] / 0.9, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * positions
    for out in (s_logits, s_head):
        torch.testing.assert_close(token_logprobs(out, positions, targets, 40, 0.9), direct, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- speculative_kd
def _peaked(order: list[int], vocab: int) -> torch.Tensor:
    """Logits ranking `order` first (0, −30, −31, …): sampling gives order[0] (others have mass < 1e-13)."""
    logits = torch.full((vocab,), -1e4)
    for rank, tok in enumerate(order):
        logits[tok] = 0.0 if rank == 0 else -29.0 - rank
    return logits


def _one_hot(tok: int, vocab: int) -> torch.Tensor:
    return torch.full((vocab,), -1e9).index_fill(0, torch.tensor([tok]), 0.0)


def test_interleave_step_keeps_tokens_in_the_teacher_top_k_and_replaces_the_others():
    teacher = torch.stack([_peaked([0, 1, 2, 3, 4, 5], 6)] * 3)  # teacher ranking 0 > 1 > 2 > ...; samples 0
    student = torch.stack([_one_hot(2, 6), _one_hot(4, 6), _one_hot(0, 6)])  # proposals 2, 4, 0
    tokens, swapped = interleave_step(student, teacher, top_k=3, temperature=1.0)
    assert tokens.tolist() == [2, 0, 0] and swapped.tolist() == [False, True, False]  # 2 (rank 3) kept, 4 replaced
    tokens, swapped = interleave_step(student, teacher, top_k=2, temperature=1.0)
    assert tokens.tolist() == [0, 0, 0] and swapped.tolist() == [True, True, False]  # rank 3 is outside the top-2
    tokens, swapped = interleave_step(student, teacher, top_k=6, temperature=1.0)
    assert tokens.tolist() == [2, 4, 0] and not swapped.any()  # top_k = V: the student's tokens


def test_interleaved_sample_by_hand():
    """Row 0 proposes 5, 3, EOS: 5 is outside the teacher's top-3 {2, 3, EOS} and becomes the teacher's sample 2,
    3 and EOS are kept (the row ends). Row 1 proposes 4 four times: each becomes 2. Both models read the chosen
    tokens; only the shared vocabulary is sampled."""
    vocab = 8
    scripts = {0: [5, 3, EOS], 1: [4, 4, 4, 4]}
    student = TableLM(lambda k, i: _one_hot(scripts[i][min(k, 3 if i else 2)], vocab + 2), vocab + 2)
    teacher = TableLM(lambda k, i: _peaked([2, 3, EOS, 4, 5, 6, 7], vocab), vocab)
    out = interleaved_sample(student, teacher, [[6, 7], [7]], top_k=3, max_new_tokens=4, eos_token_id=EOS,
                             pad_token_id=PAD, vocab_size=vocab)
    assert out.generation.tokens == [[2, 3], [2, 2, 2, 2]] and out.generation.ended == [True, False]
    assert out.proposed == 3 + 4 and out.replaced == 1 + 4
    for model in (student, teacher):  # prompts (left padded), then the chosen tokens (pad after the row ended)
        assert model.inputs == [[7, 7], [2, 2], [3, 2], [EOS, 2]]
    # the position limit: at most max_length - longest prompt tokens
    out = interleaved_sample(student, teacher, [[6, 7], [7]], top_k=3, max_new_tokens=4, eos_token_id=EOS,
                             pad_token_id=PAD, vocab_size=vocab, max_length=3)
    assert out.generation.tokens == [[2], [2]] and out.proposed == 2


def test_speculative_kd_loss_is_the_kd_loss_on_the_interleaved_sequences():
    setup = tiny_setup()
    batch = setup.val_batches(6)[0]
    n_ref = int(batch["labels"][:, 1:].ne(IG).sum())
    for fields in ({}, {"divergence": "jsd", "divergence_args": {"beta": 0.3}, "temperature": 1.5}):
        method = _method("speculative_kd", method_args={"max_new_tokens": 6, "top_k": 50}, **fields)
        assert method.effective_divergence == (fields.get("divergence", "fkl"), fields.get("divergence_args", {}))
        student = setup.student()
        ctx = StepContext(student=student, batch=batch, num_items=n_ref, teacher=setup.teacher,
                          tokenizer=setup.tokenizer)
        torch.manual_seed(0)
        gen_batch, replaced, logs = method.make_batch(ctx)
        assert replaced and 0 < logs["replaced"] < 1
        torch.manual_seed(0)
        out = method.compute_loss(ctx)
        out.loss.backward()
        got = _grads(student)
        student.zero_grad()
        n_gen = int(gen_batch["labels"][:, 1:].ne(IG).sum())
        kd = _method("kd", **fields).compute_loss(StepContext(student=student, batch=gen_batch, num_items=n_gen,
                                                              teacher=setup.teacher))
        kd.loss.backward()
        torch.testing.assert_close(out.loss, kd.loss, rtol=1e-6, atol=1e-7)
        for a, b in zip(got, _grads(student)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- all three
@pytest.mark.parametrize("name,fields", CASES, ids=IDS)
def test_padding_does_not_change_the_loss(name, fields):
    """The same rows padded wider with junk token ids at the padded positions, and each row alone (unpadded):
    the same loss and gradients (rows summed with the batch's token count as the normaliser)."""
    student, teacher = _gpt2(40, 0), _gpt2(43, 1).eval()
    method = _method(name, temperature=1.3, **fields)
    rows = _rows(4)
    batch = collate_rows(rows, PAD)
    n = int(batch["labels"][:, 1:].ne(IG).sum())

    def run(b, num_items):
        student.zero_grad()
        loss = _term(method, _ctx(student, teacher, b, num_items), b)
        loss.backward()
        return loss.detach(), _grads(student)

    base, g_base = run(batch, n)
    wide = collate_rows([(ids + [37, 5, 11], labels + [IG] * 3) for ids, labels in rows], PAD)
    wide["attention_mask"][:, -3:] = 0
    for i, (ids, _) in enumerate(rows):
        wide["input_ids"][i, len(ids):] = torch.tensor([23, 9, 31, 17, 4, 29, 12, 8, 19][: wide["input_ids"].shape[1] - len(ids)])
        wide["attention_mask"][i, len(ids):] = 0
    padded, g_padded = run(wide, n)
    torch.testing.assert_close(padded, base, rtol=1e-10, atol=1e-12)
    alone = [run(collate_rows([row], PAD), n) for row in rows]
    torch.testing.assert_close(sum(a for a, _ in alone), base, rtol=1e-10, atol=1e-12)
    for k, g in enumerate(g_base):
        torch.testing.assert_close(g_padded[k], g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sum(gs[k] for _, gs in alone), g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,fields", CASES, ids=IDS)
def test_two_micro_batches_equal_one_batch(name, fields):
    """Gradient accumulation: the losses and gradients of two micro-batches (normalised by the whole batch's token
    count) sum to those of the batch."""
    student, teacher = _gpt2(40, 0), _gpt2(43, 1).eval()
    method = _method(name, **fields)
    rows = _rows(5)
    n = sum(sum(lab != IG for lab in labels[1:]) for _, labels in rows)
    student.zero_grad()
    whole = _term(method, _ctx(student, teacher, collate_rows(rows, PAD), n), collate_rows(rows, PAD))
    whole.backward()
    g_whole = _grads(student)
    student.zero_grad()
    total = 0.0
    for part in (rows[:2], rows[2:]):
        b = collate_rows(part, PAD)
        loss = _term(method, _ctx(student, teacher, b, n), b)
        loss.backward()  # accumulates, as the trainer does
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(student), g_whole):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["sampled_rkl", "entropy_aware_opd", "speculative_kd"])
def test_method_samples_from_the_prompts_and_trains(name):
    """compute_loss on the tiny setup: the responses are replaced by generations of the batch's prompts (counted),
    the loss is finite with finite nonzero student gradients (α mixes in the references' CE), the teacher gets no
    gradient; then a few steps through the real trainer."""
    setup = tiny_setup()
    batch = setup.val_batches(8)[0]
    method = _method(name, alpha=0.1, method_args={"max_new_tokens": 6})
    student = setup.student().train()
    trainer = SimpleNamespace(generated_tokens=0, teacher_forward_passes=0)
    ctx = StepContext(student=student, batch=batch, num_items=batch["labels"][:, 1:].ne(IG).sum(),
                      teacher=setup.teacher, tokenizer=setup.tokenizer, trainer=trainer)
    torch.manual_seed(0)
    out = method.compute_loss(ctx)
    out.loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert torch.isfinite(out.loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0 and "ce" in out.logs and out.logs["gen_len"] > 0
    assert trainer.generated_tokens > 0 and all(p.grad is None for p in setup.teacher.parameters())
    assert trainer.teacher_forward_passes == (8 if name == "speculative_kd" else 0)  # the teacher sampled too
    _, _, _, before, after = run_method(student_config(name, method_args={"max_new_tokens": 4}), steps=3)
    assert math.isfinite(before) and math.isfinite(after)


# ----------------------------------------------------------------------------------------------- specs
def test_specs_defaults_and_argument_checks():
    assert student_config("sampled_rkl").divergence == "rkl"
    assert student_config("entropy_aware_opd").divergence == "rkl"
    assert student_config("speculative_kd").divergence == "fkl"
    assert _method("sampled_rkl").args.estimator == "k3"
    assert _method("entropy_aware_opd").args.entropy_threshold == pytest.approx(math.log(2))
    assert _method("speculative_kd").args.top_k == 25
    for name in ("sampled_rkl", "entropy_aware_opd"):
        with pytest.raises(ValueError, match="rkl"):
            student_config(name, divergence="fkl")
    for name, args, key in [("sampled_rkl", {"estimator": "k2"}, "estimator"),
                            ("entropy_aware_opd", {"entropy_threshold": -1.0}, "entropy_threshold"),
                            ("speculative_kd", {"top_k": 0}, "top_k"),
                            ("speculative_kd", {"lmbda": 0.5}, "lmbda")]:
        with pytest.raises(ValueError, match=key):
            student_config(name, method_args=args)
