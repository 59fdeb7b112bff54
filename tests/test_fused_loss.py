"""The fused LM-head losses (kd_core/losses/fused.py): values and gradients (hidden states, head weight, bias) equal
to the unfused losses on the logits h W^T + b, for every registered divergence, at a temperature, under padding,
with the teacher's cached top-k; and the methods' fused path equal to their logits path."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.models.lm import lm_head_inputs
from kd_core.losses.chunked import chunked_sparse_divergence, chunked_token_divergence
from kd_core.losses.divergences import DIVERGENCES
from kd_core.losses.fused import (fused_cross_entropy, fused_logits_divergence, fused_sparse_divergence,
                                  fused_token_divergence)
from kd_core.losses.sparse import top_k_with_tail
from kd_core.losses.tokens import logprobs, reduce_tokens
from kd_core.methods import StepContext, get_method
from kd_core.methods.base import token_ce
from kd_core.teachers.signal import TopKTeacherSignal
from tests.method_harness import padded_batch, student_config

B, T, H, H_T, V = 3, 9, 6, 8, 23
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "akl": {"mu": 0.4},
          "abkd": {"alpha": 0.4, "beta": -0.1}}


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    leaf = lambda *shape: (torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_(True)  # noqa: E731
    student = {"hidden": leaf(B, T, H), "weight": leaf(V, H), "bias": leaf(V)}
    teacher = {"hidden": torch.randn(B, T, H_T, generator=g, dtype=dtype) * 2,
               "weight": torch.randn(V + 2, H_T, generator=g, dtype=dtype),  # 2 padded vocabulary rows
               "bias": torch.randn(V + 2, generator=g, dtype=dtype)}
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:7] = True  # prompt before, padding after
    mask[1, 4:] = True
    mask[2, 1:3] = True
    weights = torch.rand(B, T, generator=g, dtype=dtype)  # a non-uniform upstream gradient
    return student, teacher, mask, weights


def _logits(student):
    return student["hidden"] @ student["weight"].T + student["bias"]


def _grads(loss, student):
    return torch.autograd.grad(loss, [student["hidden"], student["weight"], student["bias"]])


def _assert_equal(fused, unfused, mask, g_fused, g_unfused, tol=1e-12):
    torch.testing.assert_close(fused[mask], unfused[mask], rtol=tol, atol=tol)
    assert (fused[~mask] == 0).all()
    for a, b in zip(g_fused, g_unfused):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("upstream", ["token_mean", "per_position", "recompute"])
def test_fused_divergence_matches_the_unfused_loss(name, temperature, upstream):
    """Blocks of 4 rows in sub-chunks of 3 (a partial block and sub-chunk): the forward-time gradients scaled by a
    token mean, the backward recompute for per-position weights, and recompute=True."""
    student, teacher, mask, weights = _inputs()
    w = weights if upstream == "per_position" else 1.0
    t_logits = teacher["hidden"] @ teacher["weight"].T + teacher["bias"]
    dense = chunked_token_divergence(_logits(student), t_logits, mask, name, temperature, **PARAMS.get(name, {}))
    g_dense = _grads(reduce_tokens(dense * w, mask, num_items=11), student)

    fused = fused_token_divergence(student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], name,
                                   temperature, student_bias=student["bias"], teacher_bias=teacher["bias"], mask=mask,
                                   block_rows=4, sub_rows=3, recompute=upstream == "recompute",
                                   **PARAMS.get(name, {}))
    g_fused = _grads(reduce_tokens(fused * w, mask, num_items=11), student)
    _assert_equal(fused, dense, mask, g_fused, g_dense)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "akl"])
@pytest.mark.parametrize("k", [4, V])
def test_fused_sparse_divergence_matches_the_unfused_cache_loss(name, k):
    student, teacher, mask, weights = _inputs()
    t_rows = (teacher["hidden"] @ teacher["weight"].T)[mask][:, :V]
    cache = top_k_with_tail(logprobs(t_rows, 2.0), k)
    dense = chunked_sparse_divergence(_logits(student), mask, *cache, name, temperature=2.0, vocab_size=V,
                                      **PARAMS.get(name, {}))
    g_dense = _grads(reduce_tokens(dense * weights, mask), student)
    fused = fused_sparse_divergence(student["hidden"], student["weight"], *cache, name, 2.0, vocab_size=V,
                                    student_bias=student["bias"], mask=mask, block_rows=5, sub_rows=2,
                                    **PARAMS.get(name, {}))
    g_fused = _grads(reduce_tokens(fused * weights, mask), student)
    _assert_equal(fused, dense, mask, g_fused, g_dense)


def test_fused_logits_teacher_and_cross_entropy_match_the_unfused_losses():
    student, teacher, mask, _ = _inputs()
    t_logits = teacher["hidden"] @ teacher["weight"].T
    dense = chunked_token_divergence(_logits(student), t_logits, mask, "jsd", 1.5, beta=0.3)
    fused = fused_logits_divergence(student["hidden"], student["weight"], t_logits, "jsd", 1.5,
                                    student_bias=student["bias"], mask=mask, block_rows=2, beta=0.3)
    _assert_equal(fused, dense, mask, _grads(reduce_tokens(fused, mask), student),
                  _grads(reduce_tokens(dense, mask), student))

    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    ce = token_ce(_logits(student), targets)  # in fp32
    fused_ce = fused_cross_entropy(student["hidden"], student["weight"], targets, bias=student["bias"], mask=mask)
    _assert_equal(fused_ce.float(), ce, mask, _grads(reduce_tokens(fused_ce, mask), student),
                  _grads(reduce_tokens(ce, mask), student), tol=1e-6)


def test_fused_float32_default_sizes_and_no_grad():
    student, teacher, mask, _ = _inputs(torch.float32)
    t_logits = teacher["hidden"] @ teacher["weight"].T + teacher["bias"]
    dense = chunked_token_divergence(_logits(student), t_logits, mask, "fkl")
    fused = fused_token_divergence(student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], "fkl",
                                   student_bias=student["bias"], teacher_bias=teacher["bias"], mask=mask)
    _assert_equal(fused, dense, mask, _grads(reduce_tokens(fused, mask), student),
                  _grads(reduce_tokens(dense, mask), student), tol=2e-5)
    with torch.no_grad():
        values = fused_token_divergence(student["hidden"], student["weight"], teacher["hidden"], teacher["weight"],
                                        "fkl", student_bias=student["bias"], teacher_bias=teacher["bias"], mask=mask)
    assert not values.requires_grad
    torch.testing.assert_close(values, fused.detach())


def test_second_backward_recomputes_the_same_gradients():
    student, teacher, mask, _ = _inputs()
    loss = reduce_tokens(fused_token_divergence(student["hidden"], student["weight"], teacher["hidden"],
                                                teacher["weight"], "rkl", 1.3, mask=mask, block_rows=4), mask)
    first = torch.autograd.grad(loss, student["weight"], retain_graph=True)[0]
    second = torch.autograd.grad(loss, student["weight"])[0]
    torch.testing.assert_close(second, first, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- methods
def _gpt2(vocab: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)).double()


def _method_loss_and_grads(method_name, student, teacher, batch, signal=None, **fields):
    sc = student_config(method_name, **fields)
    method = get_method(method_name)(sc, sc.method_args)
    ctx = StepContext(student=student, batch=batch, num_items=17, teacher=teacher, teacher_signal=signal)
    out = method.compute_loss(ctx)
    return out, torch.autograd.grad(out.loss, list(student.parameters()))


METHOD_CASES = [("kd", {"divergence": "fkl", "method_args": {"temperature_scale": "tau_squared"}}),
                ("kd", {"divergence": "akl", "alpha": 0.3}), ("gkd", {"method_args": {"lmbda": 0.0}, "alpha": 0.2}),
                ("distillm", {}), ("imitkd", {"method_args": {"beta_start": 1.0, "beta_end": 1.0}})]


@pytest.mark.parametrize("method_name,fields", METHOD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(METHOD_CASES)])
def test_method_fused_path_equals_its_logits_path(method_name, fields):
    """The loss, its logs and the student's gradients with `fused_lm_head` on and off (the teacher has 3 padded
    vocabulary rows; α > 0 mixes in the CE, itself fused); and on the fused path neither model's LM head
    projects more than the last position."""
    student, teacher = _gpt2(40, 0), _gpt2(43, 1).eval()
    batch = padded_batch(torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(5)))
    fields = {"temperature": 1.5, **fields}
    shapes = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
             for m in (student, teacher)]
    fused, g_fused = _method_loss_and_grads(method_name, student, teacher, batch, fused_lm_head=True, **fields)
    assert shapes and all(s[1] == 1 for s in shapes)  # logits_to_keep=1: the batch's logits never formed
    for h in hooks:
        h.remove()
    plain, g_plain = _method_loss_and_grads(method_name, student, teacher, batch, fused_lm_head=False, **fields)
    tol = 1e-6 if fields.get("alpha") else 1e-10  # the CE is taken in fp32 (token_ce), the divergences in fp64 here
    torch.testing.assert_close(fused.loss, plain.loss, rtol=tol, atol=tol)
    assert fused.logs.keys() == plain.logs.keys()
    for key in fused.logs:
        assert fused.logs[key] == pytest.approx(plain.logs[key], rel=tol, abs=tol)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_kd_fused_path_on_the_teacher_cache_equals_its_logits_path():
    student, teacher = _gpt2(40, 0), _gpt2(40, 1).eval()
    batch = padded_batch(torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = t_logits[:, :-1][batch["labels"][:, 1:].ne(IGNORE_INDEX)]
        cache = top_k_with_tail(logprobs(rows, 1.5), 5)
    results = []
    for fused in (True, False):
        signal = TopKTeacherSignal(*cache, vocab_size=40, temperature=1.5)
        results.append(_method_loss_and_grads("kd", student, None, batch, signal=signal, temperature=1.5,
                                              divergence="jsd", alpha=0.2, fused_lm_head=fused))
    (fused_out, g_fused), (plain_out, g_plain) = results
    torch.testing.assert_close(fused_out.loss, plain_out.loss, rtol=1e-6, atol=1e-8)  # (α > 0: a CE in fp32)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_head_inputs_refuse_heads_that_are_not_a_plain_projection():
    """A config that soft-caps the logits, and (found by the first-call check) a head whose output is rescaled:
    None, so the methods fall back to the model's logits."""
    batch = padded_batch(torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(5)))
    model = _gpt2(40, 0)
    hidden, weight, bias = lm_head_inputs(model, batch["input_ids"], batch["attention_mask"])
    assert hidden.shape == (3, 12, 16) and weight is model.lm_head.weight and bias is None
    model.config.final_logit_softcapping = 30.0
    assert lm_head_inputs(model, batch["input_ids"], batch["attention_mask"]) is None
    scaled = _gpt2(40, 0)
    scaled.lm_head.register_forward_hook(lambda mod, inp, out: out * 2.0)
    assert lm_head_inputs(scaled, batch["input_ids"], batch["attention_mask"]) is None
