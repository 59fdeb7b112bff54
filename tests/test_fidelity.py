"""Fidelity to the source documents (issue 17, first list): each test pins the source's formula on a small
example. Sources: /work/shared/seeds/ (large-to-small-distillation.txt, atkd-summary.txt,
okd-paper-rao-et-al.txt) and the AKL paper (Wu et al. 2024) for the adaptive KL."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from kd_core.config import ArchConfig, TrainingConfig
from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.losses.atkd import decompose
from kd_core.losses.chunked import chunked_sparse_divergence, chunked_token_divergence
from kd_core.losses.divergences import akl, rkl
from kd_core.losses.tokens import logprobs, token_divergence
from kd_core.losses.intermediate import attention_divergence
from kd_core.losses.sparse import sparse_token_divergence, top_k_with_tail
from kd_core.methods import StepContext, get_method
from kd_core.methods.minillm import advantages
from kd_core.methods.progressive import student_layer_of_params
from kd_core.models.build import build_from_config
from kd_core.teachers.signal import DenseTeacherSignal
from kd_core.teachers.source import LiveTeacher
from kd_core.training.trainer import train
from tests.method_harness import MAX_LENGTH, student_config, tiny_setup

NINF = float("-inf")


# ----------------------------------------------------------------------------------------------- 1. AKL, mu = 0
def test_akl_mu_zero_is_reverse_kl_where_the_student_has_neg_inf_logits():
    """Empty head (mu = 0): AKL = KL(q || p) exactly. Student [0, 0, 0, -inf], teacher [0, 0, 0, 0]:
    q = (1/3, 1/3, 1/3, 0), p = 1/4 each, KL(q || p) = log(4/3); KL(p || q) = inf has weight 0 (the old
    code returned 0 * inf = NaN)."""
    s_logits = torch.tensor([[0.0, 0.0, 0.0, NINF]], dtype=torch.float64, requires_grad=True)
    t_logits = torch.zeros(1, 4, dtype=torch.float64)
    value = akl(logprobs(s_logits), logprobs(t_logits), mu=0.0)
    torch.testing.assert_close(value, torch.tensor([math.log(4 / 3)], dtype=torch.float64))
    assert float(value) == pytest.approx(0.2877, abs=1e-4)
    value.sum().backward()
    assert torch.isfinite(s_logits.grad).all()
    # gradient = that of the reverse KL alone (q uniform on 3 tokens: the stationary point, 0)
    s2 = s_logits.detach().clone().requires_grad_(True)
    rkl(logprobs(s2), logprobs(t_logits)).sum().backward()
    torch.testing.assert_close(s_logits.grad, s2.grad)
    # a positive weight on the infinite KL stays a (genuinely) infinite divergence, not NaN
    assert torch.isinf(akl(logprobs(s_logits.detach()), logprobs(t_logits), mu=0.5)).all()


def test_akl_mu_zero_with_neg_inf_student_in_token_sparse_and_chunked_variants():
    s = torch.tensor([[[0.0, 0.0, 0.0, NINF], [0.5, -1.0, 0.0, NINF]]], requires_grad=True)  # [1, 2, 4]
    t = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, -0.5, 0.3]]])
    want = rkl(logprobs(s.detach()), logprobs(t))
    dense = token_divergence(s, t, "akl", mu=0.0)
    torch.testing.assert_close(dense, want)
    (g_dense,) = torch.autograd.grad(dense.sum(), s)
    assert torch.isfinite(g_dense).all()
    mask = torch.ones(1, 2, dtype=torch.bool)
    chunked = chunked_token_divergence(s, t, mask, "akl", chunk_rows=1, mu=0.0)
    torch.testing.assert_close(chunked, want)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), s)
    torch.testing.assert_close(g_chunked, g_dense)
    # sparse (teacher top-k + tail): exact at k = V, finite below
    for k in (4, 2):
        top_lp, top_ids, tail = top_k_with_tail(logprobs(t), k)
        sparse = sparse_token_divergence(s, top_lp, top_ids, tail, "akl", mu=0.0)
        (g_sparse,) = torch.autograd.grad(sparse.sum(), s)
        assert torch.isfinite(sparse).all() and torch.isfinite(g_sparse).all()
        chunked_sp = chunked_sparse_divergence(s, mask, top_lp.reshape(2, k), top_ids.reshape(2, k),
                                               tail.reshape(2), "akl", chunk_rows=1, mu=0.0)
        torch.testing.assert_close(chunked_sp, sparse)
        if k == 4:
            torch.testing.assert_close(sparse, want)


# ----------------------------------------------------------------------------------------------- 2. attention
def _two_head_maps():
    """B = 1, H = 2, T = 2 (causal): query 0 sees only key 0; query 1 has the rows below."""
    a_s = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]], [[1.0, 0.0], [0.9, 0.1]]]], dtype=torch.float64)
    a_t = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.6, 0.4]]]], dtype=torch.float64)
    return a_s, a_t


def test_attention_default_is_the_sources_kl_student_teacher():
    """L_attention = (1/N_heads) sum_j KL(A_s^(j) || A_t^(j)) (large-to-small notes), by hand."""
    a_s, a_t = _two_head_maps()
    head0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    head1 = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    want = torch.tensor([[0.0, (head0 + head1) / 2]], dtype=torch.float64)
    torch.testing.assert_close(attention_divergence(a_s, a_t), want)
    torch.testing.assert_close(attention_divergence(a_s, a_t, divergence="rkl"), want)
    # the other direction stays available: KL(A_t || A_s) (MiniLM), and it differs here
    f0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    f1 = 0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.1)
    fwd = torch.tensor([[0.0, (f0 + f1) / 2]], dtype=torch.float64)
    torch.testing.assert_close(attention_divergence(a_s, a_t, divergence="fkl"), fwd)
    assert abs((head0 + head1) - (f0 + f1)) > 0.05
    assert get_method("intermediate").Args().attention_divergence == "rkl"


def test_intermediate_method_attention_term_uses_kl_student_teacher_by_default():
    setup = tiny_setup()
    student = setup.student(seed=3).eval()  # 1 layer, 2 heads; teacher 2 layers, 2 heads: pair (1, 2)
    sc = student_config("intermediate", method_args={"attention_weight": 1.0, "hidden_weight": 0.0,
                                                     "kd_weight": 0.0})
    method = get_method("intermediate")(sc, sc.method_args)
    teacher = method.setup(student, copy.deepcopy(setup.teacher))
    batch = setup.val_batches()[0]
    with torch.no_grad():
        out = method.compute_loss(StepContext(student=student, batch=batch, teacher=teacher,
                                              num_items=batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()))
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
        a_s, a_t = student(**kw).attentions[0], teacher(**kw).attentions[1]
    keep = batch["attention_mask"].bool()
    a_s, a_t = a_s.double(), a_t.double()
    per_head = (a_s * (a_s.clamp_min(1e-30).log() - a_t.clamp_min(1e-30).log())).sum(-1)  # KL(A_s || A_t)
    want = per_head.mean(1)[keep].mean()
    assert out.logs["attention"] == pytest.approx(float(want), rel=1e-4)


# ----------------------------------------------------------------------------------------------- 3. ranking scope
class _TableLM(torch.nn.Module):
    """A stand-in student: row i's logits are table[input_ids[i, 0]] (the first token names the row)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _rows_batch(rows, n_tokens, vocab, prompt_len=1):
    """Rows `rows` of a _TableLM; the labels (targets, any ids < vocab) from position `prompt_len` on."""
    ids = torch.tensor(rows).unsqueeze(1).expand(-1, n_tokens).clone()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, prompt_len:] = (ids[:, prompt_len:] * 7 + torch.arange(n_tokens - prompt_len)) % vocab
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_atkd_micro_batch_ranking_differs_from_accumulated_ranking_by_the_documented_amount():
    """ATKD ranks per compute_loss call (micro-batch). Against ranking over the accumulated batch, the loss
    differs by exactly tkd_weight/N (sum_{H_mb - H_acc} TKD - sum_{H_acc - H_mb} TKD)."""
    g = torch.Generator().manual_seed(0)
    n_rows, T, V = 4, 6, 11
    s_table = torch.randn(n_rows, T, V, generator=g, dtype=torch.float64)
    t_table = torch.randn(n_rows, T, V, generator=g, dtype=torch.float64) * 3
    t_table[:2] *= 0.2  # rows 0-1 uncertain teacher, rows 2-3 confident: the rankings differ
    student = _TableLM(s_table)
    full = _rows_batch([0, 1, 2, 3], T, V)
    micro = [_rows_batch([0, 1], T, V), _rows_batch([2, 3], T, V)]
    n = int(full["labels"][:, 1:].ne(IGNORE_INDEX).sum())

    def loss(batch, hard_fraction, tkd_weight=1.5):
        sc = student_config("atkd", method_args={"hard_fraction": hard_fraction, "tkd_weight": tkd_weight})
        method = get_method("atkd")(sc, sc.method_args)
        ctx = StepContext(student=student, batch=batch, num_items=n,
                          teacher_signal=DenseTeacherSignal(t_table[batch["input_ids"][:, 0]]))
        return float(method.compute_loss(ctx).loss)

    # TKD and UNC per response token of the full batch, in row order
    mask = full["labels"][:, 1:].ne(IGNORE_INDEX)
    targets = full["labels"][:, 1:][mask]
    s_lp = logprobs(s_table[:, :-1][mask])
    t_lp = logprobs(t_table[:, :-1][mask])
    tkd, _, unc = decompose(s_lp, t_lp, targets, "fkl")
    for f in (0.25, 0.5):
        acc_hard = set(torch.topk(unc, math.ceil(f * n)).indices.tolist())
        mb_hard, start = set(), 0
        for rows in (2, 2):  # the two micro-batches: 2 rows of T - 1 response tokens each
            k = rows * (T - 1)
            idx = torch.topk(unc[start:start + k], math.ceil(f * k)).indices + start
            mb_hard |= set(idx.tolist())
            start += k
        assert mb_hard != acc_hard
        want = 1.5 / n * (sum(float(tkd[i]) for i in mb_hard - acc_hard)
                          - sum(float(tkd[i]) for i in acc_hard - mb_hard))
        l_mb = sum(loss(b, f) for b in micro)
        l_acc = loss(full, f)  # one call over the whole batch = ranking over the accumulated batch
        assert l_mb - l_acc == pytest.approx(want, abs=1e-12)
        assert abs(l_mb - l_acc) <= 1.5 * len(mb_hard ^ acc_hard) / n * float(tkd.max()) + 1e-12
    for f in (0.0, 1.0):  # no difference at the ends
        assert sum(loss(b, f) for b in micro) == pytest.approx(loss(full, f), abs=1e-12)


