"""Rebuilding a training micro-batch from generations (on-policy methods): prompts out of a right-padded
batch, rows of prompt + generation, collation in the `CausalCollator` layout. Registers no method."""

from __future__ import annotations

from typing import Sequence

import torch

from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.methods.rollouts import Generation

Row = tuple[list[int], list[int]]  # (input_ids, labels) of the real tokens of one sequence


def reference_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Response tokens of a batch as the trainer counts them: labels[:, 1:] != IGNORE_INDEX."""
    return int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())


def extract_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Prompt token ids of each row of a right-padded batch: the leading run of positions whose label is
    IGNORE_INDEX and whose attention mask is 1 (a row without any label is all prompt).

    Raises ValueError for a row with an empty prompt (e.g. a left-padded batch): generation needs a prefix.
    """
    ids, labels, mask = batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu()
    is_prompt = labels.eq(IGNORE_INDEX) & mask.bool()
    # length of the leading run of True: position of the first False (or the width)
    lengths = (~is_prompt).int().cumsum(-1).eq(0).sum(-1)
    prompts = []
    for i, n in enumerate(lengths.tolist()):
        if n == 0:
            raise ValueError(f"row {i} has no prompt tokens (batches must be right padded with a prompt first)")
        prompts.append(ids[i, :n].tolist())
    return prompts


def reference_rows(batch: dict[str, torch.Tensor]) -> list[Row]:
    """(input_ids, labels) of the real (attention mask 1) tokens of each row of a right-padded batch."""
    ids, labels, mask = batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu()
    lengths = mask.sum(-1).tolist()
    return [(ids[i, :n].tolist(), labels[i, :n].tolist()) for i, n in enumerate(lengths)]


def collate_rows(rows: Sequence[Row], pad_token_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) rows like `CausalCollator`: pad id / IGNORE_INDEX / attention 0 after."""
    width = max(1, max(len(r[0]) for r in rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        n = len(row_ids)
        if n:
            ids[i, :n] = torch.tensor(row_ids)
            labels[i, :n] = torch.tensor(row_labels)
            mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def generation_rows(gen: Generation, eos_token_id: int) -> list[Row]:
    """(input_ids, labels) rows: prompt + tokens (+ EOS if ended); labels on the tokens and the EOS only."""
    rows = []
    for prompt, tokens, ended in zip(gen.prompts, gen.tokens, gen.ended):
        response = list(tokens) + ([eos_token_id] if ended else [])
        rows.append((list(prompt) + response, [IGNORE_INDEX] * len(prompt) + response))
    return rows


def generation_batch(gen: Generation, eos_token_id: int, pad_token_id: int,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A right-padded training batch made of the generations (labels on generated tokens + EOS only)."""
    return collate_rows(generation_rows(gen, eos_token_id), pad_token_id, device)


def mixed_batch(batch: dict[str, torch.Tensor], gen: Generation, replace: Sequence[int], eos_token_id: int,
                pad_token_id: int) -> dict[str, torch.Tensor]:
    """The batch with the rows in `replace` (in that order, matching `gen`) swapped for the generations."""
    rows = reference_rows(batch)
    for row, generated in zip(replace, generation_rows(gen, eos_token_id)):
        rows[row] = generated
    return collate_rows(rows, pad_token_id, batch["input_ids"].device)
