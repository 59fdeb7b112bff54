"""Training: one `transformers.Trainer` subclass that asks a distillation method for the loss.

Checkpoints, gradient accumulation, schedules, progress bars and the DeepSpeed integration come from the
Trainer. Loss normalisation: the Trainer counts the response tokens of the whole accumulated batch
(`num_items_in_batch`, summed across ranks); methods divide token sums by it, so micro-batch losses add
up to the exact token mean of the accumulated batch whatever the padding.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from kd_core.config import TrainingConfig
from kd_core.data.tokenize import IGNORE_INDEX, CausalCollator, EncodedDataset
from kd_core.io import atomic_dir
from kd_core.methods.base import Method, StepContext


class TrainingDiverged(RuntimeError):
    """A NaN or inf loss: the message has the step, the batch shape and the loss terms."""


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    wall_time_s: float
    final_loss: float
    history: list[dict]
    teacher_forward_passes: int
    generated_tokens: int


class DistillationTrainer(Trainer):
    def __init__(self, *args, method: Method, teacher: PreTrainedModel | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.teacher = teacher
        self.method_state: dict = {}
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        self.teacher_forward_passes = 0
        self.generated_tokens = 0  # on-policy methods add what they generate (cost reporting)
        # Our losses are normalised by num_items_in_batch: have the Trainer count it and not rescale.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is None:  # e.g. called outside the training loop
            num_items_in_batch = inputs["labels"][:, 1:].ne(IGNORE_INDEX).sum()
        max_steps = max(self.state.max_steps, 1)
        ctx = StepContext(student=model, batch=inputs, num_items=num_items_in_batch, teacher=self.teacher,
                          tokenizer=self.processing_class, progress=self.state.global_step / max_steps,
                          state=self.method_state, trainer=self)
        out = self.method.compute_loss(ctx)
        if self.teacher is not None:
            self.teacher_forward_passes += inputs["input_ids"].shape[0]
        loss = out.loss
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(
                f"non-finite loss {loss.item()} at step {self.state.global_step} "
                f"(batch {tuple(inputs['input_ids'].shape)}, terms {out.logs})")
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        for key, value in out.logs.items():
            self._term_sums[key] = self._term_sums.get(key, 0.0) + value
        self._term_count += 1
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._term_count and "loss" in logs:
            logs.update({k: round(v / self._term_count, 6) for k, v in self._term_sums.items()})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        extra = [p for m in self.method.trainable_modules() for p in m.parameters() if p.requires_grad]
        optimizer = super().create_optimizer(*args, **kwargs)
        if extra:
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer


class _ZeroExtraGrads(TrainerCallback):
    """The Trainer clears the model's gradients only; clear the whole optimizer's (extra modules such as
    OKD's online module or hidden-state projections are in it) after every optimizer step."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)


class _MetricsCallback(TrainerCallback):
    def __init__(self, on_log=None):
        self.history: list[dict] = []
        self.on_log_fn = on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            self.history.append(entry)
            if self.on_log_fn:
                self.on_log_fn(entry)


CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint written in full. A process killed while saving leaves a partial folder: it is
    removed, and training resumes from the one before."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.iterdir() if p.name.startswith("checkpoint-") and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    for ckpt in found:
        has_weights = any(ckpt.glob("*.safetensors"))
        if has_weights and all((ckpt / f).is_file() for f in CHECKPOINT_FILES) and any(ckpt.glob("rng_state*.pth")):
            return ckpt
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def training_arguments(cfg: TrainingConfig, out_dir: Path, seed: int, epochs: float | None = None,
                       learning_rate: float | None = None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=epochs if epochs is not None else cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=learning_rate if learning_rate is not None else cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler,
        seed=seed,
        data_seed=seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        deepspeed=cfg.deepspeed,
        disable_tqdm=False,
    )


def train(model: PreTrainedModel, dataset: EncodedDataset, tokenizer, cfg: TrainingConfig, out_dir: Path, *,
          method: Method, seed: int, teacher: PreTrainedModel | None = None, epochs: float | None = None,
          learning_rate: float | None = None, on_log=None, save=True) -> TrainResult:
    """Train `model` with `method` and save it (safetensors + tokenizer) to `out_dir` atomically.

    Checkpoints (if `cfg.save_steps`) go to `out_dir.parent/.<name>-checkpoints`; a run started again
    resumes from the latest one.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir.parent / f".{out_dir.name}-checkpoints"
    args = training_arguments(cfg, ckpt_dir, seed, epochs, learning_rate)
    callback = _MetricsCallback(on_log)
    if teacher is not None:
        teacher.to(args.device).eval().requires_grad_(False)
    teacher = method.setup(model, teacher)
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=CausalCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, method=method, teacher=teacher, callbacks=[callback, _ZeroExtraGrads()])
    resume = last_complete_checkpoint(ckpt_dir)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - start
    if save and trainer.is_world_process_zero():
        with atomic_dir(out_dir) as tmp:
            trainer.save_model(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            method.save_artifacts(tmp)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the final model supersedes resume checkpoints
    final = output.training_loss if output.training_loss is not None else math.nan
    return TrainResult(out_dir, output.global_step, wall, float(final), callback.history,
                       trainer.teacher_forward_passes, trainer.generated_tokens)
