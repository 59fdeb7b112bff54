"""Shared pieces of the on-policy methods (`imitkd`, `gkd`, `minillm`, `distillm`); registers no method.

* `extract_prompts`: the prompt of each row of a right-padded training batch (the leading tokens whose label
  is IGNORE_INDEX and whose attention mask is 1).
* `sample`: continuations of prompts from a model or a mixture of models (Σ_i w_i · softmax(logits_i / τ)),
  batched, left-padded, with a KV cache per model, stopping at EOS, never past the models' position limit.
* `generation_batch` / `mixed_batch`: a new right-padded batch (prompt + generation + EOS when produced)
  whose labels cover the generated tokens (and the EOS) only, the same layout as the collator's.
* `token_mean_scaled`: the loss normaliser used when a micro-batch's responses are replaced (see below).

Normalisation when responses are replaced
-----------------------------------------
The trainer passes `num_items` = N, the reference response tokens of the whole accumulated batch, and the
method's micro-batch losses are summed. A micro-batch whose responses were replaced by generations
supervises n_gen tokens instead of its n_ref reference tokens. Its distillation term is

    (Σ_{supervised tokens} ℓ_t / n_gen) · (n_ref / N)      (= Σ ℓ_t / (n_gen · N / n_ref))

i.e. the token mean over the tokens it supervises, weighted by the micro-batch's share of the accumulated
batch's reference tokens. The shares add up to 1 over the accumulated batch, so the summed loss is a weighted
mean of token means whatever the generation lengths, micro-batch sizes or accumulation steps; when a
micro-batch keeps its references (n_gen = n_ref) the term is exactly Σ ℓ_t / N, the `kd` normalisation. A
micro-batch with no supervised token contributes 0 (its graph is kept so backward still works).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from kd_core.data.tokenize import IGNORE_INDEX, left_pad
from kd_core.generation import new_tokens
from kd_core.losses.chunked import chunked_token_divergence
from kd_core.losses.divergences import masked_token_sum_and_count, reduce_tokens
from kd_core.methods.base import (LossOutput, Method, mix_with_ce, model_logits, prediction_positions, shifted,
                                  teacher_logits, token_ce)

__all__ = [
    "Generation",
    "eval_mode",
    "extract_prompts",
    "reference_rows",
    "collate_rows",
    "generation_rows",
    "generation_batch",
    "mixed_batch",
    "sample",
    "model_vocab_size",
    "max_positions",
    "length_limit",
    "shared_vocab_size",
    "reference_token_count",
    "token_mean_scaled",
    "count_generation",
    "method_divergence",
    "model_logits",
    "teacher_logits",
    "DistillResult",
    "distill_on_batch",
    "generation_settings",
]


# ----------------------------------------------------------------------------------------------- batches
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


def reference_rows(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the real (attention mask 1) tokens of each row of a right-padded batch."""
    ids, labels, mask = batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu()
    lengths = mask.sum(-1).tolist()
    return [(ids[i, :n].tolist(), labels[i, :n].tolist()) for i, n in enumerate(lengths)]


def collate_rows(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
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


@dataclass
class Generation:
    """Continuations of `prompts`: `tokens[i]` excludes the EOS; `ended[i]` says whether EOS was produced
    (then it is appended to the sequence and supervised, like the reference's EOS)."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    ended: list[bool]

    @property
    def num_tokens(self) -> int:
        """Generated tokens, EOS included."""
        return sum(len(t) + int(e) for t, e in zip(self.tokens, self.ended))

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: Sequence[int]) -> Generation:
        return Generation([self.prompts[i] for i in idx], [self.tokens[i] for i in idx], [self.ended[i] for i in idx])

    def items(self) -> list[tuple[list[int], list[int], bool]]:
        return list(zip(self.prompts, self.tokens, self.ended))

    @classmethod
    def from_items(cls, items: Sequence[tuple[list[int], list[int], bool]]) -> Generation:
        return cls([list(p) for p, _, _ in items], [list(t) for _, t, _ in items], [bool(e) for _, _, e in items])


def generation_rows(gen: Generation, eos_token_id: int) -> list[tuple[list[int], list[int]]]:
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


# ----------------------------------------------------------------------------------------------- models
@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put the models in eval mode, restore each one's previous mode afterwards (even on error)."""
    modes = [(m, m.training) for m in models if m is not None]
    try:
        for m, _ in modes:
            m.eval()
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)


def _config(model: torch.nn.Module):
    return getattr(getattr(model, "module", model), "config", None)


