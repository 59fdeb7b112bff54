"""Batched generation shared by evaluation and on-policy methods: KV cache, left padding, stop at EOS; sampling
seeded per row."""

from __future__ import annotations

import hashlib
import time
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, TemperatureLogitsWarper, TopPLogitsWarper

from kd_core.data.tokenize import left_pad
from kd_core.progress import progress
from kd_core.models.lm import model_device


@dataclass
class Generations:
    token_ids: list[list[int]]  # new tokens only, cut after the first EOS (EOS excluded)
    texts: list[str]
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


# the shard pool of the stage running in this thread (kd_core/pipeline/cluster/shards.py: a stage on Ray), or None: `generate`
# and the teacher cache's `build_cache` share their batches out among its Ray workers
SHARDS: ContextVar = ContextVar("kd_shards", default=None)

STATIC_CACHE_BUCKET = 32  # prompt widths are padded to a multiple of this: one compiled decode graph per bucket


def new_tokens(model: PreTrainedModel, prompts: list[list[int]], *, max_new_tokens: int, eos_token_id: int,
               pad_token_id: int, static_cache: bool, max_length: int | None = None, logits_processor=None,
               **sampling) -> list[list[int]]:
    """`transformers`' `generate` on one left-padded batch: per prompt, its new token ids up to and
    including the first EOS (a row without EOS stopped at `max_new_tokens`).

    `static_cache`: a static KV cache, whose decode step `generate` compiles on a GPU (CUDA graphs;
    ~2.5x faster per token than the dynamic cache at GPT-2 sizes, docs/performance.md). Prompts are then
    left-padded to a multiple of `STATIC_CACHE_BUCKET` (at most `max_length - max_new_tokens`, the position
    limit) so batches of similar width reuse one compiled graph; positions come from the attention mask,
    so the extra padding changes nothing."""
    width = longest = max(len(p) for p in prompts)
    if static_cache:
        width = -(-longest // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
        if max_length is not None:
            width = max(longest, min(width, max_length - max_new_tokens))
    ids, mask = left_pad(prompts, pad_token_id, width=width)
    device = model_device(model)
    cache = dict(cache_implementation="static") if static_cache else {}
    seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
                          logits_processor=logits_processor, **cache, **sampling)
    rows = []
    for row in seqs[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return rows


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of row `row` of a generation with seed `seed`: 63 bits of blake2b("seed:row"), so that
    rows and seeds never share a random stream."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowSeededSampling(LogitsProcessor):
    """Sampling that gives each row its own random stream: greedy decoding of the scores plus Gumbel(0, 1) noise
    drawn from the row's generator (seeded with `row_seed`). argmax_v (s_v + G_v) with G_v i.i.d. Gumbel is a draw
    from softmax(s) (the Gumbel-max trick), so after the temperature and top-p warpers this is the usual sampling,
    while a row's tokens depend only on its seed and its own scores: not on which rows share its batch, how many
    batches or workers came before it, or the global RNG."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab, tiny = scores.shape[1], torch.finfo(torch.float32).tiny
        u = torch.stack([torch.rand(vocab, generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))
        return scores + gumbel.to(scores.dtype)


def sampling_processors(seed: int, rows: range, temperature: float, top_p: float, device) -> LogitsProcessorList:
    """Temperature, nucleus (top-p) and `RowSeededSampling` for the rows `rows` of a generation (top_k = 0: no
    top-k cut), to decode greedily."""
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(RowSeededSampling([row_seed(seed, r) for r in rows], device))
    return processors


@torch.inference_mode()
def generate_ids(model: PreTrainedModel, prompts: list[list[int]], *, max_new_tokens: int, eos_token_id: int,
                 pad_token_id: int, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 32, first_row: int = 0) -> list[list[int]]:
    """Per prompt, its new token ids (EOS cut off), in batches of `batch_size`. Prompt i is row `first_row + i` of
    the whole generation: its sampling seed is `row_seed(seed, first_row + i)` (`RowSeededSampling`), so a shard of
    the prompts cut on batch boundaries gives exactly the rows the whole run gives."""
    model.eval()
    static_cache = model_device(model).type == "cuda"
    out_ids: list[list[int]] = []
    with progress(len(prompts), "prompts") as bar:  # the stage's progress bar, on a terminal (kd_core.env)
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            processors = (sampling_processors(seed, range(first_row + i, first_row + i + len(batch)), temperature,
                                              top_p, model_device(model)) if do_sample else None)
            for row in new_tokens(model, batch, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                  pad_token_id=pad_token_id, static_cache=static_cache, logits_processor=processors,
                                  do_sample=False):
                out_ids.append(row[:-1] if row and row[-1] == eos_token_id else row)
                bar.update()
    return out_ids


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 32) -> Generations:
    """Generate for each prompt (token ids). Sampling is pure temperature / nucleus sampling (top_k = 0), seeded
    per row (`generate_ids`): the same seed and prompts give the same outputs, whatever the batching across
    workers. Inside a stage that runs on Ray (`execution`), the batches are shared out among the stage's workers
    (kd_core/pipeline/cluster/shards.py) and their rows merged in order: the same outputs. On a GPU the decode step runs on
    a static KV cache (`new_tokens`). A `model` that generates elsewhere, a teacher served by another process
    (:class:`~kd_core.teachers.served.ServedTeacher`, any object with a `generations` method), is asked for them
    with the same arguments."""
    elsewhere = getattr(model, "generations", None)
    if elsewhere is not None:
        return elsewhere(tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size)
    args = dict(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, do_sample=do_sample, temperature=temperature, top_p=top_p,
                seed=seed, batch_size=batch_size)
    start = time.perf_counter()
    shards = SHARDS.get()
    out_ids = shards.generate_ids(model, prompts, **args) if shards is not None else generate_ids(model, prompts,
                                                                                                   **args)
    seconds = time.perf_counter() - start
    texts = tokenizer.batch_decode(out_ids, skip_special_tokens=True)
    return Generations(out_ids, [t.strip() for t in texts], sum(len(r) for r in out_ids), seconds)
