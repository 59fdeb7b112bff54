"""Chunked divergences: values and gradients identical to the unchunked computation, under padding masks."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.losses.chunked import chunked_sparse_divergence, chunked_token_divergence
from kd_core.losses.divergences import DIVERGENCES
from kd_core.losses.tokens import logprobs, reduce_tokens, token_divergence
from kd_core.losses.sparse import sparse_token_divergence, top_k_with_tail

B, T, V = 3, 9, 17


def _inputs(dtype=torch.float64, teacher_pad: int = 2):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(B, T, V, generator=g, dtype=dtype) * 3).requires_grad_(True)
    teacher = torch.randn(B, T, V + teacher_pad, generator=g, dtype=dtype) * 3  # padded embedding rows
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:7] = True  # prompt before, padding after
    mask[1, 4:] = True
    mask[2, 1:3] = True
    weights = torch.rand(B, T, generator=g, dtype=dtype)  # a non-uniform upstream gradient
    return student, teacher, mask, weights


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_chunked_matches_unchunked_values_and_gradients(name, chunk_rows):
    student, teacher, mask, weights = _inputs()
    dense = token_divergence(student, teacher, name, temperature=1.5)
    loss_dense = reduce_tokens(dense * weights, mask, num_items=11)
    (g_dense,) = torch.autograd.grad(loss_dense, student)

    chunked = chunked_token_divergence(student, teacher, mask, name, temperature=1.5, chunk_rows=chunk_rows)
    loss_chunked = reduce_tokens(chunked * weights, mask, num_items=11)
    (g_chunked,) = torch.autograd.grad(loss_chunked, student)

    torch.testing.assert_close(chunked[mask], dense[mask], rtol=1e-12, atol=1e-12)
    assert (chunked[~mask] == 0).all()
    torch.testing.assert_close(g_chunked, g_dense, rtol=1e-12, atol=1e-12)
    assert (g_chunked[~mask] == 0).all()


def test_chunked_float32_matches_unchunked():
    student, teacher, mask, weights = _inputs(torch.float32)
    dense = token_divergence(student, teacher, "jsd", beta=0.3)
    (g_dense,) = torch.autograd.grad(reduce_tokens(dense * weights, mask), student)
    chunked = chunked_token_divergence(student, teacher, mask, "jsd", chunk_rows=3, beta=0.3)
    (g_chunked,) = torch.autograd.grad(reduce_tokens(chunked * weights, mask), student)
    torch.testing.assert_close(chunked[mask], dense[mask], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_chunked, g_dense, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("k", [4, V])
def test_chunked_sparse_matches_unchunked_sparse(name, k):
    student, teacher, mask, weights = _inputs()
    top_lp, top_ids, tail = top_k_with_tail(logprobs(teacher[..., :V], 2.0), k)
    dense = sparse_token_divergence(student, top_lp, top_ids, tail, name, temperature=2.0, vocab_size=V)
    (g_dense,) = torch.autograd.grad(reduce_tokens(dense * weights, mask), student)
    chunked = chunked_sparse_divergence(student, mask, top_lp[mask], top_ids[mask], tail[mask], name,
                                        temperature=2.0, vocab_size=V, chunk_rows=2)
    (g_chunked,) = torch.autograd.grad(reduce_tokens(chunked * weights, mask), student)
    torch.testing.assert_close(chunked[mask], dense[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_chunked, g_dense, rtol=1e-12, atol=1e-12)


def test_chunked_rejects_bad_divergence_params_and_row_counts():
    student, teacher, mask, _ = _inputs()
    with pytest.raises(ValueError, match="beta"):
        chunked_token_divergence(student, teacher, mask, "jsd", beta=2.0)
    top_lp, top_ids, tail = top_k_with_tail(logprobs(teacher[..., :V]), 3)
    with pytest.raises(ValueError, match="cached teacher rows"):
        chunked_sparse_divergence(student, mask, top_lp[0], top_ids[0], tail[0], "fkl", vocab_size=V)


def test_kd_method_loss_and_gradients_match_the_dense_formula():
    """The `kd` method (chunked) against the dense definition on real models with padded vocabularies."""
    from kd_core.methods import StepContext, get_method
    from tests.method_harness import padded_batch, student_config

    def gpt2(vocab: int):
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))

    torch.manual_seed(0)
    student, teacher = gpt2(40), gpt2(45).eval()  # the teacher has 5 padded embedding rows
    ids = torch.randint(0, 40, (3, 12))
    batch = padded_batch(ids)
    attention, labels = batch["attention_mask"], batch["labels"]
    for sc in (student_config("kd", divergence="jsd", divergence_args={"beta": 0.3}, temperature=2.0),
               student_config("kd", divergence="fkl", alpha=0.4)):
        method = get_method("kd")(sc, sc.method_args)
        out = method.compute_loss(StepContext(student=student, batch=batch, num_items=20, teacher=teacher))
        grads = torch.autograd.grad(out.loss, list(student.parameters()))

        s = student(input_ids=ids, attention_mask=attention).logits[:, :-1]
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1]
        targets, mask = labels[:, 1:].clamp(min=0), labels[:, 1:].ne(IGNORE_INDEX)
        kd = reduce_tokens(token_divergence(s, t, sc.divergence, temperature=sc.temperature, **sc.divergence_args),
                           mask, 20)
        ce = reduce_tokens(torch.nn.functional.cross_entropy(s.transpose(1, 2), targets, reduction="none"), mask, 20)
        expected = sc.alpha * ce + (1 - sc.alpha) * kd
        expected_grads = torch.autograd.grad(expected, list(student.parameters()))
        torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
