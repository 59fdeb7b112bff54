"""Distillation across tokenizers (`uld`, `gold`; kd_core/losses/cross_tokenizer.py): the alignment of two
tokenizations (a hand example; spans covering the same bytes with two real BPE tokenizers), both losses against
brute-force loops in float64 with their gradients, gradcheck, padding and gradient-accumulation invariance, GOLD
with one tokenizer equal to `kd` (value and gradient), the params rules, and an end-to-end run of the tiny
pipeline with a teacher and a student that share no tokenizer."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from kd_core.config import ArchConfig, ConfigError, load_config, parse_config
from kd_core.data.builtin import generate_builtin
from kd_core.data.paired import NOT_TEXT, PairedCollator, encode_paired_rows, token_ends
from kd_core.data.template import format_prompt
from kd_core.data.tokenize import IGNORE_INDEX, train_bpe_tokenizer
from kd_core.losses.cross_tokenizer import (align_spans, gold_divergence, match_vocabularies, positional_alignment,
                                            sorted_l1, text_alignment, uld_divergence)
from kd_core.methods import StepContext, get_method
from kd_core.models.build import build_from_config
from tests.conftest import TINY_MODEL, TINY_TRAINING, tiny_params, write_params
from tests.method_harness import student_config

TEMPLATE, MAX_LENGTH = "minimal", 96
EXTRA = "naïve café: 5 € — ok"  # multi-byte characters: byte-level pieces that split a character


@functools.lru_cache(maxsize=1)
def two_tokenizers():
    """Built-in rows and two byte-level BPE tokenizers trained on them, 300 and 500 tokens."""
    rows = generate_builtin(240, seed=0)
    texts = [format_prompt(r, TEMPLATE) + r["response"] for r in rows] + [EXTRA]
    return rows, train_bpe_tokenizer(texts, 300), train_bpe_tokenizer(texts, 500)


def tiny_lm(tokenizer, seed: int, hidden: int = 32):
    return build_from_config(ArchConfig(n_layer=1, hidden=hidden, n_head=2), tokenizer, MAX_LENGTH + 16, seed).eval()


def paired_batch(student_tok, teacher_tok, rows, with_offsets: bool = True) -> dict[str, torch.Tensor]:
    ds, _ = encode_paired_rows(rows, student_tok, teacher_tok, TEMPLATE, MAX_LENGTH, "truncate",
                               with_offsets=with_offsets)
    return PairedCollator(student_tok.pad_token_id, teacher_tok.pad_token_id)([ds[i] for i in range(len(ds))])


def _bytes(tok, ids) -> bytes:
    """The text bytes of byte-level BPE tokens (their pieces mapped back to bytes)."""
    from kd_core.data.paired import _byte_level_alphabet

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    assert set(to_byte) == _byte_level_alphabet()
    return bytes(to_byte[c] for piece in tok.convert_ids_to_tokens(ids) for c in piece)


# ----------------------------------------------------------------------------------------------- alignment
def test_align_spans_hand_example():
    # "the cat": student "th" "e" " cat" (ends 2, 3, 7), teacher "the" " c" "at" (ends 3, 5, 7)
    assert align_spans([2, 3, 7], [3, 5, 7]) == [(0, 2, 0, 1), (2, 3, 1, 3)]
    assert align_spans([3, 5, 7], [3, 5, 7]) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]  # one tokenization
    assert align_spans([2, 3], [3, 5, 7]) == [(0, 2, 0, 1)]  # truncated student: the rest has no common end
    assert align_spans([2, 1, 7], [2, 7]) == [(0, 1, 0, 1), (1, 3, 1, 2)]  # a decreasing end is clipped
    assert align_spans([], [1, 2]) == []


def test_token_ends_split_the_byte_pieces_of_one_character():
    # "é!" = C3 A9 21: byte-level pieces 'Ã' '©' share the character's span (0, 1) and are split by byte
    assert token_ends("é!", [(0, 1), (0, 1), (1, 2)], ["Ã", "©", "!"]) == [1, 2, 3]
    # not byte-level pieces: the run keeps one end
    assert token_ends("é!", [(0, 1), (0, 1), (1, 2)], ["<x>", "<y>", "!"]) == [2, 2, 3]


def test_spans_cover_the_same_bytes_on_both_sides():
    rows, tok_a, tok_b = two_tokenizers()
    rows = rows[:12] + [{"instruction": "say it", "context": "", "response": EXTRA}]
    spans_seen = 0
    for row in rows:
        ends = {}
        for name, tok in (("a", tok_a), ("b", tok_b)):
            enc = tok(row["response"], add_special_tokens=False, return_offsets_mapping=True)
            ends[name] = (enc["input_ids"], token_ends(row["response"], enc["offset_mapping"],
                                                       tok.convert_ids_to_tokens(enc["input_ids"])))
        (ids_a, ends_a), (ids_b, ends_b) = ends["a"], ends["b"]
        text = row["response"].encode()
        assert ends_a[-1] == ends_b[-1] == len(text)
        start = 0
        spans = align_spans(ends_a, ends_b)
        for s0, s1, t0, t1 in spans:
            stop = ends_a[s1 - 1]
            assert stop == ends_b[t1 - 1]
            assert _bytes(tok_a, ids_a[s0:s1]) == _bytes(tok_b, ids_b[t0:t1]) == text[start:stop]
            start = stop
        assert start == len(text) and spans[-1][1] == len(ids_a) and spans[-1][3] == len(ids_b)  # tiled, no gap
        spans_seen += len(spans)
    assert spans_seen > 50


def test_text_alignment_of_a_paired_batch():
    rows, tok_a, tok_b = two_tokenizers()
    batch = paired_batch(tok_a, tok_b, rows[:8])
    al = text_alignment(batch["labels"], batch["text_ends"], batch["teacher_labels"], batch["teacher_text_ends"],
                        skip_eos=False)
    # per row: one span per common end of the two response texts, plus the EOS pair where neither side is truncated
    expected, eos_pairs = 0, 0
    for r in range(8):
        e_s = [int(e) for e in batch["text_ends"][r] if e != NOT_TEXT]
        e_t = [int(e) for e in batch["teacher_text_ends"][r] if e != NOT_TEXT]
        last_s = batch["labels"][r][batch["labels"][r] != IGNORE_INDEX][-1]
        last_t = batch["teacher_labels"][r][batch["teacher_labels"][r] != IGNORE_INDEX][-1]
        eos_pairs += int(last_s == tok_a.eos_token_id and last_t == tok_b.eos_token_id)
        expected += len(align_spans(e_s, e_t))
    assert 0 < eos_pairs < 8  # (one row is truncated on a side)
    assert al.num_spans == expected + eos_pairs
    # a prefix token is the label the logits at its position predict, on each side
    for labels, prefix in ((batch["labels"], al.student_prefix), (batch["teacher_labels"], al.teacher_prefix)):
        assert torch.equal(labels[prefix.b, prefix.t + 1], prefix.token)
    assert al.teacher_prefix.b.numel() > 0 or al.student_prefix.b.numel() > 0  # 300 vs 500 tokens: some merge
    skipped = text_alignment(batch["labels"], batch["text_ends"], batch["teacher_labels"], batch["teacher_text_ends"])
    assert skipped.num_spans == expected


# ----------------------------------------------------------------------------------------------- brute force
S_EOS, T_EOS = 6, 8
S_VOCAB = {t: i for i, t in enumerate(["a", "b", "c", "d", "e", "f", "<eos>"])}
T_VOCAB = {t: i for i, t in enumerate(["a", "x", "c", "y", "d", "z", "w", "b", "<eos>"])}


def _hand_batch():
    """Two rows under two tokenizations, labels and text ends written by hand, and the spans by hand:
    row 0: student ends 2 3 7 | teacher 3 5 7; row 1: student 4 6 | teacher 1 4 6; each side ends with its EOS."""
    g = torch.Generator().manual_seed(0)
    s_labels = torch.full((2, 7), IGNORE_INDEX)
    s_labels[0, 2:6] = torch.tensor([1, 3, 0, S_EOS])
    s_labels[1, 3:6] = torch.tensor([2, 5, S_EOS])
    t_labels = torch.full((2, 8), IGNORE_INDEX)
    t_labels[0, 3:7] = torch.tensor([2, 7, 4, T_EOS])
    t_labels[1, 2:6] = torch.tensor([0, 5, 1, T_EOS])
    s_ends = torch.full((2, 7), NOT_TEXT)
    s_ends[0, 2:5] = torch.tensor([2, 3, 7])
    s_ends[1, 3:5] = torch.tensor([4, 6])
    t_ends = torch.full((2, 8), NOT_TEXT)
    t_ends[0, 3:6] = torch.tensor([3, 5, 7])
    t_ends[1, 2:5] = torch.tensor([1, 4, 6])
    spans = [(0, [2, 3], [3]), (0, [4], [4, 5]), (0, [5], [6]), (1, [3], [2, 3]), (1, [4], [4]), (1, [5], [5])]
    s_logits = torch.randn(2, 7, len(S_VOCAB), dtype=torch.float64, generator=g) * 2
    t_logits = torch.randn(2, 8, len(T_VOCAB), dtype=torch.float64, generator=g) * 2
    return s_labels, t_labels, s_ends, t_ends, spans, s_logits, t_logits


def _brute_uld(s_logits, t_logits, s_labels, t_labels, tau, skip_eos):
    values = []
    for b in range(s_labels.shape[0]):
        s_pos = [j for j in range(1, s_labels.shape[1]) if s_labels[b, j] != IGNORE_INDEX]
        t_pos = [j for j in range(1, t_labels.shape[1]) if t_labels[b, j] != IGNORE_INDEX]
        if skip_eos:
            s_pos, t_pos = s_pos[:-1], t_pos[:-1]
        for js, jt in zip(s_pos, t_pos):
            q = sorted(torch.softmax(s_logits[b, js - 1] / tau, -1).tolist(), reverse=True)
            p = sorted(torch.softmax(t_logits[b, jt - 1] / tau, -1).tolist(), reverse=True)
            n = max(len(p), len(q))
            q, p = q + [0.0] * (n - len(q)), p + [0.0] * (n - len(p))
            values.append(sum(abs(a - c) for a, c in zip(q, p)))
    return values


@pytest.mark.parametrize("skip_eos", [False, True])
def test_uld_equals_a_brute_force_loop_in_float64(skip_eos):
    s_labels, t_labels, *_, s_logits, t_logits = _hand_batch()
    al = positional_alignment(s_labels, t_labels, S_EOS, T_EOS, skip_eos=skip_eos)
    got = uld_divergence(s_logits, t_logits, al, temperature=2.0)
    want = _brute_uld(s_logits, t_logits, s_labels, t_labels, 2.0, skip_eos)
    assert al.num_spans == (5 if skip_eos else 7) == len(want)
    assert got.dtype == torch.float64 and torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)


def _chain(logits, b, run, labels, tau):
    """log m(v) of a span (the chain rule): the earlier tokens' log-probs + the last position's distribution."""
    out = torch.log_softmax(logits[b, run[-1] - 1] / tau, -1)
    for j in run[:-1]:
        out = out + torch.log_softmax(logits[b, j - 1] / tau, -1)[labels[b, j]]
    return out


def _brute_gold(s_logits, t_logits, s_labels, t_labels, spans, tau, beta, w_m, w_u):
    shared = [(S_VOCAB[t], T_VOCAB[t]) for t in T_VOCAB if t in S_VOCAB]
    s_rest = [i for i in range(len(S_VOCAB)) if i not in {s for s, _ in shared}]
    t_rest = [i for i in range(len(T_VOCAB)) if i not in {t for _, t in shared}]
    values = []
    for b, s_run, t_run in spans:
        lq, lp = _chain(s_logits, b, s_run, s_labels, tau), _chain(t_logits, b, t_run, t_labels, tau)
        q = torch.stack([lq[s].exp() for s, _ in shared])
        p = torch.stack([lp[t].exp() for _, t in shared])
        m = beta * p + (1 - beta) * q
        jsd = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
        q_rest = lq[s_rest].exp().sort(descending=True).values
        p_rest = lp[t_rest].exp().sort(descending=True).values
        n = max(len(q_rest), len(p_rest))
        l1 = (torch.nn.functional.pad(q_rest, (0, n - len(q_rest)))
              - torch.nn.functional.pad(p_rest, (0, n - len(p_rest)))).abs().sum()
        values.append(w_m * jsd + w_u * l1)
    return torch.stack(values)


@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.2)])
def test_gold_equals_a_brute_force_loop_in_float64_value_and_gradient(weights):
    s_labels, t_labels, s_ends, t_ends, spans, s_logits, t_logits = _hand_batch()
    al = text_alignment(s_labels, s_ends, t_labels, t_ends, skip_eos=False)
    assert al.num_spans == len(spans)
    match = match_vocabularies(S_VOCAB, T_VOCAB, len(S_VOCAB), len(T_VOCAB))
    assert match.adaptive_weight == pytest.approx(5 / 9)  # a, b, c, d, <eos>
    w_m, w_u = weights
    x = s_logits.clone().requires_grad_()
    got = gold_divergence(x, t_logits, al, match, "jsd", 1.5, w_m, w_u, chunk_rows=2, beta=0.3)
    (g_got,) = torch.autograd.grad((got * torch.arange(1.0, 7.0, dtype=torch.float64)).sum(), x)
    y = s_logits.clone().requires_grad_()
    want = _brute_gold(y, t_logits, s_labels, t_labels, spans, 1.5, 0.3,
                       5 / 9 if w_m is None else w_m, 4 / 9 if w_u is None else w_u)
    (g_want,) = torch.autograd.grad((want * torch.arange(1.0, 7.0, dtype=torch.float64)).sum(), y)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(g_got, g_want, atol=1e-12)
    assert g_got[0, 1].abs().sum() > 0  # the prefix token of row 0's first span gets a gradient too


def test_gold_without_the_hybrid_split_is_uld_on_span_vectors():
    s_labels, t_labels, s_ends, t_ends, spans, s_logits, t_logits = _hand_batch()
    al = text_alignment(s_labels, s_ends, t_labels, t_ends, skip_eos=False)
    match = match_vocabularies(S_VOCAB, T_VOCAB, len(S_VOCAB), len(T_VOCAB))
    got = gold_divergence(s_logits, t_logits, al, match, "jsd", 1.2, hybrid=False)
    want = []
    for b, s_run, t_run in spans:
        q = _chain(s_logits, b, s_run, s_labels, 1.2).exp().sort(descending=True).values
        p = _chain(t_logits, b, t_run, t_labels, 1.2).exp().sort(descending=True).values
        want.append((torch.nn.functional.pad(q, (0, len(p) - len(q))) - p).abs().sum())
    assert torch.allclose(got, torch.stack(want), atol=1e-12)


def test_gradcheck():
    s_labels, t_labels, s_ends, t_ends, _, s_logits, t_logits = _hand_batch()
    p = torch.softmax(torch.randn(3, 9, dtype=torch.float64), -1).requires_grad_()
    q = torch.softmax(torch.randn(3, 6, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(sorted_l1, (q, p))
    pos = positional_alignment(s_labels, t_labels)
    text = text_alignment(s_labels, s_ends, t_labels, t_ends, skip_eos=False)
    match = match_vocabularies(S_VOCAB, T_VOCAB, len(S_VOCAB), len(T_VOCAB))
    # the losses as one autograd graph (`chunked=False`; the chunked backward consumes its gradient buffer, which
    # gradcheck's reentrancy probe cannot run twice) ...
    x = s_logits.clone().requires_grad_()
    w = torch.rand(7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: uld_divergence(z, t_logits, pos, 1.3, chunked=False) @ w, (x,),
                                    fast_mode=True)
    for name, params in (("jsd", {"beta": 0.4}), ("fkl", {}), ("rkl", {})):
        assert torch.autograd.gradcheck(
            lambda z: gold_divergence(z, t_logits, text, match, name, 0.8, chunked=False, **params) @ w[:6], (x,),
            fast_mode=True), name
    # ... and the chunked computation has the same values and gradients
    for fn in (lambda z, c: uld_divergence(z, t_logits, pos, 1.3, chunk_rows=3, chunked=c) @ w,
               lambda z, c: gold_divergence(z, t_logits, text, match, "jsd", 0.8, chunk_rows=2, chunked=c) @ w[:6]):
        got = [torch.autograd.grad(fn(y, c), y) + (fn(y, c).detach(),) for c in (True, False)
               for y in [s_logits.clone().requires_grad_()]]
        assert torch.allclose(got[0][1], got[1][1], atol=1e-12) and torch.allclose(got[0][0], got[1][0], atol=1e-12)


# ----------------------------------------------------------------------------------------------- methods
def _method(name: str, student_tok, teacher_tok, **fields):
    sc = student_config(name, **fields)
    method = get_method(name)(sc, sc.method_args)
    method.set_tokenizers(student_tok, teacher_tok)
    return method


def _loss(method, student, teacher, batch, num_items=None):
    n = batch["labels"][:, 1:].ne(IGNORE_INDEX).sum() if num_items is None else num_items
    return method.compute_loss(StepContext(student=student, batch=batch, num_items=n, teacher=teacher)).loss


def _pad(batch: dict[str, torch.Tensor], extra: int, s_pad: int, t_pad: int) -> dict[str, torch.Tensor]:
    """The batch with `extra` more padding columns on both sides."""
    fill = {"input_ids": s_pad, "teacher_input_ids": t_pad, "attention_mask": 0, "teacher_attention_mask": 0,
            "labels": IGNORE_INDEX, "teacher_labels": IGNORE_INDEX, "text_ends": NOT_TEXT, "teacher_text_ends": NOT_TEXT}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


@pytest.mark.parametrize("name", ["uld", "gold"])
def test_padding_and_gradient_accumulation_invariance(name):
    rows, tok_a, tok_b = two_tokenizers()
    student, teacher = tiny_lm(tok_a, 1), tiny_lm(tok_b, 2, hidden=48)
    method = _method(name, tok_a, tok_b, method_args={"ce_weight": 0.5})
    batch = paired_batch(tok_a, tok_b, rows[:6])
    full = _loss(method, student, teacher, batch)
    padded = _loss(method, student, teacher, _pad(batch, 5, tok_a.pad_token_id, tok_b.pad_token_id))
    assert torch.isfinite(full) and full > 0
    assert torch.allclose(full, padded, atol=1e-6)
    total = batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()
    halves = [{k: v[sl] for k, v in batch.items()} for sl in (slice(0, 2), slice(2, 6))]
    accumulated = sum(_loss(method, student, teacher, half, num_items=total) for half in halves)
    assert torch.allclose(full, accumulated, atol=1e-6)


@pytest.mark.parametrize("divergence,args", [("jsd", {"beta": 0.3}), ("fkl", {}), ("rkl", {})])
def test_gold_with_one_tokenizer_is_kd(divergence, args):
    """The strong check: one tokenizer on both sides makes every span one token and every token shared, so GOLD's
    loss and its gradient are kd's with the same divergence (different teacher and student models)."""
    rows, tok, _ = two_tokenizers()
    student, teacher = tiny_lm(tok, 1), tiny_lm(tok, 2, hidden=48)
    batch = paired_batch(tok, tok, rows[:6])
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    common = dict(divergence=divergence, divergence_args=args, temperature=1.7)
    gold = _method("gold", tok, tok, method_args={"skip_eos": False}, **common)
    kd = get_method("kd")(student_config("kd", fused_lm_head=False, **common), {})
    grads = []
    for method, b in ((gold, batch), (kd, plain)):
        student.zero_grad()
        loss = _loss(method, student, teacher, b)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (l_gold, g_gold), (l_kd, g_kd) = grads
    assert l_kd > 0 and torch.allclose(l_gold, l_kd, rtol=1e-5, atol=1e-7), (l_gold, l_kd)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_gold, g_kd))


