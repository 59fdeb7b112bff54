"""Training: one `transformers.Trainer` subclass that asks a distillation method for the loss.

Checkpoints, gradient accumulation, schedules, progress bars and the DeepSpeed integration come from the
Trainer. Loss normalisation: the Trainer counts the response tokens of the whole accumulated batch
(`num_items_in_batch`, summed across ranks); methods divide token sums by it, so micro-batch losses add
up to the exact token mean of the accumulated batch whatever the padding.

This module owns device placement (student by the Trainer; teacher, the method's extra trainable modules
and the cached teacher rows here) and the extra modules' gradients (reduced across ranks, cleared after
every optimizer step); methods never move tensors or clear gradients themselves.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainingArguments

from kd_core.config import TrainingConfig
from kd_core.data.tokenize import IGNORE_INDEX, CausalCollator, EncodedDataset
from kd_core.io import atomic_dir, checksum_problem, write_failure
from kd_core.training.callbacks import (EXTRA_MODULES_FILE, ChecksumCheckpoint, ExtraModulesCheckpoint,
                                        ExtraModulesStep, FaultHooks, MetricsCallback, ProgressBar, StopAtNextStep)
from kd_core.errors import Cancelled, TrainingDiverged
from kd_core.methods.base import Method, StepContext
from kd_core.models.adapters import is_peft, save_merged

if TYPE_CHECKING:
    from kd_core.teachers.source import TeacherSource


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
    """Asks `method` for each micro-batch's loss; the step context's teacher is `teacher`, a
    :class:`~kd_core.teachers.source.TeacherSource` (its signal for the batch, its model where it has one)."""

    def __init__(self, *args, method: Method, teacher: TeacherSource | None = None, **kwargs):
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
        ctx = StepContext(student=model, batch=inputs, num_items=num_items_in_batch, teacher_source=self.teacher,
                          tokenizer=self.processing_class,
                          progress=self.state.global_step / max_steps, state=self.method_state, trainer=self)
        out = self.method.compute_loss(ctx)
        live = len(self.teacher.live_models) if self.teacher is not None else 0
        self.teacher_forward_passes += live * inputs["input_ids"].shape[0]
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
        if self.optimizer is not None:  # built already: under DeepSpeed, deepspeed_init asks first, the loop again
            return self.optimizer
        extra = [p for m in self.method.trainable_modules() for p in m.parameters() if p.requires_grad]
        optimizer = super().create_optimizer(*args, **kwargs)
        if extra and not self.is_deepspeed_enabled:  # (under DeepSpeed: ExtraModulesStep has their optimizer)
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer


log = logging.getLogger("kd")

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _is_complete(ckpt: Path, extra_files: tuple[str, ...]) -> bool:
    """The Trainer writes `trainer_state.json` last (after weights, optimizer, scheduler and RNG states).
    Under DeepSpeed the weights and the optimizer shards of every rank are in `global_step<N>/`, and the
    `latest` file naming that folder is written once all ranks have saved theirs; without DeepSpeed they are
    `*.safetensors` and `optimizer.pt` beside `scheduler.pt`."""
    if not all((ckpt / f).is_file() for f in ("trainer_state.json", *extra_files)) \
            or not any(ckpt.glob("rng_state*.pth")):
        return False
    latest = ckpt / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        return bool(tag) and (ckpt / tag).is_dir()
    return any(ckpt.glob("*.safetensors")) and all((ckpt / f).is_file() for f in ("optimizer.pt", "scheduler.pt"))


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders, newest first."""
    return sorted((p for p in ckpt_dir.iterdir() if p.name.startswith("checkpoint-") and p.name[11:].isdigit()),
                  key=lambda p: int(p.name[11:]), reverse=True) if ckpt_dir.is_dir() else []


def last_complete_checkpoint(ckpt_dir: Path, extra_files: tuple[str, ...] = ()) -> Path | None:
    """The newest checkpoint written in full (with `extra_files` too), in the Trainer's layout or DeepSpeed's,
    whose files match their checksums (`ChecksumCheckpoint`). A process killed while saving leaves a partial
    folder, a disk fault a truncated or corrupted file: either is removed (the latter with a warning naming the
    file), and training resumes from the one before."""
    for ckpt in _checkpoints(ckpt_dir):
        if _is_complete(ckpt, extra_files):
            problem = checksum_problem(ckpt)
            if problem is None:
                return ckpt
            step = int(ckpt.name[11:])
            older = next((p.name for p in _checkpoints(ckpt_dir) if int(p.name[11:]) < step), None)
            log.warning("checkpoint %s is damaged: %s; removed, resuming from %s", ckpt, problem,
                        older or "the start (no earlier checkpoint)")
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
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        disable_tqdm=True,  # no Trainer bar or printed log dicts: our ProgressBar (kd_core.training.callbacks)
    )


