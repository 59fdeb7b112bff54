"""`kd`: token-level distillation on the references (teacher forcing) with any registered divergence.

loss = α · CE(y) + (1 − α) · Σ_response D(p_T(·|y_<t,x) || q_S(·|y_<t,x)) / N

with p_T, q_S the teacher's and student's next-token distributions at temperature τ (both scaled), D the
divergence named by `divergence` (fkl = KL(p_T || q_S), rkl = KL(q_S || p_T), jsd, tvd, ...), α = `alpha`,
and N the response tokens of the accumulated batch. The teacher runs in eval mode without gradients.

The divergence is computed in chunks of response positions (`kd_core/losses/chunked.py`: same values and
gradients, no full B×T×V temporaries). With `teacher_cache.enabled` the live teacher is replaced by its
cached top-k log-probabilities and tail mass (`kd_core/logit_cache.py`), and D is the sparse divergence
of `kd_core/losses/sparse.py` (exact when top_k = V).
"""

from __future__ import annotations

from kd_core.losses.chunked import chunked_sparse_divergence, chunked_token_divergence
from kd_core.losses.divergences import reduce_tokens
from kd_core.methods.base import (LossOutput, Method, StepContext, mix_with_ce, model_logits, prediction_positions,
                                  register_method, shifted, teacher_logits)


@register_method("kd")
class TokenKD(Method):
    needs_teacher = True
    reads_teacher_cache = True

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        cfg = self.cfg
        logits = model_logits(ctx.student, ctx.batch)
        s_logits, targets, mask = shifted(logits, ctx.batch["labels"])
        positions = prediction_positions(mask)
        if self.teacher_cache is not None:
            top_lp, top_ids, tail = self.teacher_cache.rows_for(ctx.batch)
            div = chunked_sparse_divergence(logits, positions, top_lp, top_ids, tail, cfg.divergence,
                                            temperature=cfg.temperature, vocab_size=self.teacher_cache.vocab_size,
                                            **cfg.divergence_args)
        else:
            div = chunked_token_divergence(logits, teacher_logits(ctx.teacher, ctx.batch), positions, cfg.divergence,
                                           temperature=cfg.temperature, **cfg.divergence_args)
        logs = {"kd": float(reduce_tokens(div.detach(), positions))}
        kd_loss = reduce_tokens(div, positions, ctx.num_items)
        return mix_with_ce(cfg, kd_loss, logs, s_logits, targets, mask, ctx.num_items)