def model_vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the output layer (what the logits' last dimension will be), else config.vocab_size."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    cfg = _config(model)
    return getattr(cfg, "vocab_size", None)


def shared_vocab_size(*models: torch.nn.Module | None) -> int | None:
    """min over the models' vocabularies (as `shared_vocab` slices logits); None when unknown."""
    sizes = [model_vocab_size(m) for m in models if m is not None]
    sizes = [s for s in sizes if s]
    return min(sizes) if sizes else None


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's position limit (n_positions / max_position_embeddings), None when it has none."""
    cfg = _config(model)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def length_limit(*models: torch.nn.Module | None) -> int | None:
    """The longest sequence every given model accepts."""
    limits = [max_positions(m) for m in models if m is not None]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _FirstTokens:
    """Logits processor: only the first `n` token ids can be sampled (the vocabulary shared by the models)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, torch.arange(self.n, scores.shape[-1], device=scores.device), float("-inf"))


def _sample_static_cache(model: torch.nn.Module, prompts: list[list[int]], steps: int, *, eos_token_id: int,
                         pad_token_id: int, temperature: float, greedy: bool, vocab_size: int | None,
                         max_length: int | None) -> Generation:
    """`sample` from one model with `transformers`' `generate` on a static KV cache (`new_tokens`): on a
    GPU its decode step is compiled, ~2.4x faster per token than the loop below at GPT-2 sizes."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([_FirstTokens(vocab_size)] if vocab_size is not None else [])
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    with eval_mode(model):
        rows = new_tokens(model, prompts, max_new_tokens=steps, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                          static_cache=True, max_length=max_length, logits_processor=processors, **sampling)
    ended = [bool(row) and row[-1] == eos_token_id for row in rows]
    tokens = [row[:-1] if end else row for row, end in zip(rows, ended)]
    return Generation([list(p) for p in prompts], tokens, ended)


@torch.no_grad()
def sample(mixture: Sequence[tuple[torch.nn.Module, float]], prompts: list[list[int]], *, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, temperature: float = 1.0, greedy: bool = False,
           vocab_size: int | None = None, max_length: int | None = None,
           generator: torch.Generator | None = None, static_cache: bool | None = None) -> Generation:
    """Sample a continuation of each prompt from Σ_i w_i · softmax(logits_i / temperature) (weights
    normalised; a single (model, 1.0) is plain sampling from that model).

    Batched with left padding (explicit position ids), one KV cache per model, every model in eval mode
    under no_grad (each model's train/eval mode is restored afterwards). A row stops at its first EOS; the
    batch stops when every row has. Sampling is over the first `vocab_size` tokens (the vocabulary shared
    by student and teacher; padded embedding rows are never sampled). At most `max_new_tokens` tokens,
    EOS included, and never more than `max_length - longest prompt` (the position limit), which may be 0:
    then every generation is empty. `greedy` takes the argmax of the mixture instead of sampling.

    `static_cache` (default: on a GPU, for a single model without `generator`) decodes with
    `_sample_static_cache` instead of the loop below; mixtures always use the loop.
    """
    mixture = [(m, float(w)) for m, w in mixture if w > 0]
    if not mixture:
        raise ValueError("sample: the mixture has no model with a positive weight")
    if not temperature > 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature!r}")
    total = sum(w for _, w in mixture)
    log_w = [math.log(w / total) for _, w in mixture]
    n_rows = len(prompts)
    width = max((len(p) for p in prompts), default=0)
    steps = max_new_tokens if max_length is None else min(max_new_tokens, max_length - width)
    tokens: list[list[int]] = [[] for _ in range(n_rows)]
    ended = [False] * n_rows
    if steps <= 0 or n_rows == 0:
        return Generation([list(p) for p in prompts], tokens, ended)

    device = _device(mixture[0][0])
    if static_cache is None:
        static_cache = (device.type == "cuda" and len(mixture) == 1 and generator is None
                        and hasattr(mixture[0][0], "generate"))  # (a DDP wrapper has no `generate`)
    if static_cache:
        if len(mixture) != 1 or generator is not None:
            raise ValueError("sample: static_cache needs a single model and no generator")
        return _sample_static_cache(mixture[0][0], prompts, steps, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id, temperature=temperature, greedy=greedy,
                                    vocab_size=vocab_size, max_length=max_length)
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    caches: list = [None] * len(mixture)
    step_ids, step_pos = ids, positions
    with eval_mode(*[m for m, _ in mixture]):
        for _ in range(steps):
            mix = None
            for k, (model, _) in enumerate(mixture):
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                            past_key_values=caches[k], use_cache=True)
                caches[k] = out.past_key_values
                logits = out.logits[:, -1].float()
                if vocab_size is not None:
                    logits = logits[:, :vocab_size]
                lp = F.log_softmax(logits / temperature, dim=-1) + log_w[k]
                mix = lp if mix is None else torch.logaddexp(mix, lp)
            if greedy:
                nxt = mix.argmax(-1)
            else:
                nxt = torch.multinomial(mix.exp(), 1, generator=generator).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            was_done = done.tolist()
            for i, tok in enumerate(nxt.tolist()):
                if was_done[i]:
                    continue
                if tok == eos_token_id:
                    ended[i] = True
                else:
                    tokens[i].append(tok)
            done = done | (nxt.eq(eos_token_id) & ~done)
            if bool(done.all()):
                break
            step_ids = nxt.unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return Generation([list(p) for p in prompts], tokens, ended)


