"""What the methods that distil across tokenizers (`uld`, `gold`) share; registers no method.

Their micro-batch is a paired batch (:mod:`kd_core.data.paired`, built by the distill stage): the student's
input_ids / attention_mask / labels and the teacher's own tokenization of the same text, teacher_input_ids /
teacher_attention_mask / teacher_labels (+ text_ends for GOLD's alignment). A batch without the teacher's keys
is read as one tokenizer shared by both models (the teacher reads the student's tokens: what the shared-tokenizer
pipeline and the method tests give them). The distill stage hands over both tokenizers (`set_tokenizers`): each
side's logits are sliced to its tokenizer's vocabulary (padded embedding rows dropped), and GOLD matches the two
vocabularies by token string.
"""

from __future__ import annotations

from typing import Any

import torch

from kd_core.data.paired import PairedCollator
from kd_core.losses.tokens import reduce_tokens
from kd_core.methods.base import Method, model_logits, shifted, token_ce
from kd_core.teachers.source import teacher_logits


class CrossTokenizerMethod(Method):
    needs_text_offsets: bool = False  # the paired data set carries text_ends (GOLD's alignment by text)
    student_tokenizer: Any = None
    teacher_tokenizer: Any = None

    @staticmethod
    def collator(student_tokenizer, teacher_tokenizer) -> PairedCollator:
        """The collator of the paired data set (each side padded with its own pad id)."""
        return PairedCollator(student_tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)

    def set_tokenizers(self, student_tokenizer, teacher_tokenizer) -> None:
        """The student's and the teacher's tokenizers (the distill stage calls this before training)."""
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer

    def tokenizers(self, ctx) -> tuple[Any, Any]:
        """(student's, teacher's); without `set_tokenizers` the step's tokenizer for both (one shared tokenizer)."""
        if self.student_tokenizer is not None:
            return self.student_tokenizer, self.teacher_tokenizer
        return ctx.tokenizer, ctx.tokenizer

    def vocab_sizes(self, ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[int, int]:
        """The vocabulary each side's distribution is taken over: its tokenizer's size (padded output rows left
        out); without tokenizers the shared one, min(V_s, V_t) (as `kd`)."""
        vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
        student_tok, teacher_tok = self.tokenizers(ctx)
        if student_tok is None or teacher_tok is None:
            return min(vs, vt), min(vs, vt)
        return min(vs, len(student_tok)), min(vt, len(teacher_tok))

    def forward_both(self, ctx) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits [B, T_s, V_s] (with grad), teacher logits [B, T_t, V_t] (no grad) and the teacher's view
        of the batch (`teacher_view`)."""
        view = teacher_view(ctx.batch)
        return model_logits(ctx.student, ctx.batch), teacher_logits(ctx.teacher, view), view

    @staticmethod
    def reference_ce(logits: torch.Tensor, labels: torch.Tensor, num_items) -> tuple[torch.Tensor, float]:
        """The student's CE on the references, Σ / num_items, and its token mean (logged)."""
        s_logits, targets, mask = shifted(logits, labels)
        ce = token_ce(s_logits, targets)
        return reduce_tokens(ce, mask, num_items), float(reduce_tokens(ce.detach(), mask))


def teacher_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's side of a paired batch (input_ids, attention_mask, labels, and text_ends when present), or the
    batch itself when it has no teacher keys (one shared tokenizer)."""
    if "teacher_input_ids" not in batch:
        return batch
    view = {k: batch[f"teacher_{k}"] for k in ("input_ids", "attention_mask", "labels")}
    if "teacher_text_ends" in batch:
        view["text_ends"] = batch["teacher_text_ends"]
    return view
