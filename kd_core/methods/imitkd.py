"""`imitkd`: Autoregressive KD through imitation learning (Lin et al., EMNLP 2020, "ImitKD").

Each row keeps its reference with probability β(progress) = beta_start + (beta_end − beta_start) · clamp(progress,
0, 1), else its response is a student sample; loss = α · CE(references) + (1 − α) · Σ_{supervised t}
D(p_T || q_S) / norm (D default fkl; norm: `onpolicy.token_mean_scaled`). Details: docs/methods_onpolicy.md.
"""

from __future__ import annotations

import torch

from kd_core.methods.base import StepContext, register_method
from kd_core.methods.batches import extract_prompts, mixed_batch
from kd_core.methods.onpolicy import OnPolicyMethod, generation_settings
from kd_core.methods.rollouts import count_generation, sample


@register_method("imitkd")
class ImitKD(OnPolicyMethod):
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