# ----------------------------------------------------------------------------------------------- losses
def token_mean_scaled(per_token: torch.Tensor, mask: torch.Tensor, n_ref: int | torch.Tensor,
                      num_items: int | torch.Tensor) -> torch.Tensor:
    """Σ_mask per_token / (n_tokens · num_items / n_ref): the micro-batch's token mean weighted by its
    share n_ref / num_items of the accumulated batch's reference tokens (module docstring). 0 (with a
    graph) when the mask is empty or n_ref is 0; equals `reduce_tokens(per_token, mask, num_items)` when
    the mask has exactly n_ref tokens."""
    total, count = masked_token_sum_and_count(per_token, mask)
    n_ref_t = torch.as_tensor(n_ref, dtype=total.dtype, device=total.device)
    n_items = torch.as_tensor(num_items, dtype=total.dtype, device=total.device).clamp_min(1.0)
    if float(count) == 0 or float(n_ref_t) == 0:
        return total * 0.0
    return total / (count * n_items / n_ref_t)


def count_generation(ctx, gen: Generation, teacher_generated: bool = False) -> None:
    """Add the generated tokens to the trainer's cost counter (and the sequences to the teacher's forward
    passes when the teacher took part in sampling); no-op without a trainer."""
    trainer = getattr(ctx, "trainer", None)
    if trainer is None:
        return
    trainer.generated_tokens = getattr(trainer, "generated_tokens", 0) + gen.num_tokens
    if teacher_generated:
        trainer.teacher_forward_passes = getattr(trainer, "teacher_forward_passes", 0) + len(gen)


# ----------------------------------------------------------------------------------------------- shared loss
def method_divergence(cfg) -> tuple[str, dict]:
    """The divergence a method uses: the config's (which holds the method's `default_divergence` when
    params name none, see `StudentConfig`)."""
    return cfg.divergence, dict(cfg.divergence_args)


@dataclass
class DistillResult:
    out: LossOutput
    reference_ce: float | None  # token-mean CE of the student on the references, when it was computed


def distill_on_batch(ctx, cfg, new_batch: dict[str, torch.Tensor], *, replaced: bool, divergence: str,
                     divergence_args: dict, want_reference_ce: bool = False) -> DistillResult:
    """α · CE(references) + (1 − α) · D(p_T || q_S) on the label positions of `new_batch`.

    `replaced`: new_batch is not ctx.batch (some responses are generations); the D term then uses the
    `token_mean_scaled` normalisation and the CE needs its own student forward on the references. When
    `new_batch` is the reference batch this is exactly the `kd` method's loss. `want_reference_ce`: also
    return the student's CE on the references when it comes free (from a forward on the references).
    """
    logits = model_logits(ctx.student, new_batch)
    s_logits, targets, mask = shifted(logits, new_batch["labels"])
    positions = prediction_positions(mask)  # per supervised position, in chunks, as the `kd` method
    div = chunked_token_divergence(logits, teacher_logits(ctx.teacher, new_batch), positions, divergence,
                                   temperature=cfg.temperature, **divergence_args)
    n_ref = reference_token_count(ctx.batch)
    kd = token_mean_scaled(div, positions, n_ref, ctx.num_items)
    logs = {"kd": float(reduce_tokens(div.detach(), positions)), "supervised_tokens": float(mask.sum())}
    if cfg.alpha > 0:
        if replaced:
            r_logits, r_targets, r_mask = shifted(model_logits(ctx.student, ctx.batch), ctx.batch["labels"])
        else:
            r_logits, r_targets, r_mask = s_logits, targets, mask
        out = mix_with_ce(cfg, kd, logs, r_logits, r_targets, r_mask, ctx.num_items)
        return DistillResult(out, out.logs["ce"])
    ref_ce = None
    if want_reference_ce and not replaced:
        with torch.no_grad():
            ref_ce = float(reduce_tokens(token_ce(s_logits.detach(), targets), mask))
    return DistillResult(LossOutput(kd, logs), ref_ce)


class OnPolicyMethod(Method):
    """A method whose micro-batch may be rebuilt from generations (`make_batch`) before the teacher
    supervises it with the configured divergence (`distill_on_batch`)."""

    def make_batch(self, ctx) -> tuple[dict[str, torch.Tensor], bool, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError

    def compute_loss(self, ctx) -> LossOutput:
        name, params = method_divergence(self.cfg)
        batch, replaced, logs = self.make_batch(ctx)
        res = distill_on_batch(ctx, self.cfg, batch, replaced=replaced, divergence=name, divergence_args=params)
        res.out.logs.update(logs)
        return res.out


def generation_settings(ctx, args) -> dict:
    """Keyword arguments of `sample` from a method's args (max_new_tokens, gen_temperature) and the models."""
    tok = ctx.tokenizer
    if tok is None or tok.eos_token_id is None:
        raise ValueError("on-policy methods need the tokenizer (eos and pad ids) in the step context")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return dict(max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                temperature=args.gen_temperature, vocab_size=shared_vocab_size(ctx.student, ctx.teacher),
                max_length=length_limit(ctx.student, ctx.teacher))
