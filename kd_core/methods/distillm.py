"""`distillm`: DistiLLM (Ko et al., ICML 2024, arXiv:2402.03898): skew KL (default skl, alpha 0.1:
KL(p || 0.1·p + 0.9·q), p = teacher, q = student) on fixed data or student generations, chosen per micro-batch
by an adaptive off-policy scheduler with a replay buffer (`AdaptiveScheduler`, `ReplayBuffer`):

    loss = α · CE(references) + (1 − α) · Σ_{supervised t} D(p || q) / norm   (`onpolicy.token_mean_scaled`)

The scheduler and the buffer live in `ctx.state["distillm"]` and only change while the student is in training
mode. Details and differences from jongwooko/distillm: docs/methods_onpolicy.md.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from kd_core.losses.tokens import reduce_tokens
from kd_core.methods.base import LossOutput, StepContext, model_logits, register_method, shifted, token_ce
from kd_core.methods.batches import extract_prompts, generation_batch
from kd_core.methods.onpolicy import OnPolicyMethod, distill_on_batch, generation_settings
from kd_core.methods.rollouts import Generation, count_generation, sample


@dataclass
class AdaptiveScheduler:
    """DistiLLM's adaptive off-policy scheduler (`finetune.py` of jongwooko/distillm, "adaptive" type).

    φ = `threshold` (probability of training on student generations); for a draw r ~ U(0, 1):

        φ_s = φ · (1 − progress) [replay_ratio decreasing] | φ · 0.5 [constant] | φ · progress [increasing]
        r < φ_s, or r < φ while the buffer holds < capacity sequences   -> "generate" (fresh student samples)
        else r < φ (and the buffer is not empty)                        -> "replay" (a batch from the buffer)
        else                                                            -> "fixed" (the references)

    `update` takes one validation(-proxy) loss L: the first sets L_prev; afterwards L ≥ L_prev + loss_eps
    sets φ ← min(φ + step, 1) and L_prev ← L (L_prev moves only when φ grows).
    """

    threshold: float = 0.0
    step: float = 0.1
    loss_eps: float = 0.1
    replay_ratio: str = "decreasing"
    prev: float | None = None
    history: list[float] = field(default_factory=list)

    def fresh_threshold(self, progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        factor = {"decreasing": 1.0 - p, "constant": 0.5, "increasing": p}[self.replay_ratio]
        return self.threshold * factor

    def choose(self, r: float, progress: float, buffer_len: int, capacity: int) -> str:
        """'generate', 'replay' or 'fixed' for a uniform draw r."""
        if r < self.fresh_threshold(progress) or (r < self.threshold and buffer_len < capacity):
            return "generate"
        if r < self.threshold and buffer_len > 0:
            return "replay"
        return "fixed"

    def update(self, val_loss: float) -> bool:
        """Feed one validation(-proxy) loss; True when φ grew."""
        self.history.append(float(val_loss))
        if self.prev is None:
            self.prev = float(val_loss)
            return False
        if val_loss >= self.prev + self.loss_eps:
            self.threshold = min(self.threshold + self.step, 1.0)
            self.prev = float(val_loss)
            return True
        return False


class ReplayBuffer:
    """The last `capacity` student generations (prompt, tokens, ended), kept on the CPU."""

    def __init__(self, capacity: int):
        self.items: collections.deque = collections.deque(maxlen=capacity)
        self.reused = 0  # sequences served from the buffer

    def __len__(self) -> int:
        return len(self.items)

    def add(self, gen: Generation) -> None:
        self.items.extend(gen.items())

    def sample(self, k: int) -> Generation:
        k = min(k, len(self.items))
        idx = torch.randperm(len(self.items))[:k].tolist()
        self.reused += k
        return Generation.from_items([self.items[i] for i in idx])


@register_method("distillm")
class DistiLLM(OnPolicyMethod):
    """Every `eval_interval` training micro-batches the scheduler is updated with the validation proxy: the
    mean over the window of the student's token-mean CE on each micro-batch's references before its update."""

    def state(self, ctx: StepContext) -> dict:
        st = ctx.state.get("distillm")
        if st is None:
            a = self.args
            st = {"scheduler": AdaptiveScheduler(a.init_threshold, a.threshold_step, a.loss_eps, a.replay_ratio),
                  "buffer": ReplayBuffer(a.capacity), "window": [], "calls": 0}
            ctx.state["distillm"] = st
        return st

    def make_batch(self, ctx: StepContext) -> tuple[dict[str, torch.Tensor], bool, dict[str, float]]:
        """The micro-batch of the scheduler's choice; logs `student_data` (1 unless the references were kept)
        and `replayed` (1 for a batch from the replay buffer)."""
        st = self.state(ctx)
        sched, buf = st["scheduler"], st["buffer"]
        choice = "fixed"
        if sched.threshold > 0:
            choice = sched.choose(float(torch.rand(())), ctx.progress, len(buf), self.args.capacity)
        logs = {"student_data": float(choice != "fixed"), "replayed": float(choice == "replay")}
        if choice == "fixed":
            return ctx.batch, False, logs
        settings = generation_settings(ctx, self.args)
        if choice == "generate":
            gen = sample([(ctx.student, 1.0)], extract_prompts(ctx.batch), **settings)
            count_generation(ctx, gen)
            if ctx.student.training:
                buf.add(gen)
        else:
            gen = buf.sample(ctx.batch["input_ids"].shape[0])
        device = ctx.batch["input_ids"].device
        return generation_batch(gen, settings["eos_token_id"], settings["pad_token_id"], device), True, logs

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        st = self.state(ctx)
        name, params = self.effective_divergence
        batch, replaced, logs = self.make_batch(ctx)
        res = distill_on_batch(ctx, self.cfg, batch, replaced=replaced, divergence=name, divergence_args=params,
                               want_reference_ce=True)
        sched = st["scheduler"]
        if ctx.student.training:
            proxy = res.reference_ce
            if proxy is None:  # the references were not run through the student: one no-grad forward
                with torch.no_grad():
                    logits, targets, mask = shifted(model_logits(ctx.student, ctx.batch), ctx.batch["labels"])
                    proxy = float(reduce_tokens(token_ce(logits, targets), mask))
            st["window"].append(proxy)
            st["calls"] += 1
            if st["calls"] % self.args.eval_interval == 0:
                sched.update(sum(st["window"]) / len(st["window"]))
                st["window"] = []
        res.out.logs.update({"threshold": sched.threshold, "buffer": float(len(st["buffer"])), **logs})
        return res.out
