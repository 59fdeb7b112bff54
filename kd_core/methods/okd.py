"""`okd`: online knowledge distillation (Rao et al., "OKD", section V, eqs. 15–17, Algorithm 1).

The frozen teacher gets a small trainable *online module* (peft): LoRA (default; rank 32 on the query and
value projections, scaling s = lora_alpha / r), prefix tuning, or P-tuning. The teacher's base weights stay
frozen and unchanged; the online module and the student are trained together, each on its own loss:

    L_t = α_t · c_τ · D_t(p_ta, q) + (1 − α_t) · CE_ta(y)    (eq. 16, gradient into the online module only)
    L_s = (1 − α) · c_τ · D(p_ta || q) + α · CE_s(y)          (eq. 17, gradient into the student only)
    loss = L_s + w_t · L_t

with p_ta the online teacher's and q the student's next-token distributions (both at `temperature`), c_τ the
temperature factor of eq. 2 (`temperature_scale`: `none` (default) c_τ = 1; `tau_squared` c_τ = τ², the
paper's L_KL = τ² Σ p_t log(p_t / p_s), on both KL terms since eqs. 16 and 17 both use L_KL; the logged
`okd_student_kd` / `okd_teacher_kd` are D without the factor), D = the registered divergence `divergence`
(+ `divergence_args`) with p_ta as the teacher argument and q as the student argument (fkl: KL(p_ta || q),
the paper's default; rkl, jsd: Table V), α_t = `teacher_kl_weight`, w_t = `teacher_loss_weight`, α = `alpha`
(0 in the paper: students learn only from the teacher's distribution). All terms are token sums over the
response tokens divided by N (`ctx.num_items`).
The two gradients stay separate because L_s uses the teacher's log-probs detached and L_t the student's.

Direction of eq. 16 (`teacher_direction`): the paper defines (eq. 2) L_KL(p(θ_s), p(θ_t)) = Σ p_t log(p_t/p_s),
i.e. L_KL(a, b) = KL(b || a): the second argument is the target. Eq. 17, L_KL(p(θ_s), p(θ_ta)) =
KL(p_ta || q) is our forward KL (fkl) for the student. Eq. 16 swaps the arguments, L_KL(p(θ_ta), p(θ_s)) =
KL(q || p_ta): the online teacher is distilled *towards the student* (the student is the target). With
`teacher_direction: swapped` (default) D_t is D with the roles exchanged, D_t = D(student_slot = p_ta,
teacher_slot = q) — for fkl that is KL(q || p_ta) (the expression of our reverse KL, with the gradient on
p_ta); for rkl KL(p_ta || q); for jsd(β) JSD_{1−β}. `teacher_direction: same` uses the student's own
expression D(p_ta || q) for the teacher too (both models minimise one divergence).

The online module is trained with the teacher in eval mode (no dropout). Prefix tuning passes the virtual
tokens as past key/values (logits keep the input length); P-tuning prepends virtual embeddings, whose logits
are sliced off. Both shift absolute positions by `num_virtual_tokens`. `save_artifacts` writes the online
module (peft `save_pretrained`) to `<model dir>/okd_online_module/`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from kd_core.losses.chunked import chunked_rows
from kd_core.losses.divergences import get_divergence
from kd_core.losses.tokens import logprobs, reduce_tokens, shared_vocab, temperature_factor
from kd_core.methods.base import (LossOutput, Method, StepContext, prediction_positions, register_method, shifted,
                                  token_ce)
from kd_core.teachers.signal import DenseTeacherSignal

ARTIFACT_DIR = "okd_online_module"

class _OnlineParams(torch.nn.Module):
    """Holds (references to) the online module's trainable parameters for the optimizer."""

    def __init__(self, params: list[torch.nn.Parameter]):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def _mask_gpt2_key_rows(peft_model, hidden: int) -> int:
    """GPT-2's c_attn computes [q | k | v] in one matrix: keep LoRA's update of the k part at zero.

    lora_B starts at zero (peft default) and its k rows (hidden:2*hidden of the 3*hidden outputs) never get a
    gradient, so ΔW only touches q and v as in the paper. Returns the number of masked layers.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and name.endswith("c_attn"):
            for lora_b in module.lora_B.values():
                if lora_b.weight.shape[0] != 3 * hidden:
                    continue
                with torch.no_grad():
                    lora_b.weight[hidden:2 * hidden] = 0
                lora_b.weight.register_hook(functools.partial(_zero_rows, start=hidden, stop=2 * hidden))
                count += 1
    return count


def _zero_rows(grad: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The gradient with rows start:stop set to 0 (a gradient hook: works on any device)."""
    grad = grad.clone()
    grad[start:stop] = 0
    return grad