def zero3_inference_engine(teacher: PreTrainedModel, accelerator) -> torch.nn.Module:
    """The frozen teacher sharded across ranks with ZeRO-3 (each rank holds 1/world of its weights, gathered
    layer by layer during the forward), as TRL's `prepare_deepspeed` does for reference models: the training
    DeepSpeed config without optimizer sections, the "auto" bucket sizes set from the teacher's width.
    Its forward is a collective: every rank must call it equally often (they do: same steps, same batches)."""
    import deepspeed

    ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = ds_config["zero_optimization"]  # stage 3: TrainingConfig validates teacher_sharding against the file
    hidden = int(teacher.config.hidden_size)
    zero.update(reduce_bucket_size=hidden * hidden, stage3_param_persistence_threshold=10 * hidden,
                stage3_prefetch_bucket_size=int(0.9 * hidden * hidden))
    zero.pop("offload_optimizer", None)
    for key in ("optimizer", "scheduler"):
        ds_config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()  # (DeepSpeedEngine.eval returns None, not the engine)
    return engine


def _save_final(trainer: DistillationTrainer, out_dir: Path, tokenizer, method: Method) -> None:
    """Every rank calls `save_model` (ZeRO-3 gathers the sharded weights collectively); rank 0 writes into a
    temporary folder that replaces `out_dir` once all ranks are done (nothing half-written is ever visible).
    A LoRA model (peft; never under ZeRO-3, which config validation refuses) is saved by rank 0 alone, merged, with
    its adapter in `adapter/` (`kd_core.models.adapters.save_merged`)."""
    from accelerate.utils import broadcast_object_list

    main = trainer.is_world_process_zero()
    with atomic_dir(out_dir) if main else contextlib.nullcontext() as tmp:
        folder = [str(tmp) if main else None]
        if trainer.args.world_size > 1:
            broadcast_object_list(folder)  # ranks that write shards (ZeRO-3 without gathering) need the path
        if is_peft(trainer.model):
            if main:
                save_merged(trainer.model, Path(folder[0]))
        else:
            trainer.save_model(folder[0])
        if main:
            tokenizer.save_pretrained(folder[0])
            method.save_artifacts(Path(folder[0]))
        trainer.accelerator.wait_for_everyone()


def _checkpoint_write_failed(err: BaseException, trainer: DistillationTrainer, ckpt_dir: Path):
    """A write that failed during training (a checkpoint, on a full disk) as one `WriteFailed` naming the
    checkpoint; its partial folder is removed (the previous checkpoint is what a rerun resumes from)."""
    ckpt = ckpt_dir / f"checkpoint-{trainer.state.global_step}"
    failed = write_failure(err, ckpt)
    if failed is None:
        return None
    if trainer.is_world_process_zero():
        shutil.rmtree(ckpt, ignore_errors=True)
    previous = next((p for p in _checkpoints(ckpt_dir) if p != ckpt), None)
    failed.args = (f"{ckpt}: cannot write ({failed.reason}); checkpoint not saved, "
                   + (f"{previous.name} is intact: free space and run the stage again to resume from it" if previous
                      else "no earlier checkpoint: free space and run the stage again"),)
    return failed


def _place_method_modules(method: Method, teacher: torch.nn.Module | None, device: torch.device) -> None:
    """Move what the method's `setup` returned or built to the training device, keeping dtypes: the teacher in
    use (a wrapper such as OKD's peft model holds modules outside the teacher) and the extra trainable modules.
    (The Trainer places the student.)"""
    for module in [teacher, *method.trainable_modules()]:
        if module is not None:
            module.to(device)


def train(model: PreTrainedModel, dataset: EncodedDataset, tokenizer, cfg: TrainingConfig, out_dir: Path, *,
          method: Method, seed: int, teacher: TeacherSource | None = None, epochs: float | None = None, learning_rate: float | None = None, on_log=None, save=True,
          data_collator=None) -> TrainResult:
    """Train `model` with `method` and save it (safetensors + tokenizer) to `out_dir` atomically.

    `teacher`: where the teacher's signal comes from (:mod:`kd_core.teachers.source`: a live model, the cache, a
    served teacher, several combined; a top-k only for methods with `reads_teacher_cache`; None for methods
    without a teacher). A method that needs the model itself (OKD, hidden states, generation) gets
    `teacher.model`, after its `prepare`. Checkpoints (if `cfg.save_steps`) go to
    `out_dir.parent/.<name>-checkpoints`; a run started again resumes from the latest one. `data_collator`:
    default `CausalCollator` (a paired data set of a cross-tokenizer method: `kd_core.data.paired.PairedCollator`).
    """
    if teacher is not None and teacher.top_k_only and not method.reads_teacher_cache:
        raise ValueError(f"method {method.name!r} cannot train on {teacher.what}: it needs the live teacher")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir.parent / f".{out_dir.name}-checkpoints"
    args = training_arguments(cfg, ckpt_dir, seed, epochs, learning_rate)
    callback = MetricsCallback(on_log)
    if teacher is not None and teacher.several and cfg.teacher_sharding == "zero3":
        raise ValueError("training.teacher_sharding: 'zero3' shards one teacher; several teachers: use 'replicate'")
    models = [teacher.model, *teacher.live_models] if teacher is not None else []
    for frozen in {id(m): m for m in models if m is not None}.values():
        # frozen: eval mode, no gradients, in no optimizer; a full copy on every rank in the training precision:
        # it needs no fp32 master copy (OKD's online module, added by the method's setup below, is created in
        # fp32 by peft)
        frozen.to(args.device, dtype=PRECISION_DTYPES[cfg.precision]).eval().requires_grad_(False)
    teacher_model = method.setup(model, teacher.model if teacher is not None else None)
    _place_method_modules(method, teacher_model, args.device)
    extras_step = ExtraModulesStep(method, args, own_optimizer=bool(cfg.deepspeed))
    callbacks = [callback, ProgressBar()] + ([extras_step] if extras_step.params else [])
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=data_collator or CausalCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, method=method, teacher=teacher.using(teacher_model) if teacher is not None else None,
        callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # (disable_tqdm's replacement for the bar: a print per log)
    if teacher_model is not None and cfg.teacher_sharding == "zero3":
        if any(p.requires_grad for p in teacher_model.parameters()):
            raise ValueError(f"training.teacher_sharding: 'zero3' shards a frozen teacher, but method "
                             f"{method.name!r} trains parameters inside it (e.g. OKD's online module): use 'replicate'")
        trainer.teacher = trainer.teacher.using(zero3_inference_engine(teacher_model, trainer.accelerator))
    extras = None
    if method.trainable_modules():
        extras = ExtraModulesCheckpoint(method.trainable_modules(), extras_step.optimizer)
        trainer.add_callback(extras)
    trainer.add_callback(ChecksumCheckpoint())  # after every other file of the checkpoint is written
    stop = StopAtNextStep()  # SIGTERM: a checkpoint at the next step boundary, then `Cancelled`
    trainer.add_callback(FaultHooks(out_dir))  # (the tests' fault hooks: nothing outside the tests)
    trainer.add_callback(stop)
    resume = last_complete_checkpoint(ckpt_dir, (EXTRA_MODULES_FILE,) if extras else ())
    if resume:
        log.info("resuming from %s", resume)
    if resume and extras:
        extras.load(resume)
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as err:
        if (failed := _checkpoint_write_failed(err, trainer, ckpt_dir)) is None:
            raise
        raise failed from err
    wall = time.perf_counter() - start
    if stop.stopped_at is not None:
        raise Cancelled(f"{out_dir}: cancelled (SIGTERM) at step {stop.stopped_at}; checkpoint saved in "
                                   f"{ckpt_dir}: run the stage again to resume")
    if save:
        _save_final(trainer, out_dir, tokenizer, method)
    if trainer.is_world_process_zero():
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the final model supersedes resume checkpoints
    trainer.accelerator.wait_for_everyone()  # no rank leaves (and reads outputs) before rank 0 has written them
    final = output.training_loss if output.training_loss is not None else math.nan
    return TrainResult(out_dir, output.global_step, wall, float(final), callback.history,
                       trainer.teacher_forward_passes, trainer.generated_tokens)
