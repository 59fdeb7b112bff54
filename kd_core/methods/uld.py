"""`uld`: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal
Logit Distillation Loss for LLMs", arXiv:2402.12030): teacher and student with different tokenizers (or one).

    loss = ce_weight · Σ_response CE(y) / N + uld_weight · Σ_{i < min(n_s, n_t)} W1(p_i, q_i) / N
    W1(p, q) = Σ_k |q_(k) − p_(k)|     (both sorted in decreasing order, the smaller vocabulary padded with zeros)

Each model reads the same text (prompt + reference + its own EOS) through its own tokenizer (the paired batch,
:mod:`kd_core.methods.cross_tokenizer`); p_i / q_i are the teacher's / student's next-token distributions (at
`temperature`) predicting the i-th response token of their own tokenization, so the i-th tokens are aligned by
position, truncated to the shorter response of the row (the paper's alignment; `skip_eos` first drops each side's
final EOS, the ULD code's skip_*_eos). N = response tokens of the student in the accumulated batch
(`ctx.num_items`), as every loss of the pipeline (the paper averages per sequence, then over the batch). `alpha` is
not read (refused by params: the CE weight is `ce_weight`), nor is `divergence`. Logged: `uld` (token mean of W1
over the aligned positions) and `ce`. :mod:`kd_core.losses.cross_tokenizer` has the loss (chunked: no sort of the
whole batch kept for backward).
"""

from __future__ import annotations

from kd_core.losses.cross_tokenizer import positional_alignment, uld_divergence
from kd_core.losses.tokens import reduce_tokens
from kd_core.methods.base import LossOutput, StepContext, register_method
from kd_core.methods.cross_tokenizer import CrossTokenizerMethod


@register_method("uld")
class ULD(CrossTokenizerMethod):
    def compute_loss(self, ctx: StepContext) -> LossOutput:
        cfg, a = self.cfg, self.args
        s_logits, t_logits, view = self.forward_both(ctx)
        student_tok, teacher_tok = self.tokenizers(ctx)
        alignment = positional_alignment(ctx.batch["labels"], view["labels"],
                                         getattr(student_tok, "eos_token_id", None),
                                         getattr(teacher_tok, "eos_token_id", None), skip_eos=a.skip_eos)
        vs, vt = self.vocab_sizes(ctx, s_logits, t_logits)
        values = uld_divergence(s_logits, t_logits, alignment, cfg.temperature, vs, vt)
        shape = s_logits.shape[:2]
        per, mask = alignment.per_position(values, shape), alignment.student_mask(shape)
        logs = {"uld": float(reduce_tokens(per.detach(), mask))}
        loss = a.uld_weight * reduce_tokens(per, mask, ctx.num_items)
        if a.ce_weight > 0:
            ce, logs["ce"] = self.reference_ce(s_logits, ctx.batch["labels"], ctx.num_items)
            loss = loss + a.ce_weight * ce
        return LossOutput(loss, logs)
