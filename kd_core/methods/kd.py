"""`kd`: token-level distillation on the references (teacher forcing) with any registered divergence.

loss = α · CE(y) + (1 − α) · c_τ · Σ_response D(p_T(·|y_<t,x) || q_S(·|y_<t,x)) / N

with p_T, q_S the teacher's and student's next-token distributions at temperature τ (both scaled), D the
divergence named by `divergence` (fkl = KL(p_T || q_S), rkl = KL(q_S || p_T), jsd, tvd, skl, srkl, akl, abkd),
α = `alpha`, and N the response tokens of the accumulated batch. c_τ = `method_args.temperature_scale`:
`none` (default) c_τ = 1; `tau_squared` c_τ = τ², Hinton et al.'s factor and the OKD paper's eq. 2
(forward KD = τ² Σ p_T log(p_T / q_S) with fkl); the logged `kd` is D without the factor.

The teacher comes from `ctx.teacher_signal` (:mod:`kd_core.teachers.signal`): the live teacher's logits (eval mode,
no gradients), or with `teacher_cache.enabled` its cached top-k log-probs + tail mass, where D is taken on
the top-k + tail coarsening (:mod:`kd_core.losses.sparse`, exact when top_k = V). Either way D is computed
in chunks of response positions (no full B×T×V temporaries). With `fused_lm_head` (default) D (and the CE) are
computed from the student's last hidden states and LM head (the teacher's too when live), so that neither
model's logits exist for the batch (:mod:`kd_core.losses.fused`; same values and gradients).
"""

from __future__ import annotations

from kd_core.losses.tokens import reduce_tokens, temperature_factor
from kd_core.methods.base import (LossOutput, Method, StepContext, fused_head_inputs, mix_with_ce, mix_with_fused_ce,
                                  model_logits, prediction_positions, register_method, response_positions, shifted)


@register_method("kd")
class TokenKD(Method):
    def compute_loss(self, ctx: StepContext) -> LossOutput:
        cfg = self.cfg
        student = fused_head_inputs(cfg, ctx.student, ctx.batch)
        if student is None:
            logits = model_logits(ctx.student, ctx.batch)
            s_logits, targets, mask = shifted(logits, ctx.batch["labels"])
            positions = prediction_positions(mask)
            div = ctx.teacher_signal.divergence(logits, positions, cfg.divergence, temperature=cfg.temperature,
                                                **cfg.divergence_args)
        else:
            positions = response_positions(ctx.batch["labels"])
            div = ctx.teacher_signal.fused_divergence(student, positions, cfg.divergence, temperature=cfg.temperature,
                                                      **cfg.divergence_args)
        logs = {"kd": float(reduce_tokens(div.detach(), positions))}
        kd_loss = temperature_factor(self.args.temperature_scale, cfg.temperature) * reduce_tokens(
            div, positions, ctx.num_items)
        if student is None:
            return mix_with_ce(cfg, kd_loss, logs, s_logits, targets, mask, ctx.num_items)
        return mix_with_fused_ce(cfg, kd_loss, logs, student, ctx.batch["labels"], ctx.num_items)
