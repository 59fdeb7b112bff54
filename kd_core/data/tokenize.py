"""Tokenizer and tensors: one tokenizer for the whole run, response-only labels, padding-aware collation.

Models built from a config get a byte-level BPE trained locally on the train split with `tokenizers`;
checkpoints bring their own tokenizer, which the prepare stage copies into the run folder so that every
stage (and every student) uses the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from kd_core.data.template import format_prompt

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IGNORE_INDEX = -100
EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # one token per digit: arithmetic and sorting become learnable per digit instead of per number
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # model_max_length is left unbounded: encode_example truncates per tokenizer.max_length itself
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The run's tokenizer folder, or a checkpoint's (path or hub name, optionally inside a GGUF file)."""
    from transformers import AutoTokenizer  # (imports torch: not at module level, see EncodedDataset)

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    if tok.pad_token is None:  # many causal LMs ship without one; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens


def encode_example(row: dict, tokenizer: PreTrainedTokenizerBase, template: str, max_length: int,
                   overlong: str = "truncate", loss_on_prompt: bool = False) -> EncodedExample | None:
    """Prompt + response + EOS; labels cover the response and EOS (and the prompt if `loss_on_prompt`).

    Returns None when the example has no response token left within max_length (or is over-long and
    overlong == "drop"): callers count these.
    """
    prompt_ids = tokenizer(format_prompt(row, template))["input_ids"]
    response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    if len(ids) > max_length:
        if overlong == "drop" or len(prompt_ids) >= max_length:
            return None
        ids = ids[:max_length]
    labels = list(ids) if loss_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    return EncodedExample(ids, labels)


def encode_prompt(row: dict, tokenizer: PreTrainedTokenizerBase, template: str, max_prompt_length: int) -> list[int]:
    """Prompt ids for generation, keeping the end (where the response starts) when too long."""
    ids = tokenizer(format_prompt(row, template))["input_ids"]
    return ids[-max_prompt_length:]


class EncodedDataset:
    """A map-style data set of encoded examples ({input_ids, labels} lists; torch's DataLoader and the Trainer take
    it as is): no torch needed to build it, so the prepare stage does not import torch. `rows`: for each example,
    the index of the row it was encoded from (:func:`encode_rows`; None when not known)."""

    def __init__(self, examples: list[EncodedExample], rows: list[int] | None = None):
        self.examples = examples
        self.rows = rows

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


def encode_rows(rows: list[dict], tokenizer, template: str, max_length: int, overlong: str,
                loss_on_prompt: bool = False) -> tuple[EncodedDataset, int]:
    """The encoded data set (each example with the index of its row) and the number of rows dropped for length."""
    examples = [encode_example(r, tokenizer, template, max_length, overlong, loss_on_prompt) for r in rows]
    kept = [i for i, e in enumerate(examples) if e is not None]
    return EncodedDataset([examples[i] for i in kept], kept), len(examples) - len(kept)


@dataclass
class CausalCollator:
    """Right-pads a list of {input_ids, labels} to the longest in the batch.

    Output: input_ids [B,T] (pad id), attention_mask [B,T] (1 = real token), labels [B,T] (IGNORE_INDEX on
    prompt and padding). Position t's logits predict input_ids[t+1], so losses compare logits[:, :-1]
    with labels[:, 1:].
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(dataset, pad_token_id: int, batch_size: int):
    """Collated batches of a data set in order (evaluation and scoring; training uses the Trainer's loader)."""
    collate = CausalCollator(pad_token_id)
    for i in range(0, len(dataset), batch_size):
        yield collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch for generation: (input_ids [B,T], attention_mask [B,T]), int64; T is the
    longest prompt, or `width` (at least that). Padding is `pad_token_id` with attention 0, before the prompt."""
    import torch

    width = max(max(len(p) for p in prompts), width or 0)
    ids = torch.full((len(prompts), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask
