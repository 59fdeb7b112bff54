"""`speculative_kd`: Speculative Knowledge Distillation (Xu et al., ICLR 2025, arXiv:2410.11325).

Each micro-batch's responses are rebuilt by interleaved sampling (`speculative_rollouts.interleaved_sample`): the
student proposes each next token y_t ~ q(·|y_<t,x); it is kept when it is among the teacher's `top_k` tokens at
that position, else replaced by z_t ~ p(·|y_<t,x) (both at `gen_temperature`). Then, on the resulting sequences,

    loss = α · CE(references) + (1 − α) · Σ_{supervised t} D(p_t || q_t) / norm    (norm: `onpolicy.token_mean_scaled`)

with D the configured divergence (default `fkl` = KL(p || q)) at τ: the `kd` loss on those sequences
(`onpolicy.distill_on_batch`). Details: docs/methods_onpolicy.md.
"""

from __future__ import annotations

import torch

from kd_core.methods.base import StepContext, register_method
from kd_core.methods.batches import extract_prompts, generation_batch
from kd_core.methods.onpolicy import OnPolicyMethod, generation_settings
from kd_core.methods.rollouts import count_generation
from kd_core.methods.speculative_rollouts import interleaved_sample


@register_method("speculative_kd")
class SpeculativeKD(OnPolicyMethod):
    def make_batch(self, ctx: StepContext) -> tuple[dict[str, torch.Tensor], bool, dict[str, float]]:
        """The interleaved samples of the micro-batch's prompts (always replaced); logs the replaced share."""
        settings = generation_settings(ctx, self.args)
        out = interleaved_sample(ctx.student, ctx.teacher, extract_prompts(ctx.batch), top_k=self.args.top_k,
                                 **settings)
        count_generation(ctx, out.generation, teacher_generated=True)
        batch = generation_batch(out.generation, settings["eos_token_id"], settings["pad_token_id"],
                                 ctx.batch["input_ids"].device)
        logs = {"replaced": out.replaced / max(out.proposed, 1),
                "gen_len": out.generation.num_tokens / max(len(out.generation), 1)}
        return batch, True, logs
