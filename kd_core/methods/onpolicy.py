"""The on-policy method base (`imitkd`, `gkd`, `minillm`, `distillm`): a micro-batch is rebuilt from
generations (`make_batch`), then supervised by the teacher on its label positions (`distill_on_batch`),
normalised by `token_mean_scaled`. Registers no method; see docs/methods_onpolicy.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_core.models.lm import length_limit, shared_vocab_size
from kd_core.losses.tokens import masked_token_sum_and_count, reduce_tokens
from kd_core.methods.base import (LossOutput, Method, StepContext, fused_head_inputs, fused_reference_ce, mix_with_ce,
                                  mix_with_fused_ce, model_logits, prediction_positions, response_positions, shifted,
                                  token_ce)
from kd_core.methods.batches import reference_token_count

Batch = dict[str, torch.Tensor]


def token_mean_scaled(per_token: torch.Tensor, mask: torch.Tensor, n_ref: int | torch.Tensor,
                      num_items: int | torch.Tensor) -> torch.Tensor:
    """The loss of a micro-batch whose responses were (partly) replaced by generations:

        Σ_mask ℓ_t / (n_gen · N / n_ref)  =  (token mean over the n_gen supervised tokens) · (n_ref / N)

    with N = `num_items` (reference tokens of the accumulated batch) and n_ref this micro-batch's reference
    tokens: its token mean weighted by its share of the accumulated batch, the shares summing to 1. It equals
    `reduce_tokens(per_token, mask, num_items)` (= Σ ℓ_t / N, the `kd` normalisation) when the mask has
    exactly n_ref tokens; 0 (with a graph, so backward works) when the mask is empty or n_ref is 0.
    """
    total, count = masked_token_sum_and_count(per_token, mask)
    n_ref_t = torch.as_tensor(n_ref, dtype=total.dtype, device=total.device)
    n_items = torch.as_tensor(num_items, dtype=total.dtype, device=total.device).clamp_min(1.0)
    if float(count) == 0 or float(n_ref_t) == 0:
        return total * 0.0
    return total / (count * n_items / n_ref_t)


def method_divergence(student_cfg) -> tuple[str, dict]:
    """(name, params) of the divergence a method uses: the student config's, which holds the method's
    `default_divergence` when params name none (see `StudentConfig`)."""
    return student_cfg.divergence, dict(student_cfg.divergence_args)


@dataclass
class DistillResult:
    out: LossOutput
    reference_ce: float | None  # token-mean CE of the student on the references, when it was computed


def distill_on_batch(ctx: StepContext, student_cfg, new_batch: Batch, *, replaced: bool, divergence: str,
                     divergence_args: dict, want_reference_ce: bool = False) -> DistillResult:
    """α · CE(references) + (1 − α) · D(p_T || q_S) on the label positions of `new_batch` (p = teacher,
    q = student, at the config's temperature; α = `alpha`).

    `replaced`: new_batch is not ctx.batch (some responses are generations); the D term then uses the
    `token_mean_scaled` normalisation and the CE needs its own student forward on the references. When
    `new_batch` is the reference batch this is exactly the `kd` method's loss. `want_reference_ce`: also
    return the student's CE on the references when it comes free (from a forward on the references).
    With `fused_lm_head` both terms come from the models' last hidden states and LM heads (`_fused_distill`).
    """
    student = fused_head_inputs(student_cfg, ctx.student, new_batch)
    if student is not None:
        return _fused_distill(ctx, student_cfg, new_batch, student, replaced=replaced, divergence=divergence,
                              divergence_args=divergence_args, want_reference_ce=want_reference_ce)
    logits = model_logits(ctx.student, new_batch)
    s_logits, targets, mask = shifted(logits, new_batch["labels"])
    positions = prediction_positions(mask)  # per supervised position, in chunks, as the `kd` method
    div = ctx.signal_for(new_batch).divergence(logits, positions, divergence, temperature=student_cfg.temperature,
                                               **divergence_args)
    n_ref = reference_token_count(ctx.batch)
    kd = token_mean_scaled(div, positions, n_ref, ctx.num_items)
    logs = {"kd": float(reduce_tokens(div.detach(), positions)), "supervised_tokens": float(mask.sum())}
    if student_cfg.alpha > 0:
        if replaced:
            r_logits, r_targets, r_mask = shifted(model_logits(ctx.student, ctx.batch), ctx.batch["labels"])
        else:
            r_logits, r_targets, r_mask = s_logits, targets, mask
        out = mix_with_ce(student_cfg, kd, logs, r_logits, r_targets, r_mask, ctx.num_items)
        return DistillResult(out, out.logs["ce"])
    ref_ce = None
    if want_reference_ce and not replaced:
        with torch.no_grad():
            ref_ce = float(reduce_tokens(token_ce(s_logits.detach(), targets), mask))
    return DistillResult(LossOutput(kd, logs), ref_ce)


def _fused_distill(ctx: StepContext, student_cfg, new_batch: Batch, student, *, replaced: bool, divergence: str,
                   divergence_args: dict, want_reference_ce: bool) -> DistillResult:
    """`distill_on_batch` from the student's hidden states and head (`kd_core.losses.fused`): the same loss."""
    positions = response_positions(new_batch["labels"])
    div = ctx.signal_for(new_batch).fused_divergence(student, positions, divergence,
                                                     temperature=student_cfg.temperature, **divergence_args)
    kd = token_mean_scaled(div, positions, reference_token_count(ctx.batch), ctx.num_items)
    logs = {"kd": float(reduce_tokens(div.detach(), positions)), "supervised_tokens": float(positions.sum())}
    if student_cfg.alpha > 0:  # (the reference batch's head inputs exist: the same model gave them above)
        reference = fused_head_inputs(student_cfg, ctx.student, ctx.batch) if replaced else student
        out = mix_with_fused_ce(student_cfg, kd, logs, reference, ctx.batch["labels"], ctx.num_items)
        return DistillResult(out, out.logs["ce"])
    ref_ce = None
    if want_reference_ce and not replaced:
        with torch.no_grad():
            ce, ce_positions = fused_reference_ce(student, new_batch["labels"])
            ref_ce = float(reduce_tokens(ce, ce_positions))
    return DistillResult(LossOutput(kd, logs), ref_ce)


def generation_settings(ctx: StepContext, args) -> dict:
    """Keyword arguments of `rollouts.sample` from a method's args (max_new_tokens, gen_temperature), the
    tokenizer (eos, pad = eos when unset) and the models (shared vocabulary, position limit)."""
    tok = ctx.tokenizer
    if tok is None or tok.eos_token_id is None:
        raise ValueError("on-policy methods need the tokenizer (eos and pad ids) in the step context")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return dict(max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                temperature=args.gen_temperature, vocab_size=shared_vocab_size(ctx.student, ctx.teacher),
                max_length=length_limit(ctx.student, ctx.teacher))


class OnPolicyMethod(Method):
    """A method whose micro-batch may be rebuilt from generations (`make_batch`) before the teacher
    supervises it with the configured divergence (`distill_on_batch`)."""

    @property
    def effective_divergence(self) -> tuple[str, dict]:
        """(name, params) of the divergence used (`method_divergence` of the student config)."""
        return method_divergence(self.cfg)

    def make_batch(self, ctx: StepContext) -> tuple[Batch, bool, dict[str, float]]:  # pragma: no cover
        """(the micro-batch the loss is computed on, whether its responses were replaced, logs)."""
        raise NotImplementedError

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        name, params = self.effective_divergence
        batch, replaced, logs = self.make_batch(ctx)
        res = distill_on_batch(ctx, self.cfg, batch, replaced=replaced, divergence=name, divergence_args=params)
        res.out.logs.update(logs)
        return res.out
