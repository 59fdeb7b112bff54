"""`distillm`: DistiLLM (Ko et al., ICML 2024, arXiv:2402.03898): skew KL on a mix of fixed data and student
generations chosen by an adaptive off-policy scheduler with a replay buffer.

Divergence: the configured one, default (when `divergence` is not set) skl with alpha 0.1, the skew forward
KL KL(p || 0.1·p + 0.9·q); `divergence: srkl` is the skew reverse KL KL(q || 0.1·q + 0.9·p) (p = teacher,
q = student). Per micro-batch, as `finetune.py` of jongwooko/distillm ("adaptive" type):

    φ   = the adaptive threshold (probability of training on student generations), starts at init_threshold
    φ_s = φ · (1 − progress)  [replay_ratio decreasing, default] | φ · 0.5 [constant] | φ · progress [increasing]
    r ~ U(0, 1)
    r < φ_s, or r < φ while the buffer holds fewer than `capacity` sequences
                      -> sample fresh student generations from the prompts, push them to the buffer, train on them
    else r < φ        -> train on a batch drawn uniformly (without replacement) from the replay buffer
    else              -> train on the references (fixed data)

    loss = α · CE(references) + (1 − α) · Σ_{supervised t} D(p || q) / norm          (norm: see `onpolicy`)

Every `eval_interval` training micro-batches the validation proxy (the mean, over the window, of the
student's token-mean CE on each micro-batch's references before its update: DistiLLM evaluates the LM loss
on its dev set) is compared with the reference value L_prev: if proxy ≥ L_prev + loss_eps then
φ ← min(φ + threshold_step, 1) and L_prev ← proxy (DistiLLM moves L_prev only when φ grows). The first
window's proxy initialises L_prev (DistiLLM evaluates once before training). The scheduler and the buffer
live in `ctx.state["distillm"]` and only change while the student is in training mode.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kd_core.losses.divergences import reduce_tokens
from kd_core.methods.base import LossOutput, Method, StepContext, register_method, shifted, token_ce
from kd_core.methods.onpolicy import (Generation, count_generation, distill_on_batch, extract_prompts,
                                      generation_batch, generation_settings, method_divergence, model_logits,
                                      sample)


class DistiLLMArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gen_temperature: float = Field(1.0, gt=0, description="sampling temperature of the student generations")
    max_new_tokens: int = Field(64, ge=1, description="generated tokens per response, EOS included")
    init_threshold: float = Field(0.0, ge=0, le=1, description="initial probability φ of student generations")
    threshold_step: float = Field(0.1, gt=0, le=1, description="increase of φ when the proxy got worse")
    loss_eps: float = Field(0.1, ge=0, description="proxy increase (nats) that counts as getting worse")
    eval_interval: int = Field(100, ge=1, description="training micro-batches per validation-proxy window")
    capacity: int = Field(1000, ge=1, description="replay buffer size (sequences)")
    replay_ratio: Literal["decreasing", "constant", "increasing"] = "decreasing"


@dataclass
class AdaptiveScheduler:
    """DistiLLM's adaptive off-policy scheduler (see the module docstring)."""

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
class DistiLLM(Method):
    needs_teacher = True
    Args = DistiLLMArgs
    default_divergence = ("skl", {"alpha": 0.1})

    def state(self, ctx: StepContext) -> dict:
        st = ctx.state.get("distillm")
        if st is None:
            a = self.args
            st = {"scheduler": AdaptiveScheduler(a.init_threshold, a.threshold_step, a.loss_eps, a.replay_ratio),
                  "buffer": ReplayBuffer(a.capacity), "window": [], "calls": 0}
            ctx.state["distillm"] = st
        return st

    @property
    def effective_divergence(self) -> tuple[str, dict]:
        """(name, params) of the divergence actually used (the method's default unless set explicitly)."""
        return method_divergence(self.cfg)

    def make_batch(self, ctx: StepContext) -> tuple[dict[str, torch.Tensor], bool, str]:
        st = self.state(ctx)
        training = ctx.student.training
        sched, buf = st["scheduler"], st["buffer"]
        if sched.threshold <= 0:
            return ctx.batch, False, "fixed"
        choice = sched.choose(float(torch.rand(())), ctx.progress, len(buf), self.args.capacity)
        if choice == "fixed":
            return ctx.batch, False, choice
        settings = generation_settings(ctx, self.args)
        device = ctx.batch["input_ids"].device
        if choice == "generate":
            gen = sample([(ctx.student, 1.0)], extract_prompts(ctx.batch), **settings)
            count_generation(ctx, gen)
            if training:
                buf.add(gen)
        else:
            gen = buf.sample(ctx.batch["input_ids"].shape[0])
        return generation_batch(gen, settings["eos_token_id"], settings["pad_token_id"], device), True, choice

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        st = self.state(ctx)
        name, params = self.effective_divergence
        batch, replaced, choice = self.make_batch(ctx)
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
        res.out.logs.update({"threshold": sched.threshold, "buffer": float(len(st["buffer"])),
                             "student_data": float(choice != "fixed"), "replayed": float(choice == "replay")})
        return res.out
