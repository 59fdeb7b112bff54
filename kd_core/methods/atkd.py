"""`atkd`: adaptive teaching KD (Zhong et al. 2024, arXiv:2402.11890) on the references.

    loss = α · CE(y) + (1 − α) · Σ_response ATKD_t / N

ATKD_t: the response positions of the micro-batch are ranked by the teacher's uncertainty UNC = 1 − p_g
(g = reference token); the ⌈hard_fraction · n⌉ most uncertain are *hard* and get `tkd_weight`·TKD +
`dkd_weight`·DKD, the others (*easy*) get `dkd_weight`·DKD only. TKD is the divergence `divergence`
(fkl = KL(p || q), rkl = KL(q || p), jsd, ...) between the binary target / non-target distributions, DKD the
same divergence between the renormalised non-target distributions (:mod:`kd_core.losses.atkd`); both models
at `temperature`, no T² factor. α = `alpha`, N = response tokens of the accumulated batch.

Ranking scope: the source ranks the tokens "within the batch"; here the ranking is over the micro-batch
(each `compute_loss` call). Under gradient accumulation the loss then differs from the accumulated batch's
by exactly tkd_weight/N · (Σ_{hard here, not in the batch ranking} TKD − Σ_{hard in the batch ranking, not
here} TKD) (:mod:`kd_core.losses.atkd`, "Ranking scope"; 0 without accumulation). Ranking over the
accumulated batch needs the teacher's UNC of every micro-batch before the first backward (a second
teacher pass, or the trainer looking ahead), which this method does not do.

The teacher comes from `ctx.teacher_signal`: live logits, or the teacher-logit cache (exact at top_k = V;
below, a target outside the cached top-k gets the estimate of
:func:`kd_core.losses.sparse.coarsen_with_target`).
"""

from __future__ import annotations

from kd_core.losses.atkd import hard_selection
from kd_core.losses.tokens import reduce_tokens
from kd_core.methods.base import (LossOutput, Method, StepContext, mix_with_ce, model_logits, prediction_positions,
                                  register_method, shifted)


@register_method("atkd")
class ATKD(Method):
    def compute_loss(self, ctx: StepContext) -> LossOutput:
        cfg, a = self.cfg, self.args
        logits = model_logits(ctx.student, ctx.batch)
        s_logits, targets, mask = shifted(logits, ctx.batch["labels"])
        positions = prediction_positions(mask)
        row_targets = targets[mask]  # [N], in the order of positions.nonzero()
        signal = ctx.teacher_signal
        unc = signal.target_uncertainty(logits, positions, row_targets, temperature=cfg.temperature)
        hard = hard_selection(unc, a.hard_fraction)
        per = signal.decoupled_divergence(logits, positions, row_targets, cfg.divergence, temperature=cfg.temperature,
                                          tkd_weight=a.tkd_weight * hard.float(), dkd_weight=a.dkd_weight,
                                          **cfg.divergence_args)
        logs = {"atkd": float(reduce_tokens(per.detach(), positions))}
        return mix_with_ce(cfg, reduce_tokens(per, positions, ctx.num_items), logs, s_logits, targets, mask,
                           ctx.num_items)