@register_method("okd")
class OKD(Method):
    def __init__(self, student_cfg, method_args: dict[str, Any] | None = None):
        super().__init__(student_cfg, method_args)
        self.peft_model = None
        self.online: _OnlineParams | None = None

    # ---- setup
    def peft_config(self, teacher):
        from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, TaskType

        a = self.args
        if a.module == "lora":
            is_gpt2 = getattr(teacher.config, "model_type", "") == "gpt2"
            return LoraConfig(task_type=TaskType.CAUSAL_LM, r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                              target_modules=a.target_modules, fan_in_fan_out=is_gpt2)
        if a.module == "prefix":
            return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=a.num_virtual_tokens,
                                      prefix_projection=a.prefix_projection)
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=a.num_virtual_tokens,
                                   encoder_hidden_size=a.encoder_hidden_size or int(teacher.config.hidden_size),
                                   encoder_reparameterization_type=a.encoder_type)

    def prepare(self, student, teacher):
        from peft import get_peft_model

        if teacher is None:
            raise ValueError("okd needs a teacher")
        teacher.eval().requires_grad_(False)
        self.peft_model = get_peft_model(teacher, self.peft_config(teacher)).eval()  # (the trainer places it)
        a = self.args
        if (a.module == "lora" and a.fused_qkv == "qv" and a.target_modules is None
                and getattr(teacher.config, "model_type", "") == "gpt2"):
            _mask_gpt2_key_rows(self.peft_model, int(teacher.config.hidden_size))
        trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        if not trainable:
            raise RuntimeError("okd: the online module has no trainable parameters")
        self.online = _OnlineParams(trainable)
        return self.peft_model

    def trainable_modules(self) -> list[torch.nn.Module]:
        if self.online is None:
            return []
        # The LoRA weights live inside the teacher: a `teacher.requires_grad_(False)` after `prepare` (as the
        # trainer does when `setup` ran earlier) would freeze them, so re-assert here, before the optimizer.
        for p in self.online.parameters():
            p.requires_grad_(True)
        return [self.online]

    def save_artifacts(self, out_dir: Path) -> None:
        if self.peft_model is not None:
            self.peft_model.save_pretrained(str(Path(out_dir) / ARTIFACT_DIR))

    # ---- loss
    def terms(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(L_s, L_t, logs): the student loss (gradient only into the student) and the weighted teacher loss
        (gradient only into the online module), both already divided by `ctx.num_items`."""
        cfg, a = self.cfg, self.args
        ids, am, labels = ctx.batch["input_ids"], ctx.batch["attention_mask"], ctx.batch["labels"]
        s_logits = ctx.student(input_ids=ids, attention_mask=am).logits
        t_logits = ctx.teacher(input_ids=ids, attention_mask=am).logits
        extra = t_logits.shape[1] - ids.shape[1]  # P-tuning: logits of the virtual tokens come first
        if extra:
            t_logits = t_logits[:, extra:]
        _, targets, mask = shifted(s_logits, labels)
        # Both losses are computed per response position, in chunks (kd_core/losses/chunked.py): prompt and
        # padding positions are never computed, and no full B×T×V log-prob tensor is materialised (that
        # elementwise work dominated the step at small model widths).
        positions = prediction_positions(mask)
        rows_b, rows_t = positions.nonzero(as_tuple=True)
        row_targets = targets[rows_b, rows_t]

        # L_s: the divergence with the online teacher's distribution as a constant (gradient: student only)
        student_div = DenseTeacherSignal(t_logits.detach()).divergence(s_logits, positions, cfg.divergence,
                                                                       temperature=cfg.temperature,
                                                                       **cfg.divergence_args)
        # L_t per position: α_t · D_t + (1 − α_t) · CE, the student's distribution a constant (online module only)
        div = get_divergence(cfg.divergence)
        params = div.resolve_params(**cfg.divergence_args)
        s_const = s_logits.detach()
        sums = {"kd": 0.0, "ce": 0.0}
        c_tau = temperature_factor(a.temperature_scale, cfg.temperature)  # eq. 2's τ² (or 1)

        def teacher_rows(x: torch.Tensor, sl: slice) -> torch.Tensor:
            t_v, s_v = shared_vocab(x, s_const[rows_b[sl], rows_t[sl]])
            t_lp, s_lp = logprobs(t_v, cfg.temperature), logprobs(s_v, cfg.temperature)
            d_t = div.fn(t_lp, s_lp, **params) if a.teacher_direction == "swapped" else div.fn(s_lp, t_lp, **params)
            full_lp = t_lp if cfg.temperature == 1.0 and t_v.shape[-1] == x.shape[-1] else logprobs(x)
            ce = -full_lp.gather(-1, row_targets[sl].unsqueeze(-1)).squeeze(-1)
            sums["kd"] += float(d_t.detach().sum())
            sums["ce"] += float(ce.detach().sum())
            return a.teacher_kl_weight * c_tau * d_t + (1 - a.teacher_kl_weight) * ce

        teacher_loss = chunked_rows(t_logits, positions, teacher_rows)
        n_tokens = max(int(rows_b.numel()), 1)

        loss_s = (1 - cfg.alpha) * c_tau * reduce_tokens(student_div, positions, ctx.num_items)
        logs = {"okd_student_kd": float(reduce_tokens(student_div.detach(), positions)),
                "okd_teacher_kd": sums["kd"] / n_tokens, "okd_teacher_ce": sums["ce"] / n_tokens}
        if cfg.alpha > 0:
            ce = token_ce(s_logits[:, :-1], targets)
            loss_s = loss_s + cfg.alpha * reduce_tokens(ce, mask, ctx.num_items)
            logs["ce"] = float(reduce_tokens(ce.detach(), mask))
        loss_t = a.teacher_loss_weight * reduce_tokens(teacher_loss, positions, ctx.num_items)
        # token means (like the other logged terms), not the num_items-normalised micro-batch shares
        logs["okd_student"] = (1 - cfg.alpha) * c_tau * logs["okd_student_kd"] + cfg.alpha * logs.get("ce", 0.0)
        logs["okd_teacher"] = a.teacher_loss_weight * (a.teacher_kl_weight * c_tau * logs["okd_teacher_kd"]
                                                      + (1 - a.teacher_kl_weight) * logs["okd_teacher_ce"])
        return loss_s, loss_t, logs

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        loss_s, loss_t, logs = self.terms(ctx)
        return LossOutput(loss_s + loss_t, logs)
