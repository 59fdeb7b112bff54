"""The method interface and registry.

A method turns one micro-batch into a loss. It declares what it needs (`needs_teacher`), validates its own
`method_args` with a pydantic model, and returns the loss already normalised by the number of response
tokens in the whole gradient-accumulation batch (`ctx.num_items`), so that summing micro-batch losses
gives the token mean over the accumulated batch regardless of padding or micro-batch sizes.

New methods are new modules in this package that use `@register_method`: nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError

from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.losses.tokens import reduce_tokens
from kd_core.teacher import DenseTeacherSignal, TeacherSignal


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StepContext:
    """Everything a method may use for one micro-batch.

    batch: input_ids / attention_mask / labels [B,T] (right padded, labels IGNORE_INDEX off the response).
    num_items: response tokens (labels[:, 1:] != IGNORE_INDEX) in the whole accumulated batch (all ranks).
    teacher: the teacher model (frozen, or wrapped by the method's `prepare`), for methods that need the model
        itself (OKD, hidden states, generation); None when the teacher's signal comes from the cache.
    teacher_signal: the teacher's logits on this batch (:mod:`kd_core.teacher`): the cached top-k when the
        trainer has a teacher cache, else (default) the live teacher's dense logits, computed on first use.
    progress: fraction of training done, in [0, 1] (for schedules).
    """

    student: torch.nn.Module
    batch: dict[str, torch.Tensor]
    num_items: torch.Tensor | int
    teacher: torch.nn.Module | None = None
    teacher_signal: TeacherSignal | None = None
    tokenizer: Any = None
    progress: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)  # per-run scratch space owned by the method
    trainer: Any = None  # the DistillationTrainer (cost counters: teacher_forward_passes, generated_tokens)

    def __post_init__(self) -> None:
        if self.teacher_signal is None and self.teacher is not None:
            teacher, batch = self.teacher, self.batch
            self.teacher_signal = DenseTeacherSignal(lambda: teacher_logits(teacher, batch))


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)  # unnormalised per-term values for logging


class Method:
    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    needs_transfer_set: ClassVar[bool] = False  # trains on model-generated data (`train_data` must name a transfer set)
    # the divergence used when params name none, and (if not None) the only ones the method accepts
    default_divergence: ClassVar[tuple[str, dict]] = ("fkl", {})
    allowed_divergences: ClassVar[frozenset[str] | None] = None
    # reads the teacher only through `ctx.teacher_signal`, so it can train on the teacher-logit cache
    # (`teacher_cache` in params) instead of running the teacher
    reads_teacher_cache: ClassVar[bool] = False
    Args: ClassVar[type[BaseModel]] = NoArgs

    def __init__(self, student_cfg, method_args: dict[str, Any] | None = None):
        self.cfg = student_cfg
        self.args = self.Args.model_validate(method_args or {})

    @classmethod
    def validate_args(cls, method_args: dict[str, Any]) -> None:
        try:
            cls.Args.model_validate(method_args)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            allowed = ", ".join(cls.Args.model_fields) or "none"
            raise ValueError(f"method_args.{key}: {msg} (method {cls.name!r} takes: {allowed})") from None

    def setup(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
        """`prepare` once (later calls return the same teacher): the trainer and tests both call this."""
        if not getattr(self, "_is_setup", False):
            self.teacher_in_use = self.prepare(student, teacher)
            self._is_setup = True
        return self.teacher_in_use

    def prepare(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
        """Called once before training with the frozen teacher (eval mode, no grad); returns the teacher to
        use. A method may wrap it (OKD adds a trainable online module) or build extra modules (projections),
        on any device: the trainer moves the returned teacher and `trainable_modules()` to the training device."""
        return teacher

    def compute_loss(self, ctx: StepContext) -> LossOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Extra modules trained alongside the student (OKD's online module, hidden-state projections).
        Their parameters join the optimizer; only parameters with requires_grad=True are trained. The trainer
        places them, reduces their gradients across ranks and clears them after every optimizer step."""
        return []

    def save_artifacts(self, out_dir: Path) -> None:
        """Write method-specific artifacts next to the saved student (e.g. OKD's trained online module)."""


METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (allowed: {', '.join(sorted(METHODS))})") from None


# ----------------------------------------------------------------------------------------------- shared pieces
def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align next-token predictions with targets: logits[:, :-1] [B,T-1,V], targets [B,T-1], mask [B,T-1]."""
    targets = labels[:, 1:]
    mask = targets.ne(IGNORE_INDEX)
    return logits[:, :-1], targets.clamp(min=0), mask


def prediction_positions(mask: torch.Tensor) -> torch.Tensor:
    """The shifted target mask [B,T-1] (from `shifted`) as a mask over the unshifted logits [B,T]: position t's
    logits predict token t + 1, so the last position predicts nothing. Chunked losses index the logits with
    it directly (no [:, :-1] copy; the gradient buffer has the logits' own shape)."""
    return F.pad(mask, (0, 1), value=False)


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B,T,V] of a causal LM on a batch (input_ids, attention_mask)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def teacher_logits(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen teacher's logits, without building a graph."""
    with torch.no_grad():
        return model_logits(teacher, batch)


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy −log q(target) [B,T] from logits [B,T,V]."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def mix_with_ce(cfg, kd_loss: torch.Tensor, logs: dict[str, float], logits: torch.Tensor, targets: torch.Tensor,
                mask: torch.Tensor, num_items) -> LossOutput:
    """α · CE(references) + (1 − α) · kd_loss with α = `cfg.alpha`; the CE is normalised by `num_items`
    like every loss, and logged (token mean) as `ce`. α = 0 returns the KD loss alone."""
    if cfg.alpha <= 0:
        return LossOutput(kd_loss, logs)
    ce = token_ce(logits, targets)
    logs["ce"] = float(reduce_tokens(ce.detach(), mask))
    return LossOutput(cfg.alpha * reduce_tokens(ce, mask, num_items) + (1 - cfg.alpha) * kd_loss, logs)