def test_minillm_whitening_per_micro_batch_is_the_documented_affine_map_of_the_accumulated_one():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    full = advantages(rewards, mask)
    raw = advantages(rewards, mask, whiten=False)
    for rows in (slice(0, 2), slice(2, 4)):
        part = advantages(rewards[rows], mask[rows])
        r_all, r_k = raw[mask], raw[rows][mask[rows]]
        m, m_k = r_all.mean(), r_k.mean()
        s = (r_all.var(unbiased=False) + 1e-8).sqrt()
        s_k = (r_k.var(unbiased=False) + 1e-8).sqrt()
        torch.testing.assert_close(part[mask[rows]], (s / s_k) * full[rows][mask[rows]] + (m - m_k) / s_k)
        assert not torch.allclose(part[mask[rows]], full[rows][mask[rows]])
    # same mean and variance in every micro-batch (here: the same rows twice): no difference
    twice = torch.cat([rewards[:2], rewards[:2]])
    twice_mask = torch.cat([mask[:2], mask[:2]])
    torch.testing.assert_close(advantages(twice, twice_mask)[:2], advantages(rewards[:2], mask[:2]))


# ----------------------------------------------------------------------------------------------- 4. tau^2
def test_kd_temperature_scale_tau_squared_is_eq_2():
    """OKD paper eq. 2: L_KL = tau^2 sum p(tau; teacher) log(p(tau; teacher) / p(tau; student))."""
    g = torch.Generator().manual_seed(2)
    s_table = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    t_table = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    batch = _rows_batch([0, 1], 5, 9, prompt_len=2)
    mask = batch["labels"][:, 1:].ne(IGNORE_INDEX)
    n = int(mask.sum())
    tau = 2.0
    p = logprobs(t_table[:, :-1], tau).exp()
    q = logprobs(s_table[:, :-1], tau).exp()
    eq2 = tau ** 2 * float(((p * (p.log() - q.log())).sum(-1) * mask).sum()) / n
    out = {}
    for scale in ("none", "tau_squared"):
        sc = student_config("kd", temperature=tau, method_args={"temperature_scale": scale})
        method = get_method("kd")(sc, sc.method_args)
        ctx = StepContext(student=_TableLM(s_table), batch=batch, num_items=n,
                          teacher_signal=DenseTeacherSignal(t_table))
        out[scale] = method.compute_loss(ctx)
    assert float(out["tau_squared"].loss) == pytest.approx(eq2, rel=1e-10)
    assert float(out["none"].loss) == pytest.approx(eq2 / tau ** 2, rel=1e-10)  # default unchanged
    assert out["none"].logs["kd"] == out["tau_squared"].logs["kd"]  # the log is the plain divergence
    with pytest.raises(ValueError, match="temperature_scale"):
        get_method("kd").validate_args({"temperature_scale": "tau"})


