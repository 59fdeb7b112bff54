"""`gkd`: Generalized Knowledge Distillation (Agarwal et al., ICLR 2024, arXiv:2306.13649).

With probability `lmbda` a micro-batch's responses are student samples (`seq_kd`: teacher samples first), then
loss = α · CE(references) + (1 − α) · Σ_{supervised t} D(p_T || q_S) / norm, D default jsd (beta 0.5); norm:
`onpolicy.token_mean_scaled` (`lmbda = 0` is the `kd` method). Details: docs/methods_onpolicy.md.
"""

from __future__ import annotations

import torch

from kd_core.methods.base import StepContext, register_method
from kd_core.methods.batches import extract_prompts, generation_batch
from kd_core.methods.onpolicy import OnPolicyMethod, generation_settings
from kd_core.methods.rollouts import count_generation, sample


@register_method("gkd")
class GKD(OnPolicyMethod):
    def make_batch(self, ctx: StepContext) -> tuple[dict[str, torch.Tensor], bool, dict[str, float]]:
        """The micro-batch the loss is computed on, whether its responses were replaced, and logs."""
        args = self.args
        batch, replaced, logs = ctx.batch, False, {"on_policy": 0.0}
        if args.seq_kd or args.lmbda > 0:
            settings = generation_settings(ctx, args)
            prompts = extract_prompts(ctx.batch)
            device = ctx.batch["input_ids"].device
            if args.seq_kd:
                gen = sample([(ctx.teacher, 1.0)], prompts, **settings)
                count_generation(ctx, gen, teacher_generated=True)
                batch, replaced = generation_batch(gen, settings["eos_token_id"], settings["pad_token_id"], device), True
            on_policy = args.lmbda >= 1 or (args.lmbda > 0 and float(torch.rand(())) < args.lmbda)
            if on_policy:
                gen = sample([(ctx.student, 1.0)], prompts, **settings)
                count_generation(ctx, gen)
                batch, replaced = generation_batch(gen, settings["eos_token_id"], settings["pad_token_id"], device), True
                logs = {"on_policy": 1.0, "gen_len": gen.num_tokens / max(len(gen), 1)}
        return batch, replaced, logs

