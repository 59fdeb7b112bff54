"""The method interface and registry.

A method turns one micro-batch into a loss. What it needs (`needs_teacher`, ...) and the pydantic model of its
`method_args` are its spec in `kd_core.config.methods` (light: params are validated against it without torch),
which `register_method` copies onto the class. It returns the loss already normalised by the number of response
tokens in the whole gradient-accumulation batch (`ctx.num_items`), so that summing micro-batch losses
gives the token mean over the accumulated batch regardless of padding or micro-batch sizes.

A new method is a new module in this package that uses `@register_method`, plus its spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kd_core.config.methods import MethodArgs, get_spec
from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.models.lm import HeadInputs, lm_head_inputs
from kd_core.losses.fused import fused_cross_entropy
from kd_core.losses.tokens import reduce_tokens
from kd_core.teachers.signal import TeacherSignal
from kd_core.teachers.source import LiveTeacher, TeacherSource


@dataclass
class StepContext:
    """Everything a method may use for one micro-batch.

    batch: input_ids / attention_mask / labels [B,T] (right padded, labels IGNORE_INDEX off the response).
    num_items: response tokens (labels[:, 1:] != IGNORE_INDEX) in the whole accumulated batch (all ranks).
    teacher_source: where the teacher's distribution comes from (:mod:`kd_core.teachers.source`: a live model, the
        cache, a served teacher, several combined); default: the live `teacher`.
    teacher: the teacher model (frozen, or wrapped by the method's `prepare`), for methods that need the model
        itself (OKD, hidden states, generation): default `teacher_source.model` (None for the cache or a served
        teacher; with several teachers, the one that samples for on-policy methods: `students.<name>.teacher`).
    teacher_signal: the teacher's signal on this batch (:mod:`kd_core.teachers.signal`): default
        `teacher_source.signal(batch)` (the live teacher's dense logits are computed on first use).
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
    teacher_source: TeacherSource | None = None

    def __post_init__(self) -> None:
        if self.teacher_source is None and self.teacher is not None:
            self.teacher_source = LiveTeacher(self.teacher)
        if self.teacher is None and self.teacher_source is not None:
            self.teacher = self.teacher_source.model
        if self.teacher_signal is None and self.teacher_source is not None:
            self.teacher_signal = self.teacher_source.signal(self.batch)

    def signal_for(self, batch: dict[str, torch.Tensor]) -> TeacherSignal:
        """The teacher's signal on `batch`: this micro-batch's own (`teacher_signal`), or the source's on a batch an
        on-policy method rebuilt from generations (every teacher of the student, combined)."""
        if batch is self.batch and self.teacher_signal is not None:
            return self.teacher_signal
        return self.teacher_source.signal(batch)


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)  # unnormalised per-term values for logging


class Method:
    # set by `register_method` from the method's spec (`kd_core.config.methods.MethodSpec`, which says what each means)
    name: ClassVar[str]
    needs_teacher: ClassVar[bool]
    needs_transfer_set: ClassVar[bool]
    default_divergence: ClassVar[tuple[str, dict]]
    allowed_divergences: ClassVar[frozenset[str] | None]
    reads_teacher_cache: ClassVar[bool]
    cross_tokenizer: ClassVar[bool]
    Args: ClassVar[type[MethodArgs]]

    def __init__(self, student_cfg, method_args: dict[str, Any] | None = None):
        self.cfg = student_cfg
        self.args = self.Args.model_validate(method_args or {})

    @classmethod
    def validate_args(cls, method_args: dict[str, Any]) -> None:
        """ValueError naming the first bad key (the spec's check: `MethodSpec.validate_args`)."""
        get_spec(cls.name).validate_args(method_args)

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
    """Register a method class under `name`, which must have a spec in `kd_core.config.methods`; the class gets
    its flags and `Args` from the spec (their one home)."""
    spec = get_spec(name)

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        for attr in ("needs_teacher", "needs_transfer_set", "default_divergence", "allowed_divergences",
                     "reads_teacher_cache", "cross_tokenizer", "Args"):
            setattr(cls, attr, getattr(spec, attr))
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


def fused_head_inputs(cfg, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> HeadInputs | None:
    """The student's last hidden states and LM head, for the fused losses (`kd_core.losses.fused`), when its config
    asks for them (`fused_lm_head`) and the head is a plain projection (`kd_core.models.lm.lm_head_inputs`); None: use
    `model_logits`."""
    if not getattr(cfg, "fused_lm_head", False):
        return None
    return lm_head_inputs(model, batch["input_ids"], batch["attention_mask"])


def prediction_positions(mask: torch.Tensor) -> torch.Tensor:
    """The shifted target mask [B,T-1] (from `shifted`) as a mask over the unshifted logits [B,T]: position t's
    logits predict token t + 1, so the last position predicts nothing. Chunked losses index the logits with
    it directly (no [:, :-1] copy; the gradient buffer has the logits' own shape)."""
    return F.pad(mask, (0, 1), value=False)


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions [B,T] whose next token is a response token (labels [B,T], IGNORE_INDEX elsewhere):
    `prediction_positions` of `shifted`'s mask, without the logits."""
    return prediction_positions(labels[:, 1:].ne(IGNORE_INDEX))


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B,T,V] of a causal LM on a batch (input_ids, attention_mask)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy −log q(target) [B,T] from logits [B,T,V]."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def mix_with_ce(cfg, kd_loss: torch.Tensor, logs: dict[str, float], logits: torch.Tensor, targets: torch.Tensor,
                mask: torch.Tensor, num_items) -> LossOutput:
    """α · CE(references) + (1 − α) · kd_loss with α = `cfg.alpha`; the CE is normalised by `num_items`
    like every loss, and logged (token mean) as `ce`. α = 0 returns the KD loss alone."""
    if cfg.alpha <= 0:
        return LossOutput(kd_loss, logs)
    return _mixed(cfg, kd_loss, logs, token_ce(logits, targets), mask, num_items)


def mix_with_fused_ce(cfg, kd_loss: torch.Tensor, logs: dict[str, float], student: HeadInputs,
                      labels: torch.Tensor, num_items) -> LossOutput:
    """`mix_with_ce` with the CE of the references (`labels` [B,T]) taken from the student's hidden states and head
    (`fused_cross_entropy`, the logits never formed): the same tokens, normalisation and logs."""
    if cfg.alpha <= 0:
        return LossOutput(kd_loss, logs)
    return _mixed(cfg, kd_loss, logs, *fused_reference_ce(student, labels), num_items)


def fused_reference_ce(student: HeadInputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-position CE [B,T] of the reference tokens (labels [B,T]) from the student's hidden states and head
    (`fused_cross_entropy`: `token_ce` without the logits), and the positions [B,T] it is taken on."""
    positions = response_positions(labels)
    targets = F.pad(labels[:, 1:].clamp(min=0), (0, 1))  # position t predicts token t + 1
    return fused_cross_entropy(student.hidden, student.weight, targets, bias=student.bias, mask=positions), positions


def _mixed(cfg, kd_loss: torch.Tensor, logs: dict[str, float], ce: torch.Tensor, mask: torch.Tensor,
           num_items) -> LossOutput:
    logs["ce"] = float(reduce_tokens(ce.detach(), mask))
    return LossOutput(cfg.alpha * reduce_tokens(ce, mask, num_items) + (1 - cfg.alpha) * kd_loss, logs)
