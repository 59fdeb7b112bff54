"""`intermediate`: logit KD combined with hidden-state and attention-map matching.

    loss = α · CE  +  β · KD  +  γ_h · L_hidden  +  γ_a · L_attn

* CE: cross-entropy on the response tokens, α = `alpha` (config field), token mean over N.
* KD: `divergence` (with `divergence_args`, at `temperature`) between teacher p and student q on the
  response tokens, token mean over N; β = `method_args.kd_weight` (default 1 − α, as in `kd`).
* L_hidden = (1/K) Σ_k w_k · mean_pos ℓ(P_k h_s^{(s_k)}, h_t^{(t_k)}) over the K active layer pairs
  (s_k, t_k); ℓ = MSE (mean over the hidden dim) or 1 − cosine; P_k a learned bias-free linear map
  student width → teacher width (one per pair, only when the widths differ unless `projection: always`);
  w_k = `pair_weights[k]` (default 1); γ_h = `hidden_weight`.
* L_attn = (1/K_a) Σ_k w_k · mean_pos (1/H) Σ_h D_a(A_t^{(t_k),h}, A_s^{(s_k),h}) over the active pairs with
  both layers ≥ 1; D_a = `attention_divergence` over key positions with the teacher's map as p and the
  student's as q: default `rkl` = KL(A_s || A_t), the source's (1/H) Σ_h KL(A_s^h || A_t^h);
  `fkl` = KL(A_t || A_s) is MiniLM's direction. Per head when the head counts agree, else on head-averaged
  maps; γ_a = `attention_weight`.

Positions for the intermediate terms (`positions`): `all` = every non-padding position (prompt and response,
default) or `response` = the positions that predict a response token (the KD positions); the mean over them
is scaled by the micro-batch's share of the accumulated batch's response tokens
(:func:`kd_core.losses.intermediate.scaled_position_mean`), so gradient accumulation sums micro-batches
consistently. Layer numbering and map rules: :mod:`kd_core.losses.intermediate`.

The teacher runs without gradients; the projections are `trainable_modules()` (they join the optimizer).
The attention term needs attention probabilities, so `prepare` switches both models to eager attention and
disables the student's attention-probability dropout (the maps must be true distributions).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kd_core.losses.tokens import reduce_tokens
from kd_core.losses.intermediate import (attention_divergence, hidden_state_loss, resolve_layer_map,
                                         scaled_position_mean)
from kd_core.methods.base import (LossOutput, Method, StepContext, prediction_positions, register_method, shifted,
                                  token_ce)
from kd_core.teachers.signal import DenseTeacherSignal


# ----------------------------------------------------------------------------------------------- model helpers
def num_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def hidden_size(model: torch.nn.Module) -> int:
    return int(model.config.hidden_size)


def use_eager_attention(model: torch.nn.Module) -> None:
    """Attention probabilities are only returned by the eager implementation."""
    if getattr(model.config, "_attn_implementation", None) != "eager":
        model.set_attn_implementation("eager")


def disable_attention_dropout(model: torch.nn.Module) -> None:
    """Zero dropout on attention probabilities (GPT-2 `attn_dropout`, Llama-style `attention_dropout`); the
    saved config is left as it is."""
    for module in model.modules():
        drop = getattr(module, "attn_dropout", None)
        if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
            drop.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            module.attention_dropout = 0.0


# ----------------------------------------------------------------------------------------------- method
@register_method("intermediate")
class IntermediateKD(Method):
    def __init__(self, student_cfg, method_args: dict[str, Any] | None = None):
        super().__init__(student_cfg, method_args)
        self.pairs: list[tuple[int, int]] = []
        self.pair_weights: list[float] = []
        self.projections: torch.nn.ModuleList | None = None

    # ---- setup
    def order_pairs(self, pairs: list[tuple[int, int]], weights: list[float]):
        return pairs, weights

    def prepare(self, student, teacher):
        a = self.args
        self.pairs = resolve_layer_map(a.layer_map, num_layers(student), num_layers(teacher), last_k=a.last_k,
                                       include_embeddings=a.include_embeddings)
        weights = list(a.pair_weights) if a.pair_weights is not None else [1.0] * len(self.pairs)
        if len(weights) != len(self.pairs):
            raise ValueError(f"method_args.pair_weights: {len(weights)} weights for {len(self.pairs)} layer pairs "
                             f"{self.pairs}")
        self.pairs, self.pair_weights = self.order_pairs(self.pairs, weights)
        d_s, d_t = hidden_size(student), hidden_size(teacher)
        if a.hidden_weight > 0:
            if a.projection == "never" and d_s != d_t:
                raise ValueError(f"method_args.projection: 'never' but the hidden sizes differ "
                                 f"(student {d_s}, teacher {d_t})")
            if a.projection == "always" or (a.projection == "auto" and d_s != d_t):
                self.projections = torch.nn.ModuleList(  # (the trainer places them with the student)
                    [torch.nn.Linear(d_s, d_t, bias=False) for _ in self.pairs])
                gen = torch.Generator(device="cpu").manual_seed(0)  # same init whatever the global RNG state
                for proj in self.projections:
                    with torch.no_grad():
                        if a.projection_init == "identity":
                            n = min(d_s, d_t)
                            init = torch.zeros(d_t, d_s)
                            init[:n, :n] = torch.eye(n)
                        else:
                            init = torch.nn.init.xavier_uniform_(torch.empty(d_t, d_s), generator=gen)
                        proj.weight.copy_(init)
        if a.attention_weight > 0:
            if not any(s > 0 and t > 0 for s, t in self.pairs):
                raise ValueError(f"attention_weight > 0 but no layer pair has attention maps: {self.pairs}")
            use_eager_attention(student)
            use_eager_attention(teacher)
            disable_attention_dropout(student)
        return teacher

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.projections] if self.projections is not None else []

    # ---- schedule (overridden by `progressive`)
    def active_pairs(self, progress: float) -> list[int]:
        """Indices into `self.pairs` of the pairs matched at this point of training."""
        return list(range(len(self.pairs)))

    def kd_active(self, progress: float) -> bool:
        return True

    # ---- loss
    def _project(self, k: int, h: torch.Tensor) -> torch.Tensor:
        if self.projections is None:
            return h
        proj = self.projections[k]
        return proj(h.to(proj.weight.dtype))  # (fp32 projection; the hidden states may be half precision)

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        cfg, a = self.cfg, self.args
        active = self.active_pairs(ctx.progress)
        hidden_pairs = active if a.hidden_weight > 0 else []
        attn_pairs = ([k for k in active if self.pairs[k][0] > 0 and self.pairs[k][1] > 0]
                      if a.attention_weight > 0 else [])
        kd_weight = (1.0 - cfg.alpha) if a.kd_weight is None else a.kd_weight
        use_kd = kd_weight > 0 and self.kd_active(ctx.progress)

        ids, am, labels = ctx.batch["input_ids"], ctx.batch["attention_mask"], ctx.batch["labels"]
        flags = dict(output_hidden_states=bool(hidden_pairs), output_attentions=bool(attn_pairs))
        s_out = ctx.student(input_ids=ids, attention_mask=am, **flags)
        with torch.no_grad():
            t_out = ctx.teacher(input_ids=ids, attention_mask=am, **flags)

        s_logits, targets, mask = shifted(s_out.logits, labels)
        n_resp_local = mask.sum()
        kd_positions = prediction_positions(mask)
        positions = am.bool() if a.positions == "all" else kd_positions

        loss = s_logits.new_zeros((), dtype=torch.float32)
        logs: dict[str, float] = {"active_pairs": float(len(active))}
        if cfg.alpha > 0:
            ce = token_ce(s_logits, targets)
            loss = loss + cfg.alpha * reduce_tokens(ce, mask, ctx.num_items)
            logs["ce"] = float(reduce_tokens(ce.detach(), mask))
        if use_kd:
            div = DenseTeacherSignal(t_out.logits).divergence(s_out.logits, kd_positions, cfg.divergence,
                                                              temperature=cfg.temperature, **cfg.divergence_args)
            loss = loss + kd_weight * reduce_tokens(div, kd_positions, ctx.num_items)
            logs["kd"] = float(reduce_tokens(div.detach(), kd_positions))
        if hidden_pairs:
            per = 0.0
            for k in hidden_pairs:
                s_l, t_l = self.pairs[k]
                h_s = self._project(k, s_out.hidden_states[s_l])
                per = per + self.pair_weights[k] * hidden_state_loss(h_s, t_out.hidden_states[t_l], a.hidden_loss)
            per = per / len(hidden_pairs)
            loss = loss + a.hidden_weight * scaled_position_mean(per, positions, n_resp_local, ctx.num_items)
            logs["hidden"] = float(scaled_position_mean(per.detach(), positions, 1, 1))
        if attn_pairs:
            per = 0.0
            for k in attn_pairs:
                s_l, t_l = self.pairs[k]
                per = per + self.pair_weights[k] * attention_divergence(
                    s_out.attentions[s_l - 1], t_out.attentions[t_l - 1], divergence=a.attention_divergence,
                    heads=a.attention_heads)
            per = per / len(attn_pairs)
            loss = loss + a.attention_weight * scaled_position_mean(per, positions, n_resp_local, ctx.num_items)
            logs["attention"] = float(scaled_position_mean(per.detach(), positions, 1, 1))
        return LossOutput(loss, logs)


def phase_of(progress: float, n_phases: int) -> int:
    """0-based phase for `progress` in [0, 1] with `n_phases` equal phases (progress 1 is the last phase)."""
    return min(n_phases - 1, max(0, math.floor(float(progress) * n_phases)))
