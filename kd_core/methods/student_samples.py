"""The base of the methods that train on the student's own samples scored by the teacher (`sampled_rkl`,
`entropy_aware_opd`): every response of the micro-batch is replaced by a student sample of its prompt (at
`gen_temperature`), the method's per-token objective ℓ_t is taken on the sampled tokens (EOS included) and
normalised by `onpolicy.token_mean_scaled`, then, with α = `alpha` > 0, α · CE(references) + (1 − α) · that
(the CE of the references on their own `kd` normalisation, as every on-policy method). Registers no method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_core.models.lm import HeadInputs
from kd_core.methods.base import (LossOutput, StepContext, fused_head_inputs, mix_with_ce, mix_with_fused_ce,
                                  model_logits, response_positions, shifted)
from kd_core.methods.batches import extract_prompts, generation_batch
from kd_core.teachers.source import teacher_head_inputs, teacher_logits
from kd_core.methods.onpolicy import OnPolicyMethod, generation_settings
from kd_core.methods.rollouts import count_generation, sample

Batch = dict[str, torch.Tensor]


def sampled_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B,T] whose next token is supervised, that token [B,T]; 0 elsewhere) of a right-padded batch."""
    labels = batch["labels"]
    return response_positions(labels), F.pad(labels[:, 1:].clamp(min=0), (0, 1))


def student_outputs(cfg, student: torch.nn.Module, batch: Batch) -> HeadInputs | torch.Tensor:
    """The student's head inputs (`fused_lm_head`, a plain head) or else its logits [B,T,V], with gradient."""
    head = fused_head_inputs(cfg, student, batch)
    return head if head is not None else model_logits(student, batch)


def teacher_outputs(teacher: torch.nn.Module, batch: Batch, fused: bool) -> HeadInputs | torch.Tensor:
    """The frozen teacher's head inputs (when `fused` and its head is a plain projection) or else its logits."""
    head = teacher_head_inputs(teacher, batch) if fused else None
    return head if head is not None else teacher_logits(teacher, batch)


def with_reference_ce(ctx: StepContext, cfg, kd_loss: torch.Tensor, logs: dict[str, float]) -> LossOutput:
    """α · CE(references)/N + (1 − α) · kd_loss (the references through the student once more); kd_loss alone
    at α = 0."""
    if cfg.alpha <= 0:
        return LossOutput(kd_loss, logs)
    head = fused_head_inputs(cfg, ctx.student, ctx.batch)
    if head is not None:
        return mix_with_fused_ce(cfg, kd_loss, logs, head, ctx.batch["labels"], ctx.num_items)
    logits, targets, mask = shifted(model_logits(ctx.student, ctx.batch), ctx.batch["labels"])
    return mix_with_ce(cfg, kd_loss, logs, logits, targets, mask, ctx.num_items)


class StudentSampledMethod(OnPolicyMethod):
    """`make_batch`: the student's samples of every prompt; `loss_on`: the method's term on such a batch."""

    def make_batch(self, ctx: StepContext) -> tuple[Batch, bool, dict[str, float]]:
        settings = generation_settings(ctx, self.args)
        gen = sample([(ctx.student, 1.0)], extract_prompts(ctx.batch), **settings)
        count_generation(ctx, gen)
        batch = generation_batch(gen, settings["eos_token_id"], settings["pad_token_id"], ctx.batch["input_ids"].device)
        return batch, True, {"gen_len": gen.num_tokens / max(len(gen), 1)}

    def loss_on(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover
        """(the method's term on `batch`, normalised by `token_mean_scaled` against ctx's references; logs)."""
        raise NotImplementedError

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        batch, _, logs = self.make_batch(ctx)
        kd_loss, terms = self.loss_on(ctx, batch)
        return with_reference_ce(ctx, self.cfg, kd_loss, {**terms, **logs})