def test_uld_of_a_student_equal_to_its_teacher_is_its_ce():
    rows, tok, _ = two_tokenizers()
    model = tiny_lm(tok, 1)
    batch = paired_batch(tok, tok, rows[:4], with_offsets=False)
    uld = _method("uld", tok, tok)
    ce_only = _method("uld", tok, tok, method_args={"uld_weight": 0.0})
    assert torch.allclose(_loss(uld, model, model, batch), _loss(ce_only, model, model, batch), atol=1e-6)


def test_methods_read_a_plain_batch_as_one_shared_tokenizer():
    """Without the teacher's keys (the method tests' batches) the teacher reads the student's tokens."""
    rows, tok, _ = two_tokenizers()
    student, teacher = tiny_lm(tok, 1), tiny_lm(tok, 2)
    batch = paired_batch(tok, tok, rows[:4])
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    for name in ("uld", "gold"):
        sc = student_config(name)
        method = get_method(name)(sc, sc.method_args)
        ctx = StepContext(student=student, batch=plain, num_items=plain["labels"][:, 1:].ne(IGNORE_INDEX).sum(),
                          teacher=teacher, tokenizer=tok)
        assert torch.allclose(method.compute_loss(ctx).loss, _loss(_method(name, tok, tok), student, teacher, batch),
                              atol=1e-6), name


