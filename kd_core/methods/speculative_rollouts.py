"""Interleaved student/teacher sampling of Speculative KD (Xu et al., ICLR 2025, arXiv:2410.11325): the student
proposes each next token, the teacher keeps it when it is among the teacher's top-k at that position and otherwise
replaces it by a token sampled from the teacher. Registers no method (`speculative_kd.py` trains on the result)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd_core.data.tokenize import left_pad
from kd_core.models.lm import eval_mode, model_device, position_ids_from_mask
from kd_core.methods.rollouts import Generation, record_step


@dataclass
class Interleaved:
    generation: Generation
    proposed: int  # tokens the student proposed (EOS included)
    replaced: int  # of those, replaced by a teacher sample


def interleave_step(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int, temperature: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One position of every row: ``[B, V]`` next-token logits of both models (the shared vocabulary) ->
    (the chosen tokens ``[B]``, whether each was replaced ``[B]`` bool).

    y ~ softmax(student / T); kept if y is among the teacher's ``top_k`` logits (ties: ``torch.topk``'s order),
    else z ~ softmax(teacher / T) takes its place. Both draws are made for every row, y first (the RNG order is
    fixed)."""
    proposal = torch.multinomial(F.softmax(student_logits.float() / temperature, -1), 1, generator=generator)
    fallback = torch.multinomial(F.softmax(teacher_logits.float() / temperature, -1), 1, generator=generator)
    top = teacher_logits.topk(min(int(top_k), teacher_logits.shape[-1]), dim=-1).indices
    keep = top.eq(proposal).any(-1)
    return torch.where(keep, proposal.squeeze(-1), fallback.squeeze(-1)), ~keep


@torch.no_grad()
def interleaved_sample(student: torch.nn.Module, teacher: torch.nn.Module, prompts: list[list[int]], *, top_k: int,
                       max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
                       vocab_size: int | None = None, max_length: int | None = None,
                       generator: torch.Generator | None = None) -> Interleaved:
    """Continue each prompt by `interleave_step` until EOS, at most `max_new_tokens` tokens (EOS included) and never
    past `max_length` (as `rollouts.sample`: left padding, explicit positions, one KV cache per model, both models in
    eval mode under no_grad, only the first `vocab_size` tokens). The chosen token (kept or replaced) is what both
    models read next. The teacher samples at `temperature` too."""
    if not temperature > 0:
        raise ValueError(f"interleaved_sample: temperature must be > 0, got {temperature!r}")
    n_rows = len(prompts)
    width = max((len(p) for p in prompts), default=0)
    steps = max_new_tokens if max_length is None else min(max_new_tokens, max_length - width)
    tokens: list[list[int]] = [[] for _ in range(n_rows)]
    ended = [False] * n_rows
    proposed = replaced = 0
    if steps <= 0 or n_rows == 0:
        return Interleaved(Generation([list(p) for p in prompts], tokens, ended), 0, 0)
    ids, mask = left_pad(prompts, pad_token_id)
    device = model_device(student)
    ids, mask = ids.to(device), mask.to(device)
    step_ids, step_pos = ids, position_ids_from_mask(mask)
    caches: list = [None, None]
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    with eval_mode(student, teacher):
        for _ in range(steps):
            logits = []
            for k, model in enumerate((student, teacher)):
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                            past_key_values=caches[k], use_cache=True)
                caches[k] = out.past_key_values
                logits.append(out.logits[:, -1, :vocab_size] if vocab_size is not None else out.logits[:, -1])
            nxt, swapped = interleave_step(logits[0], logits[1], top_k, temperature, generator)
            proposed += int((~done).sum())
            replaced += int((swapped & ~done).sum())
            nxt, done = record_step(nxt, done, tokens, ended, eos_token_id, pad_token_id)
            if bool(done.all()):
                break
            step_ids, step_pos = nxt.unsqueeze(-1), step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return Interleaved(Generation([list(p) for p in prompts], tokens, ended), proposed, replaced)
