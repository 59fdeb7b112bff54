"""`kd`: token-level distillation on the references (teacher forcing) with any registered divergence.

loss = α · CE(y) + (1 − α) · Σ_response D(p_T(·|y_<t,x) || q_S(·|y_<t,x)) / N

with p_T, q_S the teacher's and student's next-token distributions at temperature τ (both scaled), D the
divergence named by `divergence` (fkl = KL(p_T || q_S), rkl = KL(q_S || p_T), jsd, tvd, ...), α = `alpha`,
and N the response tokens of the accumulated batch. The teacher runs in eval mode without gradients.
"""

from __future__ import annotations

from kd_core.losses.divergences import reduce_tokens, token_divergence
from kd_core.methods.base import (LossOutput, Method, StepContext, mix_with_ce, model_logits, register_method, shifted,
                                  teacher_logits)


@register_method("kd")
class TokenKD(Method):
    needs_teacher = True

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        cfg = self.cfg
        s_logits = model_logits(ctx.student, ctx.batch)
        t_logits = teacher_logits(ctx.teacher, ctx.batch)
        s_logits, targets, mask = shifted(s_logits, ctx.batch["labels"])
        t_logits = t_logits[:, :-1]
        div = token_divergence(s_logits, t_logits, cfg.divergence, temperature=cfg.temperature, **cfg.divergence_args)
        logs = {"kd": float(reduce_tokens(div.detach(), mask))}
        return mix_with_ce(cfg, reduce_tokens(div, mask, ctx.num_items), logs, s_logits, targets, mask, ctx.num_items)
