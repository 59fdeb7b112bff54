"""Batched generation shared by evaluation and on-policy methods: KV cache, left padding, stop at EOS."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kd_core.data.tokenize import left_pad


@dataclass
class Generations:
    token_ids: list[list[int]]  # new tokens only, cut after the first EOS (EOS excluded)
    texts: list[str]
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 32) -> Generations:
    """Generate for each prompt (token ids). Sampling uses top_k=0 (pure temperature / nucleus sampling);
    the RNG is seeded once, so the same seed and prompts give the same outputs."""
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out_ids: list[list[int]] = []
    n_new, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i:i + batch_size], pad)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True, **kwargs)
        for row in seqs[:, ids.shape[1]:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            out_ids.append(row)
            n_new += len(row)
    seconds = time.perf_counter() - start
    texts = tokenizer.batch_decode(out_ids, skip_special_tokens=True)
    return Generations(out_ids, [t.strip() for t in texts], n_new, seconds)
