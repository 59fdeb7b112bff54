"""`gold`: sequence-aligned cross-tokenizer distillation in the spirit of TRL's GOLD (`trl/experimental/gold`,
TRL 1.16: `GOLDTrainer` with `use_uld_loss`, `use_extended_uld`, `uld_use_hybrid_loss`,
`uld_token_merge_strategy="bayesian"`), off-policy (on the references).

    loss = ce_weight · Σ_response CE(y) / N
         + distill_weight · Σ_spans [ w_m · D(m_p[shared] || m_q[shared]) + w_u · W1(m_q[rest_s], m_p[rest_t]) ] / N

1. Each model reads the same text through its own tokenizer (the paired batch); the response tokens of each side
   are grouped into the shortest spans that end at the same byte of the response text on both sides
   (:func:`kd_core.losses.cross_tokenizer.align_spans`, GOLD's `_align_by_byte_offsets`), so a span's tokens cover
   the same text on both sides.
2. A span y_1 … y_k becomes one vector per side by the chain rule: log m(v) = Σ_{i<k} log q_τ(y_i | y_<i) +
   log q_τ(v | y_<k) (GOLD's "bayesian" merge; m_p alike for the teacher).
3. The tokens whose strings are in both vocabularies (`shared`, matched by `get_vocab()` as GOLD) are compared
   with the divergence `divergence` (default GOLD's generalized JSD, β = 0.5) on m restricted to them (not
   renormalised, as GOLD); the other tokens of each side (`rest_s`, `rest_t`) with ULD's sorted L1.
   w_m = `matched_weight`, w_u = `unmatched_weight`, or both null: GOLD's adaptive w_m = |shared| / V_t, w_u = 1 − w_m.
   `hybrid: false` (GOLD without `uld_use_hybrid_loss`): W1(m_q, m_p) on the whole span vectors instead.

With one tokenizer every span is one token, every token is shared (w_m = 1, no L1 part), and the loss is `kd`'s
with the same divergence (tests/test_cross_tokenizer.py checks value and gradient). `skip_eos` (default true, as
GOLD) leaves the EOS out; false pairs the two EOS tokens as one more span. N = the student's response tokens of
the accumulated batch (GOLD: per-sequence means, then the batch mean). Differences from GOLD, and why:
docs/methods_offpolicy.md (`gold`). `alpha` is not read (the CE weight is `ce_weight`). Logged: `gold` (token
mean of the span term over the spans) and `ce`.
"""

from __future__ import annotations

from kd_core.losses.cross_tokenizer import (VocabMatch, gold_divergence, identity_match, match_vocabularies,
                                            positional_alignment, text_alignment)
from kd_core.losses.tokens import reduce_tokens
from kd_core.methods.base import LossOutput, StepContext, register_method
from kd_core.methods.cross_tokenizer import CrossTokenizerMethod


@register_method("gold")
class GOLD(CrossTokenizerMethod):
    needs_text_offsets = True
    _match: tuple[tuple[int, int], VocabMatch] | None = None

    def vocab_match(self, ctx: StepContext, vs: int, vt: int) -> VocabMatch:
        """The shared tokens of the two vocabularies (computed once per pair of sizes)."""
        if self._match is None or self._match[0] != (vs, vt):
            student_tok, teacher_tok = self.tokenizers(ctx)
            if student_tok is None or teacher_tok is None or student_tok is teacher_tok:
                match = identity_match(min(vs, vt)) if vs == vt else None
            else:
                match = None
            if match is None:
                match = match_vocabularies(student_tok.get_vocab(), teacher_tok.get_vocab(), vs, vt)
            self._match = ((vs, vt), match)
        return self._match[1]

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        cfg, a, batch = self.cfg, self.args, ctx.batch
        s_logits, t_logits, view = self.forward_both(ctx)
        if "text_ends" in batch:
            alignment = text_alignment(batch["labels"], batch["text_ends"], view["labels"], view["text_ends"],
                                       skip_eos=a.skip_eos)
        elif view is batch:  # one tokenizer, one tokenization: every token is its own span
            alignment = positional_alignment(batch["labels"], batch["labels"], skip_eos=a.skip_eos,
                                             student_eos=getattr(ctx.tokenizer, "eos_token_id", None),
                                             teacher_eos=getattr(ctx.tokenizer, "eos_token_id", None))
        else:
            raise ValueError("gold: a paired batch without text_ends (encode it with with_offsets=True)")
        vs, vt = self.vocab_sizes(ctx, s_logits, t_logits)
        values = gold_divergence(s_logits, t_logits, alignment, self.vocab_match(ctx, vs, vt), cfg.divergence,
                                 cfg.temperature, a.matched_weight, a.unmatched_weight, vs, vt, hybrid=a.hybrid,
                                 **cfg.divergence_args)
        shape = s_logits.shape[:2]
        per, mask = alignment.per_position(values, shape), alignment.student_mask(shape)
        logs = {"gold": float(reduce_tokens(per.detach(), mask))}
        loss = a.distill_weight * reduce_tokens(per, mask, ctx.num_items)
        if a.ce_weight > 0:
            ce, logs["ce"] = self.reference_ce(s_logits, batch["labels"], ctx.num_items)
            loss = loss + a.ce_weight * ce
        return LossOutput(loss, logs)