# ----------------------------------------------------------------------------------------------- params
def test_validate_refuses_token_level_methods_across_tokenizers():
    params = tiny_params()
    params["teacher"]["model"]["tokenizer"] = "tokenizers/llama"
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    msg = str(err.value)
    assert "students.fkl.method: 'kd'" in msg and "teacher.model.tokenizer" in msg
    assert "gold, uld" in msg and "students.sft" not in msg  # sft has no teacher: fine
    params["students"]["fkl"].update(method="uld", divergence=None)
    cfg = parse_config(params)
    assert cfg.students["fkl"].method == "uld"
    same = tiny_params()  # the same tokenizer named on both sides is one tokenizer
    for body in (same["teacher"], same["students"]["fkl"]):
        body["model"] = {**body["model"], "tokenizer": "tokenizers/one"}
    parse_config(same)
    for bad, key in (({"from_teacher_layers": [0], "tokenizer": "t"}, "students.fkl.model.tokenizer"),):
        params = tiny_params()
        params["students"]["fkl"]["model"] = bad
        with pytest.raises(ConfigError, match=key):
            parse_config(params)
    params = tiny_params()
    params["students"]["fkl"].update(method="gold", divergence=None, alpha=0.3)
    with pytest.raises(ConfigError, match=r"students\.fkl\.alpha: .*ce_weight"):
        parse_config(params)