def test_okd_temperature_scale_tau_squared_on_both_kl_terms():
    setup = tiny_setup()
    batch = setup.val_batches()[0]
    student = setup.student().eval()
    res = {}
    for scale in ("none", "tau_squared"):
        sc = student_config("okd", temperature=2.0, method_args={"teacher_kl_weight": 0.3,
                                                                   "temperature_scale": scale})
        method = get_method("okd")(sc, sc.method_args)
        teacher = method.setup(student, copy.deepcopy(setup.teacher))  # LoRA B = 0: p_ta = teacher at init
        with torch.no_grad():
            res[scale] = method.terms(StepContext(student=student, batch=batch, teacher=teacher,
                                                  num_items=batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()))
    (ls0, lt0, logs0), (ls2, lt2, logs2) = res["none"], res["tau_squared"]
    torch.testing.assert_close(ls2, 4.0 * ls0)  # eq. 17 with eq. 2's tau^2 (alpha = 0)
    kd_t, ce_t = logs0["okd_teacher_kd"], logs0["okd_teacher_ce"]
    assert float(lt0) == pytest.approx(0.3 * kd_t + 0.7 * ce_t, rel=1e-5)
    assert float(lt2) == pytest.approx(0.3 * 4.0 * kd_t + 0.7 * ce_t, rel=1e-5)  # eq. 16: tau^2 on L_KL only
    assert logs2["okd_student"] == pytest.approx(4.0 * logs2["okd_student_kd"], rel=1e-6)


