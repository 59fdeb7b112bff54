"""`sampled_rkl`: pure on-policy distillation with the sampled-token reverse-KL estimator (the cheap form RL
frameworks use for huge vocabularies: only the teacher's log-probability of each sampled token is needed).

The student samples a response y to each prompt x (at `gen_temperature`); with r_t = log p(y_t|y_<t,x) −
log q(y_t|y_<t,x) (p = teacher, q = student, both at τ = `temperature`, over their shared vocabulary):

    ℓ_t  = sg(k_t) + sg(k1_t) · (log q(y_t) − sg(log q(y_t)))        k1 = −r, k3 = (e^r − 1) − r (`estimator`)
    loss = α · CE(references) + (1 − α) · Σ_{sampled t} ℓ_t / norm   (norm: `onpolicy.token_mean_scaled`)

Value: the k estimate of KL(q || p) per token; gradient: k1_t · ∇ log q(y_t), the REINFORCE estimator whose
expectation over y_t ~ q is ∇ KL(q(·|y_<t,x) || p(·|y_<t,x)) (prefix held fixed). Why, and why not TorchRL's
pathwise k3: :mod:`kd_core.losses.onpolicy_kl`. A sampled token the teacher gives probability 0 (an infinite
reverse KL) stops training with a `TeacherSupportError` naming it, never a NaN. Details: docs/methods_onpolicy.md.
"""

from __future__ import annotations

import torch

from kd_core.models.lm import shared_vocab_size
from kd_core.losses.onpolicy_kl import sampled_kl_value, sampled_rkl_loss
from kd_core.losses.pairwise import token_logprobs
from kd_core.losses.tokens import reduce_tokens
from kd_core.methods.base import StepContext, register_method
from kd_core.methods.batches import reference_token_count
from kd_core.methods.onpolicy import token_mean_scaled
from kd_core.methods.student_samples import StudentSampledMethod, sampled_positions, student_outputs, teacher_outputs


@register_method("sampled_rkl")
class SampledRKL(StudentSampledMethod):
    def loss_on(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        positions, targets = sampled_positions(batch)
        student = student_outputs(cfg, ctx.student, batch)
        fused = not isinstance(student, torch.Tensor)
        vocab = shared_vocab_size(ctx.student, ctx.teacher)  # (what the samples were drawn from)
        logq = token_logprobs(student, positions, targets, vocab, cfg.temperature)
        with torch.no_grad():  # the teacher's log-probability of the sampled tokens only
            logp = token_logprobs(teacher_outputs(ctx.teacher, batch, fused), positions, targets, vocab,
                                  cfg.temperature)
        per_token = sampled_rkl_loss(logq, logp, self.args.estimator, tokens=targets,
                                     decode=getattr(ctx.tokenizer, "decode", None))
        kd = token_mean_scaled(per_token, positions, reference_token_count(ctx.batch), ctx.num_items)
        r = (logp - logq).detach()
        logs = {"k1": float(reduce_tokens(sampled_kl_value(r, "k1"), positions)),
                "k3": float(reduce_tokens(sampled_kl_value(r, "k3"), positions)),
                "supervised_tokens": float(positions.sum())}
        return kd, logs
