"""`atkd`: adaptive teaching KD (Zhong et al. 2024, arXiv:2402.11890) on the references.

    loss = α · CE(y) + (1 − α) · Σ_response ATKD_t / N

ATKD_t (:func:`kd_core.losses.atkd.atkd_per_token`): the response positions of the micro-batch are ranked by
the teacher's uncertainty UNC = 1 − p_g (g = reference token); the ⌈hard_fraction · n⌉ most uncertain are
*hard* and get `tkd_weight`·TKD + `dkd_weight`·DKD, the others (*easy*) get `dkd_weight`·DKD only. TKD is the
divergence `divergence` (fkl = KL(p || q), rkl = KL(q || p), jsd, ...) between the binary target / non-target
distributions, DKD the same divergence between the renormalised non-target distributions; both models at
`temperature`, no T² factor. α = `alpha`, N = response tokens of the accumulated batch. Teacher frozen.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kd_core.losses.atkd import atkd_per_token
from kd_core.losses.divergences import reduce_tokens
from kd_core.methods.base import (LossOutput, Method, StepContext, mix_with_ce, model_logits, register_method, shifted,
                                  teacher_logits)


class ATKDArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hard_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of response tokens treated as hard (top UNC)")
    tkd_weight: float = Field(1.0, ge=0.0, description="weight of the target-oriented part (hard tokens only)")
    dkd_weight: float = Field(1.0, ge=0.0, description="weight of the diversity-oriented part (all tokens)")


@register_method("atkd")
class ATKD(Method):
    needs_teacher = True
    Args = ATKDArgs

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        cfg, a = self.cfg, self.args
        s_logits = model_logits(ctx.student, ctx.batch)
        t_logits = teacher_logits(ctx.teacher, ctx.batch)
        s_logits, targets, mask = shifted(s_logits, ctx.batch["labels"])
        per = atkd_per_token(s_logits, t_logits[:, :-1], targets, mask, divergence=cfg.divergence,
                             hard_fraction=a.hard_fraction, temperature=cfg.temperature, tkd_weight=a.tkd_weight,
                             dkd_weight=a.dkd_weight, **cfg.divergence_args)
        logs = {"atkd": float(reduce_tokens(per.detach(), mask))}
        return mix_with_ce(cfg, reduce_tokens(per, mask, ctx.num_items), logs, s_logits, targets, mask, ctx.num_items)
