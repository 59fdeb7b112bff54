"""`imitkd`: Autoregressive KD through imitation learning (Lin et al., EMNLP 2020, "ImitKD").

DAgger-style data mixing: each row of a micro-batch keeps its reference with probability β(progress), the
paper's β (probability of the expert/data trajectory), otherwise its response is replaced by a sample of the
current student from the row's prompt (temperature `gen_temperature`, at most `max_new_tokens`, stop at
EOS). β decays linearly over training from `beta_start` (default 1: references only) to `beta_end` (default
0: student continuations only):

    β(progress) = beta_start + (beta_end − beta_start) · clamp(progress, 0, 1)
    share of student-generated rows ≈ 1 − β(progress)

The teacher supervises every response position of the resulting (prompt + continuation) rows, the EOS
included, with the configured divergence (`divergence`, default fkl = KL(p_T || q_S), p = teacher,
q = student) at temperature τ:

    loss = α · CE(references) + (1 − α) · Σ_{supervised t} D(p_T || q_S) / norm

norm: see `onpolicy` (token mean over the supervised tokens weighted by the micro-batch's share of the
accumulated batch's reference tokens; exactly Σ / N when no row was replaced).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from kd_core.methods.base import StepContext, register_method
from kd_core.methods.onpolicy import (OnPolicyMethod, count_generation, extract_prompts, generation_settings,
                                      method_divergence, mixed_batch, sample)


class ImitKDArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta_start: float = Field(1.0, ge=0, le=1, description="probability of keeping a reference at the start")
    beta_end: float = Field(0.0, ge=0, le=1, description="probability of keeping a reference at the end")
    gen_temperature: float = Field(1.0, gt=0, description="sampling temperature of the student continuations")
    max_new_tokens: int = Field(64, ge=1, description="generated tokens per response, EOS included")


@register_method("imitkd")
class ImitKD(OnPolicyMethod):
    needs_teacher = True
    Args = ImitKDArgs

    @property
    def effective_divergence(self) -> tuple[str, dict]:
        """(name, params) of the divergence used: the configured one."""
        return method_divergence(self.cfg)

    def beta(self, progress: float) -> float:
        """Probability that a row keeps its reference at this point of training (linear schedule)."""
        p = min(max(float(progress), 0.0), 1.0)
        return self.args.beta_start + (self.args.beta_end - self.args.beta_start) * p

    def make_batch(self, ctx: StepContext) -> tuple[dict[str, torch.Tensor], bool, dict[str, float]]:
        beta = self.beta(ctx.progress)
        n_rows = ctx.batch["input_ids"].shape[0]
        replace = torch.nonzero(torch.rand(n_rows) >= beta).flatten().tolist() if beta < 1 else []
        logs = {"beta": beta, "generated_rows": float(len(replace)) / max(n_rows, 1)}
        if not replace:
            return ctx.batch, False, logs
        settings = generation_settings(ctx, self.args)
        prompts = extract_prompts(ctx.batch)
        gen = sample([(ctx.student, 1.0)], [prompts[i] for i in replace], **settings)
        count_generation(ctx, gen)
        logs["gen_len"] = gen.num_tokens / len(gen)
        batch = mixed_batch(ctx.batch, gen, replace, settings["eos_token_id"], settings["pad_token_id"])
        return batch, True, logs