def test_a_student_checkpoint_of_another_family_keeps_its_tokenizer_without_a_teacher_distribution(tmp_path):
    """A student checkpoint with another tokenizer than the run's (the teacher's): `sft` and `seqkd` (text only) and
    `uld` / `gold` train with the checkpoint's own tokenizer; `kd` (token by token) gets the run's, which preflight
    then refuses; a model cut from the teacher gets the teacher's."""
    from kd_core.errors import ModelError
    from kd_core.run import RunPaths, load_student_tokenizer
    from kd_core.training.preflight import check_vocab_compatible

    rows, run_tok, _ = two_tokenizers()
    other_tok = train_bpe_tokenizer([(format_prompt(r, TEMPLATE) + r["response"]).upper()[::-1] for r in rows], 400)
    other = tiny_lm(other_tok, seed=0)
    other.save_pretrained(tmp_path / "other")
    other_tok.save_pretrained(tmp_path / "other")
    params = tiny_params(run_dir=str(tmp_path / "run"))
    ckpt = {"checkpoint": str(tmp_path / "other")}
    params["students"] = {"sft": {"method": "sft", "model": ckpt}, "seqkd": {"method": "seqkd", "model": ckpt},
                          "uld": {"method": "uld", "model": ckpt}, "fkl": {"method": "kd", "model": ckpt},
                          "cut": {"method": "kd", "model": {"from_teacher_layers": [0]}}}
    params["transfer_sets"] = {"gen": {"source": "teacher", "max_new_tokens": 4}}
    params["students"]["seqkd"]["train_data"] = "gen"
    cfg = parse_config(params)
    paths = RunPaths.of(cfg)
    run_tok.save_pretrained(str(paths.tokenizer))
    run_tok.save_pretrained(str(paths.model("teacher")))
    for name in ("sft", "seqkd", "uld"):
        tok = load_student_tokenizer(cfg, paths, cfg.students[name])
        assert tok.get_vocab() == other_tok.get_vocab(), name
        check_vocab_compatible(None, other, tok, cfg.students[name].model)  # what distill's preflight checks
    for name in ("fkl", "cut"):
        assert load_student_tokenizer(cfg, paths, cfg.students[name]).get_vocab() == run_tok.get_vocab(), name
    with pytest.raises(ModelError, match="another tokenizer than the run's"):
        check_vocab_compatible(tiny_lm(run_tok, seed=1), other, run_tok, cfg.students["fkl"].model)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_teacher_and_student_with_no_shared_tokenizer_through_the_stages(project):
    """A teacher built with its own tokenizer (BPE, 500 tokens) and students built on the run's (BPE, 300):
    prepare, train_teacher, transfer (the teacher generates with its tokenizer), distill (uld, gold, and seqkd on
    the teacher's text), finetune, evaluate (each model with its own tokenizer; no teacher-forced agreement
    across tokenizers)."""
    from kd_core.data.tokenize import encode_rows, load_tokenizer
    from kd_core.evaluation.run import validation_loss
    from kd_core.io import read_jsonl
    from kd_core.models.build import load_checkpoint
    from kd_core.run import RunPaths
    from kd_core.stages.distill import distill
    from kd_core.stages.evaluate import evaluate
    from kd_core.stages.finetune import finetune
    from kd_core.stages.prepare import prepare
    from kd_core.stages.train_teacher import train_teacher
    from kd_core.stages.transfer import transfer

    rows, _, _ = two_tokenizers()
    teacher_tok = train_bpe_tokenizer((format_prompt(r, TEMPLATE) + r["response"] for r in rows), 500)
    teacher_tok.save_pretrained(str(project / "teacher_tokenizer"))
    params = tiny_params()
    params["tokenizer"]["max_length"] = 64
    params["teacher"]["model"]["tokenizer"] = "teacher_tokenizer"
    params["evaluation"].update(sample_seeds=[0], exaccerr_prompts=4, exaccerr_lengths=[2])
    params["transfer_sets"] = {"gen": {"source": "teacher", "max_new_tokens": 6}}
    steps = dict(TINY_TRAINING, max_steps=3)
    params["students"] = {
        "uld": {"method": "uld", "model": TINY_MODEL, "training": steps, "finetune": {"enabled": True, "epochs": 0.1}},
        "gold": {"method": "gold", "model": TINY_MODEL, "training": steps, "method_args": {"ce_weight": 0.2}},
        "seqkd": {"method": "seqkd", "train_data": "gen", "model": TINY_MODEL, "training": steps},
    }
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    prepare(cfg, paths)
    train_teacher(cfg, paths)
    run_tok = load_tokenizer(paths.tokenizer)
    own = load_tokenizer(paths.model("teacher"))
    assert own.get_vocab() == teacher_tok.get_vocab() and len(own) == 500
    assert len(run_tok) == 300 and not set(own.get_vocab().items()) >= set(run_tok.get_vocab().items())
    teacher = load_checkpoint(paths.model("teacher"))
    assert teacher.get_output_embeddings().weight.shape[0] == 500
    transfer(cfg, paths, "gen")
    assert read_jsonl(paths.split("gen"))
    for name in cfg.chain_order():
        info = distill(cfg, paths, name)
        assert info["steps"] == 3 and math.isfinite(info["final_loss"]), name
        assert info["teacher_forward_passes"] > 0 or name == "seqkd", name
        finetune(cfg, paths, name)
        student = load_checkpoint(paths.model(name))
        assert student.get_output_embeddings().weight.shape[0] == 300, name
        assert load_tokenizer(paths.model(name)).get_vocab() == run_tok.get_vocab(), name
        metrics = evaluate(cfg, paths, name)
        assert math.isfinite(metrics["val/loss"]) and "test/rougeL_sampled_mean" in metrics, name
        assert "test/top1_agreement" not in metrics, name  # no token-by-token agreement across tokenizers
        val, _ = encode_rows(read_jsonl(paths.split("val")), run_tok, TEMPLATE, 64, "truncate")
        assert metrics["val/loss"] == pytest.approx(validation_loss(student, val, run_tok.pad_token_id), rel=1e-5)
        assert json.loads(paths.metrics(name).read_text())["val/loss"] == metrics["val/loss"]
    assert json.loads(paths.train_info("uld").read_text())["finetuned"] is True
    teacher_metrics = evaluate(cfg, paths, "teacher")  # the teacher with its own tokenizer
    val, _ = encode_rows(read_jsonl(paths.split("val")), teacher_tok, TEMPLATE, 64, "truncate")
    assert teacher_metrics["val/loss"] == pytest.approx(validation_loss(teacher, val, teacher_tok.pad_token_id),
                                                        rel=1e-5)