# ----------------------------------------------------------------------------------------------- 5. progressive
def _deep_student(n_layer=3):
    setup = tiny_setup()
    return build_from_config(ArchConfig(n_layer=n_layer, hidden=32, n_head=2), setup.tokenizer,
                             n_positions=MAX_LENGTH + 16, seed=1)


def _progressive(student, **args):
    sc = student_config("progressive", method_args=args)
    method = get_method("progressive")(sc, sc.method_args)
    return method, method.setup(student, copy.deepcopy(tiny_setup().teacher))


def _by_layer(student):
    return {layer: [p for p, lay in student_layer_of_params(student) if lay == layer] for layer in range(4)}


def test_student_layer_numbering_gpt2():
    student = _deep_student()
    layers = {n: lay for (p, lay), (n, _) in zip(student_layer_of_params(student), student.named_parameters())}
    assert layers["transformer.wte.weight"] == 0 and layers["transformer.wpe.weight"] == 0  # (lm_head is tied)
    assert layers["transformer.h.0.attn.c_attn.weight"] == 1 and layers["transformer.h.2.mlp.c_fc.bias"] == 3
    assert layers["transformer.ln_f.weight"] == 3


def test_progressive_trains_only_the_first_student_layers_first():
    """Source: train the initial student layers against the initial teacher layers, then add layers."""
    setup = tiny_setup()
    student = _deep_student()  # 3 layers vs the teacher's 2: pairs (1, 1), (2, 1), (3, 2)
    method, teacher = _progressive(student, hidden_weight=1.0)
    assert method.pairs == [(1, 1), (2, 1), (3, 2)]
    assert [method.trainable_layers(p) for p in (0.0, 0.4, 0.7, 1.0)] == [1, 2, 3, 3]
    batch = setup.val_batches()[0]
    layers = _by_layer(student)
    for progress, trained in ((0.0, {0, 1}), (0.4, {0, 1, 2}), (0.7, {0, 1, 2, 3})):
        student.zero_grad()
        ctx = StepContext(student=student, batch=batch, teacher=teacher, progress=progress,
                          num_items=batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())
        method.compute_loss(ctx).loss.backward()
        for layer, params in layers.items():
            total = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
            assert (total > 0) == (layer in trained), (progress, layer, total)
    # `all`: today's variant, the whole student from step 0
    student2 = _deep_student()
    method2, teacher2 = _progressive(student2, train_layers="all")
    method2.compute_loss(StepContext(student=student2, batch=batch, teacher=teacher2, progress=0.0,
                                     num_items=batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())).loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in _by_layer(student2)[3])


