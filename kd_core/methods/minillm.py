"""`minillm`: MiniLLM (Gu et al., ICLR 2024, arXiv:2306.08543): minimise the sequence-level reverse KL
KL(q_θ || p) = E_{y~q_θ} Σ_t KL(q_θ(·|y_<t,x) || p(·|y_<t,x)) (p = teacher, q = student) by policy gradient
on samples of the teacher mixture p̃ = α·p + (1−α)·q_θ (α = `teacher_mix`):

    loss = (1 − α_cfg) · (L_single + L_long − sg[L_long]) + (α_cfg + lm_coef) · CE(references)

with the terms of `minillm_terms`. Simplifications vs. microsoft/LMOps: docs/methods_onpolicy.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kd_core.config.methods import MiniLLMArgs
from kd_core.losses.divergences import rkl
from kd_core.losses.tokens import logprobs, reduce_tokens, shared_vocab
from kd_core.methods.base import LossOutput, StepContext, model_logits, register_method, shifted, token_ce
from kd_core.methods.batches import extract_prompts, generation_batch, reference_token_count
from kd_core.methods.onpolicy import OnPolicyMethod, generation_settings, token_mean_scaled
from kd_core.methods.rollouts import count_generation, sample
from kd_core.teachers.source import teacher_logits


def discounted_future(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, include_current: bool) -> torch.Tensor:
    """Σ_{t' ≥ t (or > t)} γ^{t'−t(−1)} r_t' over valid positions only; [B,T] -> [B,T]. Invalid positions'
    rewards are selected away (torch.where), so NaN/inf there never leak in."""
    r = torch.where(mask, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        if include_current:
            running = r[:, t] + gamma * running
            out[:, t] = running
        else:
            out[:, t] = running
            running = r[:, t] + gamma * running
    return out


def advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, length_norm: bool = True,
               whiten: bool = True, include_current: bool = False) -> torch.Tensor:
    """MiniLLM advantages A_t on [B,T] rewards; 0 at invalid positions; no NaN for any mask (empty rows,
    one-token rows) or any value at invalid positions.

    Whitening scope: A = (R − m) / s with m, s² the mean and variance of R over the valid tokens of *this
    call*, i.e. the micro-batch's own samples (s = sqrt(var + 1e-8)). The samples are generated inside each
    micro-batch's step, so the statistics of the whole accumulated batch are not known when the first
    micro-batch's backward runs. Relative to whitening over the accumulated batch (m, s), the micro-batch k
    (m_k, s_k) gets the affine map A_k = (s / s_k) · A_acc + (m − m_k) / s_k: each micro-batch's advantages
    have mean 0 and variance 1 on their own, and they equal the accumulated ones when all micro-batches have
    the same mean and variance of R (``tests/test_fidelity.py``)."""
    mask = mask.bool()
    rewards = rewards.float()
    ret = discounted_future(rewards, mask, gamma, include_current)
    if length_norm:
        m = mask.float()
        suffix = m.flip(-1).cumsum(-1).flip(-1)  # valid tokens at positions >= t
        count = suffix if include_current else suffix - m
        ret = ret / count.clamp_min(1.0)
    zero = torch.zeros((), dtype=ret.dtype, device=ret.device)
    ret = torch.where(mask, ret, zero)
    n = int(mask.sum())
    if whiten and n > 0:
        mean = ret.sum() / n
        var = torch.where(mask, (ret - mean) ** 2, zero).sum() / n
        ret = torch.where(mask, (ret - mean) * torch.rsqrt(var + 1e-8), zero)
    return ret


@dataclass
class MiniLLMTerms:
    single: torch.Tensor      # [B,T-1] KL(q_t || p_t) (with grad)
    pg: torch.Tensor          # [B,T-1] PPO-clipped surrogate (with grad)
    mask: torch.Tensor        # [B,T-1] supervised (generated) positions
    rewards: torch.Tensor     # [B,T-1] r_t (detached, 0 off the mask)
    advantages: torch.Tensor  # [B,T-1]
    weights: torch.Tensor     # [B,T-1] importance weights w_t (1 without teacher mixing)


def minillm_terms(student_logits: torch.Tensor, teacher_logits_: torch.Tensor, labels: torch.Tensor,
                  args: MiniLLMArgs, temperature: float = 1.0) -> MiniLLMTerms:
    """Per-token MiniLLM terms from full-sequence logits [B,T,V] of a generated batch (labels on the
    generated tokens, EOS included). The teacher's logits must carry no gradient. At temperature τ, on the
    supervised tokens y_t (padding and after-EOS positions never enter a reward, advantage or mean):

        r_t      = log p(y_t|y_<t,x) − log q_θ(y_t|y_<t,x)                              (reward)
        R_{t+1}  = Σ_{t'>t} γ^{t'−t−1} r_t' / #{valid t' > t}              (`advantages`: length-normalised)
        A_t      = whiten(R_{t+1}) over the micro-batch's valid tokens (optional; see `advantages`)
        w_t      = q_θ(y_t|·) / p̃(y_t|·) at `gen_temperature`            (importance weight, detached)
        ρ_t      = exp(log q_θ(y_t) − sg[log q_θ(y_t)]) · w_t
        pg_t     = max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε))                 (PPO clip, ε = `clip_range`)
        single_t = KL(q_θ(·|y_<t,x) || p(·|y_<t,x))                        (exact per-step reverse KL)

    `single_step: false` is the plain policy gradient: R_t then includes r_t.
    """
    s, targets, mask = shifted(student_logits, labels)
    s, t = shared_vocab(s, teacher_logits_[:, :-1])
    targets = targets.clamp(max=s.shape[-1] - 1)
    zero = torch.zeros((), device=s.device)
    lq, lp = logprobs(s, temperature), logprobs(t, temperature)
    single = rkl(lq, lp)
    logq_tok = lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        lp_tok = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        rewards = torch.where(mask, lp_tok - logq_tok.detach(), zero)
        adv = advantages(rewards, mask, gamma=args.gamma, length_norm=args.length_norm, whiten=args.whiten,
                         include_current=not args.single_step)
        if args.teacher_mix > 0:
            a = args.teacher_mix
            lq_g = logprobs(s.detach(), args.gen_temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            lp_g = logprobs(t, args.gen_temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            lmix = torch.logaddexp(lp_g + math.log(a), lq_g + math.log1p(-a))
            w = torch.where(mask, (lq_g - lmix).exp(), zero + 1.0)
        else:
            w = torch.ones_like(rewards)
    ratio = torch.exp(logq_tok - logq_tok.detach()) * w
    eps = args.clip_range
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps, 1.0 + eps))
    return MiniLLMTerms(single, pg, mask, rewards, adv, w)


@register_method("minillm")
class MiniLLM(OnPolicyMethod):
    def make_batch(self, ctx: StepContext) -> tuple[dict[str, torch.Tensor], bool, dict[str, float]]:
        """A right-padded batch of teacher-mixed samples of the micro-batch's prompts (always replaced)."""
        settings = generation_settings(ctx, self.args)
        a = self.args.teacher_mix
        mixture = [(ctx.student, 1.0 - a), (ctx.teacher, a)]
        gen = sample(mixture, extract_prompts(ctx.batch), **settings)
        count_generation(ctx, gen, teacher_generated=a > 0)
        device = ctx.batch["input_ids"].device
        return generation_batch(gen, settings["eos_token_id"], settings["pad_token_id"], device), True, {}

    def loss_on(self, ctx: StepContext, gen_batch: dict[str, torch.Tensor]) -> LossOutput:
        """The MiniLLM loss on a given generated batch (labels on generated tokens); means are
        `token_mean_scaled` (the micro-batch's token mean weighted by its share of reference tokens)."""
        cfg, args = self.cfg, self.args
        s_logits = model_logits(ctx.student, gen_batch)
        t_logits = teacher_logits(ctx.teacher, gen_batch)
        terms = minillm_terms(s_logits, t_logits, gen_batch["labels"], args, cfg.temperature)
        n_ref = reference_token_count(ctx.batch)
        single = token_mean_scaled(terms.single, terms.mask, n_ref, ctx.num_items)
        pg = token_mean_scaled(terms.pg, terms.mask, n_ref, ctx.num_items)
        rl = (single if args.single_step else single.detach()) + (pg - pg.detach())
        mask = terms.mask
        logs = {"rkl": float(reduce_tokens(terms.single.detach(), mask)),
                "reward": float(reduce_tokens(terms.rewards, mask)),
                "pg": float(reduce_tokens(terms.pg.detach(), mask)),
                "iw": float(reduce_tokens(terms.weights, mask)),
                "gen_len": float(mask.sum()) / max(mask.shape[0], 1)}
        loss = (1 - cfg.alpha) * rl if cfg.alpha > 0 else rl
        ce_weight = cfg.alpha + args.lm_coef
        if ce_weight > 0:
            r_logits, r_targets, r_mask = shifted(model_logits(ctx.student, ctx.batch), ctx.batch["labels"])
            ce = token_ce(r_logits, r_targets)
            loss = loss + ce_weight * reduce_tokens(ce, r_mask, ctx.num_items)
            logs["ce"] = float(reduce_tokens(ce.detach(), r_mask))
        return LossOutput(loss, logs)

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        gen_batch, _, logs = self.make_batch(ctx)
        out = self.loss_on(ctx, gen_batch)
        out.logs.update(logs)
        return out
