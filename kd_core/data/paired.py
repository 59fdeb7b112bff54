"""One training set under two tokenizers (cross-tokenizer distillation: `uld`, `gold`): each row is encoded as
`encode_example` does, once with the student's tokenizer and once with the teacher's, so that each model reads
the same text (prompt + response + its own EOS) through its own tokenizer, its own truncation at
`tokenizer.max_length` included. A row either side cannot encode is dropped on both.

With `with_offsets` (GOLD's text alignment) each side also gets `text_ends`: for every response token the end of
its text in the response, in UTF-8 bytes (`token_ends`), `NOT_TEXT` (-1) on the prompt, the EOS and padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from kd_core.data.template import format_prompt
from kd_core.data.tokenize import CausalCollator, encode_example
from kd_core.errors import DataError

NOT_TEXT = -1  # (= kd_core.losses.alignment.NOT_TEXT)
TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "teacher_text_ends")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) writes bytes as, one character per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return frozenset(chr(c) for c in printable) | frozenset(chr(256 + i) for i in range(len(others)))


def token_ends(text: str, offsets: list[tuple[int, int]], pieces: list[str]) -> list[int]:
    """The end of each token in `text`, in UTF-8 bytes, from a fast tokenizer's character offsets (`offsets`) and
    token strings (`pieces`), non-decreasing.

    Byte-level tokens that split one multi-byte character all carry that character's span; such a run is split
    by the tokens' byte lengths when they are byte-level pieces whose lengths add up to the span (TRL GOLD's
    `_split_repeated_byte_offsets`), else the run keeps one end (the alignment then keeps it in one span)."""
    to_byte = [0]
    for ch in text:
        to_byte.append(to_byte[-1] + len(ch.encode("utf-8")))
    spans = [(to_byte[s], to_byte[e]) for s, e in offsets]
    alphabet = _byte_level_alphabet()
    i = 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and spans[j] == spans[i]:
            j += 1
        if j - i > 1 and all(set(p) <= alphabet for p in pieces[i:j]):
            start, end = spans[i]
            lengths = [len(p) for p in pieces[i:j]]
            if sum(lengths) == end - start:
                for k, n in enumerate(lengths, start=i):
                    spans[k] = (start, start + n)
                    start += n
        i = j
    ends, top = [], 0
    for _, e in spans:
        top = max(top, e)
        ends.append(top)
    return ends


def _encode_side(row: dict, tok, template: str, max_length: int, overlong: str, loss_on_prompt: bool,
                 with_offsets: bool) -> tuple[list[int], list[int], list[int] | None] | None:
    ex = encode_example(row, tok, template, max_length, overlong, loss_on_prompt)
    if ex is None:
        return None
    if not with_offsets:
        return ex.input_ids, ex.labels, None
    n_prompt = len(tok(format_prompt(row, template))["input_ids"])
    try:
        enc = tok(row["response"], add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(f"{type(tok).__name__}: gold aligns tokens by their character offsets, which only a fast "
                        f"tokenizer gives (use uld, which aligns by position)") from None
    ids = enc["input_ids"]
    if ex.input_ids[n_prompt:n_prompt + len(ids)] != ids[:len(ex.input_ids) - n_prompt]:
        raise DataError(f"{type(tok).__name__}: the response tokens with offsets differ from the encoded example's")
    ends = token_ends(row["response"], enc["offset_mapping"], tok.convert_ids_to_tokens(ids))
    text_ends = [NOT_TEXT] * len(ex.input_ids)
    for k, end in enumerate(ends[:len(ex.input_ids) - n_prompt]):
        text_ends[n_prompt + k] = end
    return ex.input_ids, ex.labels, text_ends


class PairedDataset(torch.utils.data.Dataset):
    """Rows encoded under both tokenizers: dicts with input_ids / labels (student), teacher_input_ids /
    teacher_labels, and with offsets text_ends / teacher_text_ends."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def encode_paired_rows(rows: list[dict], student_tokenizer, teacher_tokenizer, template: str, max_length: int,
                       overlong: str, loss_on_prompt: bool = False, with_offsets: bool = False
                       ) -> tuple[PairedDataset, int]:
    """The paired data set and the number of rows dropped (either side overlong under `overlong`, or without a
    response token left within `max_length`)."""
    items = []
    for row in rows:
        s = _encode_side(row, student_tokenizer, template, max_length, overlong, loss_on_prompt, with_offsets)
        t = _encode_side(row, teacher_tokenizer, template, max_length, overlong, loss_on_prompt, with_offsets)
        if s is None or t is None:
            continue
        item = {"input_ids": s[0], "labels": s[1], "teacher_input_ids": t[0], "teacher_labels": t[1]}
        if with_offsets:
            item.update(text_ends=s[2], teacher_text_ends=t[2])
        items.append(item)
    return PairedDataset(items), len(rows) - len(items)


@dataclass
class PairedCollator:
    """Right-pads both sides like `CausalCollator`: input_ids / attention_mask / labels [B, T_s] and
    teacher_input_ids / teacher_attention_mask / teacher_labels [B, T_t] (each side's own pad id), plus
    text_ends [B, T_s] / teacher_text_ends [B, T_t] (NOT_TEXT on padding) when the items have them."""

    pad_token_id: int
    teacher_pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        out = CausalCollator(self.pad_token_id)([{"input_ids": f["input_ids"], "labels": f["labels"]}
                                                 for f in features])
        teacher = CausalCollator(self.teacher_pad_token_id)(
            [{"input_ids": f["teacher_input_ids"], "labels": f["teacher_labels"]} for f in features])
        out |= {f"teacher_{k}": v for k, v in teacher.items()}
        if "text_ends" in features[0]:
            for key, width in (("text_ends", out["input_ids"].shape[1]),
                               ("teacher_text_ends", teacher["input_ids"].shape[1])):
                ends = torch.full((len(features), width), NOT_TEXT, dtype=torch.long)
                for i, f in enumerate(features):
                    ends[i, :len(f[key])] = torch.tensor(f[key], dtype=torch.long)
                out[key] = ends
        return out
