"""The teacher-signal interface: the cached top-k at k = V equals the live dense logits (values and gradients)
for every divergence and for ATKD's decomposition, through the signal, the methods and `train()`; below V,
ATKD's target split is exact for targets in the top-k and bounded for the others."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kd_core.config import TrainingConfig
from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.losses.atkd import decompose
from kd_core.losses.divergences import DIVERGENCES
from kd_core.losses.tokens import logprobs
from kd_core.losses.sparse import coarsen_with_target, top_k_with_tail
from kd_core.methods import StepContext, get_method
from kd_core.teachers.signal import DenseTeacherSignal, TopKTeacherSignal
from kd_core.teachers.source import CachedTeacher, LiveTeacher
from kd_core.training.trainer import train
from tests.method_harness import padded_batch, student_config, tiny_setup

B, T, V, PAD = 3, 8, 11, 2
DIVS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}), ("skl", {"alpha": 0.2}),
        ("srkl", {"alpha": 0.2}), ("akl", {"mu": 0.4}), ("abkd", {"alpha": 0.4, "beta": 0.3})]


def _inputs():
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = torch.randn(B, T, V + PAD, generator=g, dtype=torch.float64) * 3  # padded embedding rows
    positions = torch.zeros(B, T, dtype=torch.bool)
    positions[0, 2:7] = True
    positions[1, 4:] = True
    positions[2, 1:3] = True
    targets = torch.randint(0, V, (int(positions.sum()),), generator=g)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64)
    return student, teacher, positions, targets, weights


def _topk(teacher: torch.Tensor, positions: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTeacherSignal:
    """What the cache would hold for these positions: top-k of the teacher over the shared vocabulary."""
    lp, ids, tail = top_k_with_tail(logprobs(teacher[positions][:, :V], temperature), k)
    return TopKTeacherSignal(lp, ids, tail, V, temperature)


def _grad(values: torch.Tensor, student: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad((values * weights).sum(), student)[0]


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_on_the_cache_at_full_k_equals_the_live_logits(name, temperature):
    student, teacher, positions, _, weights = _inputs()
    dense = DenseTeacherSignal(teacher).divergence(student, positions, name, temperature=temperature)
    sparse = _topk(teacher, positions, V, temperature).divergence(student, positions, name, temperature=temperature)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(sparse, student, weights), _grad(dense, student, weights), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,params", DIVS, ids=[d[0] for d in DIVS])
def test_atkd_parts_on_the_cache_at_full_k_equal_the_live_logits(name, params):
    student, teacher, positions, targets, weights = _inputs()
    live, cached = DenseTeacherSignal(teacher), _topk(teacher, positions, V, 1.5)
    unc = live.target_uncertainty(student, positions, targets, temperature=1.5)
    torch.testing.assert_close(cached.target_uncertainty(student, positions, targets, temperature=1.5), unc,
                               rtol=1e-10, atol=1e-12)
    hard = (unc > unc.median()).double() * 2.0
    out = {}
    for key, signal in (("live", live), ("cached", cached)):
        per = signal.decoupled_divergence(student, positions, targets, name, temperature=1.5, tkd_weight=hard,
                                          dkd_weight=0.7, **params)
        out[key] = per, _grad(per, student, weights)
    torch.testing.assert_close(out["cached"][0], out["live"][0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out["cached"][1], out["live"][1], rtol=1e-8, atol=1e-10)
    # and the live signal is the definition: decompose on the shared vocabulary
    s, t = logprobs(student[positions], 1.5), logprobs(teacher[positions][:, :V], 1.5)
    tkd, dkd, unc_ref = decompose(s, t, targets, name, **params)
    torch.testing.assert_close(out["live"][0][positions], hard * tkd + 0.7 * dkd)
    torch.testing.assert_close(unc, unc_ref)


def test_atkd_target_split_below_full_k():
    """Target in the top-k: p_g, UNC and TKD are exact. Outside: p_g is the tail's mean token mass, inside
    the feasible range [0, min(P_tail, p_min)]; the student side is exact."""
    g = torch.Generator().manual_seed(3)
    n, k = 64, 4
    teacher_lp = logprobs(torch.randn(n, V, generator=g, dtype=torch.float64) * 2)
    student_lp = logprobs(torch.randn(n, V, generator=g, dtype=torch.float64) * 2)
    targets = torch.randint(0, V, (n,), generator=g)
    top_lp, top_ids, tail = top_k_with_tail(teacher_lp, k)
    s_cat, t_cat, idx = coarsen_with_target(student_lp, top_lp, top_ids, tail, targets, V)
    torch.testing.assert_close(t_cat.exp().sum(-1), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(s_cat.exp().sum(-1), torch.ones(n, dtype=torch.float64))
    in_top = (top_ids == targets[:, None]).any(-1)
    assert in_top.any() and (~in_top).any()
    p_g = t_cat.gather(-1, idx[:, None]).squeeze(-1).exp()
    true_p_g = teacher_lp.gather(-1, targets[:, None]).squeeze(-1).exp()
    torch.testing.assert_close(p_g[in_top], true_p_g[in_top])
    tail_p, p_min = tail.exp(), top_lp[:, -1].exp()
    torch.testing.assert_close(p_g[~in_top], tail_p[~in_top] / (V - k))
    assert (p_g[~in_top] <= torch.minimum(tail_p, p_min)[~in_top] + 1e-12).all()
    q_g = s_cat.gather(-1, idx[:, None]).squeeze(-1)
    torch.testing.assert_close(q_g, student_lp.gather(-1, targets[:, None]).squeeze(-1))  # student exact
    tkd, _, unc = decompose(s_cat, t_cat, idx, "fkl")
    tkd_ref, _, unc_ref = decompose(student_lp, teacher_lp, targets, "fkl")
    torch.testing.assert_close(tkd[in_top], tkd_ref[in_top])
    torch.testing.assert_close(unc[in_top], unc_ref[in_top])
    assert ((unc - unc_ref).abs()[~in_top] <= torch.minimum(tail_p, p_min)[~in_top] + 1e-12).all()


def test_the_cache_refuses_another_temperature_or_row_count():
    student, teacher, positions, targets, _ = _inputs()
    cached = _topk(teacher, positions, 5, temperature=2.0)
    with pytest.raises(ValueError, match="temperature 2.0"):
        cached.divergence(student, positions, "fkl", temperature=1.0)
    fewer = positions.clone()
    fewer[0, 2] = False
    with pytest.raises(ValueError, match="cached teacher rows"):
        cached.target_uncertainty(student, fewer, targets[1:], temperature=2.0)


# ----------------------------------------------------------------------------------------------- methods
def _gpt2(vocab: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


class ExactCache:
    """A stand-in for TeacherLogitCache at k = V: the teacher's rows of any batch, computed on demand (CPU)."""

    def __init__(self, teacher: torch.nn.Module, vocab_size: int, temperature: float):
        self.teacher, self.vocab_size, self.temperature = teacher.cpu().eval(), vocab_size, temperature

    @torch.no_grad()
    def rows_for(self, batch):
        batch = {k: v.cpu() for k, v in batch.items()}
        logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:].ne(IGNORE_INDEX)
        return top_k_with_tail(logprobs(logits[:, :-1][mask][:, :self.vocab_size], self.temperature), self.vocab_size)