def test_progressive_unfrozen_layers_start_with_a_fresh_adamw_state():
    """Zero gradients keep AdamW's moments at 0 (no movement) but advance its step count; at unfreezing the
    state is dropped, so the first update is a bias-corrected Adam step (|Δ| <= lr), not up to ~3x lr."""
    setup = tiny_setup()
    student = _deep_student(n_layer=2)  # pairs (1, 1), (2, 2): phase 0 trains layer 1, phase 1 all
    method, teacher = _progressive(student)
    lr = 1e-3
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    trainer = SimpleNamespace(optimizer=optimizer)
    top = _by_layer(student)[2]
    batch = setup.val_batches()[0]
    start = [p.detach().clone() for p in top]
    for step, progress in enumerate((0.0, 0.0, 0.0, 0.5)):
        before = [p.detach().clone() for p in top]
        ctx = StepContext(student=student, batch=batch, teacher=teacher, progress=progress, trainer=trainer,
                          num_items=batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())
        method.compute_loss(ctx).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if progress == 0.0:
            assert all(torch.equal(p, s) for p, s in zip(top, start))  # frozen: not moved
        else:
            assert all(float(optimizer.state[p]["step"]) == 1 for p in top)
            delta = max(float((p - b).abs().max()) for p, b in zip(top, before))
            assert 0.5 * lr < delta <= lr * (1 + 1e-4)


def test_progressive_through_the_trainer_keeps_the_not_yet_reached_layers():
    """Two steps over three phases: layer 3 and the final norm are never unfrozen, so they keep their
    initial values; layers 1 and 2 train."""
    setup = tiny_setup()
    student = _deep_student()
    method, teacher = _progressive(student)
    init = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = TrainingConfig(max_steps=2, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0, logging_steps=2)
    train(student, setup.train_set, setup.tokenizer, cfg, setup.workdir / "student-progressive-frozen",
          method=method, seed=0, teacher=LiveTeacher(copy.deepcopy(setup.teacher)), save=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p.detach().cpu(), init[n])}
    assert not any(n.startswith(("transformer.h.2.", "transformer.ln_f.")) for n in changed)
    assert any(n.startswith("transformer.h.0.") for n in changed)
    assert any(n.startswith("transformer.h.1.") for n in changed)
