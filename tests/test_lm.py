"""kd_core.models.lm (the model utilities) and evaluation.stats.paired_on_common_ids, on tiny hand-made models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kd_core.data.tokenize import IGNORE_INDEX, left_pad
from kd_core.evaluation.stats import paired_bootstrap, paired_on_common_ids
from kd_core.models.lm import (eval_mode, length_limit, max_positions, model_device, output_vocab_size, response_logprobs,
                        shared_vocab_size, target_logprobs)

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402


def tiny_gpt2(vocab_size: int = 40, n_positions: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=16, n_layer=1,
                                      n_head=2)).eval()


class Wrapper(torch.nn.Module):
    """A DDP-style wrapper: the model is `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_output_vocab_size_reads_the_output_layer_before_the_config():
    model = tiny_gpt2(vocab_size=40)
    model.resize_token_embeddings(48)  # padded rows: the logits have 48 entries
    model.config.vocab_size = 40  # a config that disagrees with the head
    assert output_vocab_size(model) == 48 == model(input_ids=torch.tensor([[1, 2]])).logits.shape[-1]
    assert output_vocab_size(Wrapper(model)) == 48
    assert output_vocab_size(SimpleNamespace(config=SimpleNamespace(vocab_size=30))) == 30  # no head: config
    assert output_vocab_size(torch.nn.Linear(2, 2)) is None
    assert shared_vocab_size(model, None, tiny_gpt2(vocab_size=44)) == 44
    assert shared_vocab_size(None) is None


def test_max_positions_and_length_limit():
    model = tiny_gpt2(n_positions=32)
    assert max_positions(model) == 32 and max_positions(Wrapper(model)) == 32  # GPT-2 maps the name
    both = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=20, n_positions=64))
    assert max_positions(both) == 20  # the transformers name first
    assert max_positions(SimpleNamespace(config=SimpleNamespace(n_positions=64))) == 64
    assert max_positions(torch.nn.Linear(2, 2)) is None
    assert length_limit(model, None, both) == 20 and length_limit(None) is None


def test_eval_mode_restores_modes_even_on_error():
    a, b = torch.nn.Linear(2, 2).train(), torch.nn.Linear(2, 2).eval()
    with pytest.raises(RuntimeError):
        with eval_mode(a, None, b):
            assert not a.training and not b.training
            raise RuntimeError
    assert a.training and not b.training
    assert model_device(a) == torch.device("cpu") and model_device(torch.nn.Identity()) == torch.device("cpu")


def test_response_logprobs_is_the_masked_teacher_forced_logprob():
    model = tiny_gpt2()
    ids = torch.tensor([[3, 4, 5, 6, 0], [7, 8, 9, 0, 0]])
    ig = IGNORE_INDEX
    labels = torch.tensor([[ig, ig, 5, 6, ig], [ig, 8, 9, ig, ig]])
    batch = {"input_ids": ids, "attention_mask": ids.ne(0).long(), "labels": labels}
    with torch.no_grad():
        lp, mask = response_logprobs(model, batch)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        expected = F.log_softmax(logits[b, t].float(), -1)[ids[b, t + 1]]
        torch.testing.assert_close(lp[b, t], expected)
    assert (lp[~mask] == 0).all()
    # the 2-D form gives the same values (and the training CE's numerics)
    flat = target_logprobs(logits[:, :-1][mask], labels[:, 1:][mask])
    torch.testing.assert_close(flat, lp[mask])


def test_left_pad_accepts_tuples_and_empty_prompts():
    ids, mask = left_pad([(5, 6), [], [7]], pad_token_id=1, width=3)
    assert ids.tolist() == [[1, 5, 6], [1, 1, 1], [1, 1, 7]] and mask.tolist() == [[0, 1, 1], [0, 0, 0], [0, 0, 1]]


def test_paired_on_common_ids_uses_the_shared_scored_ids_only():
    a = {"x": 1.0, "y": 2.0, "z": None, "w": 4.0}
    b = {"w": 5.0, "y": 2.5, "x": 3.0, "z": 1.0, "v": 9.0}
    res = paired_on_common_ids(a, b, seed=1)
    assert res == paired_bootstrap([1.0, 2.0, 4.0], [3.0, 2.5, 5.0], seed=1) and res["n"] == 3
    assert paired_on_common_ids({"x": 1.0}, {"x": 2.0}) is None
    assert paired_on_common_ids({"x": 1.0, "y": None}, {"x": 2.0, "y": 3.0}) is None