METHOD_CASES = [("atkd", "fkl", {}, {"hard_fraction": 0.5, "tkd_weight": 2.0}), ("atkd", "rkl", {}, {}),
                ("atkd", "jsd", {"beta": 0.3}, {}), ("kd", "skl", {"alpha": 0.2}, {}),
                ("kd", "srkl", {"alpha": 0.2}, {}), ("kd", "akl", {"mu": 0.4}, {}), ("kd", "jsd", {"beta": 0.3}, {})]


@pytest.mark.parametrize("method_name,divergence,div_args,method_args", METHOD_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in METHOD_CASES])
def test_method_loss_and_gradients_on_the_cache_equal_the_live_teacher(method_name, divergence, div_args,
                                                                        method_args):
    student, teacher = _gpt2(40, 0), _gpt2(43, 1).eval()  # the teacher has 3 padded rows
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(5))
    batch = padded_batch(ids)
    sc = student_config(method_name, divergence=divergence, divergence_args=div_args, temperature=1.5, alpha=0.2,
                        method_args=method_args)
    method = get_method(method_name)(sc, sc.method_args)
    results = {}
    for mode in ("live", "cached"):
        signal = (TopKTeacherSignal.from_cache(ExactCache(teacher, 40, 1.5), batch, "cpu") if mode == "cached"
                  else None)
        ctx = StepContext(student=student, batch=batch, num_items=17, teacher=teacher if mode == "live" else None,
                          teacher_signal=signal)
        out = method.compute_loss(ctx)
        results[mode] = out.loss, torch.autograd.grad(out.loss, list(student.parameters()))
    torch.testing.assert_close(results["cached"][0], results["live"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results["cached"][1], results["live"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


TRAIN_CASES = [("atkd", "fkl", {}), ("kd", "skl", {"alpha": 0.2}), ("kd", "srkl", {"alpha": 0.2}),
               ("kd", "akl", {}), ("atkd", "jsd", {"beta": 0.3})]


@pytest.mark.parametrize("method_name,divergence,div_args", TRAIN_CASES, ids=[f"{c[0]}-{c[1]}" for c in TRAIN_CASES])
def test_training_on_the_cache_at_full_k_follows_the_live_teacher(method_name, divergence, div_args):
    """Through `train()`: same student, same data order, the loss curve on the cache equals the live one."""
    setup = tiny_setup()
    sc = student_config(method_name, divergence=divergence, divergence_args=div_args)
    cfg = TrainingConfig(max_steps=3, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0, logging_steps=1)
    curves = {}
    for mode in ("live", "cached"):
        method = get_method(method_name)(sc, sc.method_args)
        teacher = copy.deepcopy(setup.teacher)
        cache = ExactCache(copy.deepcopy(setup.teacher), len(setup.tokenizer), sc.temperature)
        result = train(setup.student(), setup.train_set, setup.tokenizer, cfg,
                       setup.workdir / f"signal-{method_name}-{mode}", method=method, seed=0,
                       teacher=LiveTeacher(teacher) if mode == "live" else CachedTeacher(cache), save=False)
        curves[mode] = [h["loss"] for h in result.history if "loss" in h]
        assert result.teacher_forward_passes == (0 if mode == "cached" else 3 * 16)
    assert len(curves["live"]) == 3 and all(map(math.isfinite, curves["live"]))
    torch.testing.assert_close(torch.tensor(curves["cached"]), torch.tensor(curves["live"]), rtol=1e-4, atol=1e-5)


def test_train_refuses_the_cache_for_a_method_that_needs_the_live_teacher():
    setup = tiny_setup()
    sc = student_config("okd")
    with pytest.raises(ValueError, match="cannot train on the teacher cache"):
        train(setup.student(), setup.train_set, setup.tokenizer, TrainingConfig(max_steps=1), setup.workdir / "x",
              method=get_method("okd")(sc, sc.method_args), seed=0,
              teacher=CachedTeacher(ExactCache(setup.teacher, len(setup.tokenizer), 1.0)))
