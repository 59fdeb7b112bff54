"""`sft`: supervised fine-tuning on the references, no teacher (the baseline every KD method is compared to).

loss = Σ_response −log q(y_t | y_<t, x) / N, with N the response tokens of the accumulated batch.
"""

from __future__ import annotations

from kd_core.losses.tokens import reduce_tokens
from kd_core.methods.base import LossOutput, Method, StepContext, model_logits, register_method, shifted, token_ce


@register_method("sft")
class SFT(Method):
    def compute_loss(self, ctx: StepContext) -> LossOutput:
        logits = model_logits(ctx.student, ctx.batch)
        logits, targets, mask = shifted(logits, ctx.batch["labels"])
        ce = token_ce(logits, targets)
        loss = reduce_tokens(ce, mask, ctx.num_items)
        return LossOutput(loss, {"ce": float(reduce_tokens(ce.detach(), mask))})
