"""`entropy_aware_opd`: entropy-aware on-policy distillation (Jin et al. 2026, arXiv:2603.07079, "EOPD"): on the
student's own samples, the reverse KL at every position plus the forward KL where the teacher is uncertain:

    ℓ_t  = KL(q_t || p_t) + 1{H(p_t) > h} · KL(p_t || q_t)         p_t = p(·|y_<t,x) teacher, q_t student, at τ
    loss = α · CE(references) + (1 − α) · Σ_{sampled t} ℓ_t / norm  (norm: `onpolicy.token_mean_scaled`)

with H(p_t) = −Σ_v p_t(v) log p_t(v) in nats, h = `entropy_threshold`, full next-token distributions over the
shared vocabulary (no gradient through the gate). Details and the source followed: docs/methods_onpolicy.md.
"""

from __future__ import annotations

import torch

from kd_core.losses.onpolicy_kl import entropy_gated_kl
from kd_core.losses.pairwise import pair_rows
from kd_core.methods.base import StepContext, register_method
from kd_core.methods.batches import reference_token_count
from kd_core.methods.onpolicy import token_mean_scaled
from kd_core.methods.student_samples import StudentSampledMethod, sampled_positions, student_outputs, teacher_outputs


@register_method("entropy_aware_opd")
class EntropyAwareOPD(StudentSampledMethod):
    def loss_on(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, h = self.cfg, self.args.entropy_threshold
        positions, _ = sampled_positions(batch)
        student = student_outputs(cfg, ctx.student, batch)
        teacher = teacher_outputs(ctx.teacher, batch, fused=not isinstance(student, torch.Tensor))
        parts = torch.zeros(3, int(positions.sum()), dtype=torch.float64, device=positions.device)  # rkl, gated fkl, H(p)

        def fn(lq: torch.Tensor, lp: torch.Tensor, rows: slice) -> torch.Tensor:
            reverse, forward, ent = entropy_gated_kl(lq, lp, h)
            parts[:, rows] = torch.stack([reverse.detach(), forward.detach(), ent]).to(parts.dtype)
            return reverse + forward

        per_position = pair_rows(student, teacher, positions, fn, cfg.temperature)
        kd = token_mean_scaled(per_position, positions, reference_token_count(ctx.batch), ctx.num_items)
        n = max(parts.shape[1], 1)
        logs = {"rkl": float(parts[0].sum()) / n, "fkl_gated": float(parts[1].sum()) / n,
                "teacher_entropy": float(parts[2].sum()) / n, "gated": float((parts[2] > h).sum()) / n,
                "supervised_tokens": float(positions.sum())}
        return kd, logs
