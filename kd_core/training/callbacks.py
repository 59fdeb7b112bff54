"""The Trainer callbacks of `kd_core.training.trainer.train`: the method's extra trainable modules (their gradients,
optimizer and checkpoint files), metrics and the progress bar, cancellation (`StopAtNextStep`, see
kd_core/training/interrupts.py) and the fault hooks of the tests (kd_core/faults.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from kd_core.faults import TrainingFaults
from kd_core.training.interrupts import cancel_requested
from kd_core.io import write_checksums
from kd_core.methods.base import Method
from kd_core.progress import Progress

EXTRA_MODULES_FILE = "extra_modules.pt"


class ExtraModulesStep(TrainerCallback):
    """The gradients of the method's extra trainable modules (OKD's online module, hidden-state projections).

    The Trainer clears the student's gradients only: the extras' are cleared here after every optimizer step
    (else they would accumulate across steps). DDP and DeepSpeed reduce the student's gradients only: in a
    multi-process run the extras' are averaged over the ranks before the optimizer step, so every rank
    applies the same update to its replica. DeepSpeed's ZeRO optimizer takes only parameters of the engine's
    module, so there the extras get their own AdamW (the Trainer's betas/eps, no weight decay, no clipping:
    as in the single-process param group) stepped at the Trainer's learning rate of the step.
    """

    def __init__(self, method: Method, args: TrainingArguments, own_optimizer: bool):
        self.params = [p for m in method.trainable_modules() for p in m.parameters() if p.requires_grad]
        self.optimizer = None
        if own_optimizer and self.params:
            self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                               eps=args.adam_epsilon, weight_decay=0.0)

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        if args.world_size > 1:
            for p in self.params:
                if p.grad is not None:  # SUM then divide: gloo has no AVG
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(args.world_size)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_scheduler.get_last_lr()[0]
            self.optimizer.step()

    def on_step_end(self, args, state, control, **kwargs):
        for p in self.params:
            p.grad = None


class MetricsCallback(TrainerCallback):
    def __init__(self, on_log=None):
        self.history: list[dict] = []
        self.on_log_fn = on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:  # one copy of the metrics (MLflow), from rank 0
            entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            self.history.append(entry)
            if self.on_log_fn:
                self.on_log_fn(entry)


class ProgressBar(TrainerCallback):
    """Steps on the stage's progress bar (kd_core.progress.Progress), not the Trainer's bar and printed log dicts."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = Progress(state.max_steps, "steps") if state.is_world_process_zero else None

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update_to(state.global_step)  # (a resumed run starts at its checkpoint's step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class ExtraModulesCheckpoint(TrainerCallback):
    """Trainer checkpoints hold the student, optimizer, scheduler and RNG states, not the method's extra
    trainable modules (OKD's online module, `intermediate`'s projections). Save their weights, and the state
    of their own optimizer when they have one (DeepSpeed: `ExtraModulesStep`), into every checkpoint, so a
    resumed run continues them instead of restarting them from their initialisation. (In one process their
    Adam moments are in the Trainer's optimizer.pt already: they are a param group of that optimizer.)"""

    def __init__(self, modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer | None = None):
        self.modules = modules
        self.optimizer = optimizer

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # the modules are replicated: rank 0's copy is everyone's
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tmp = folder / f".{EXTRA_MODULES_FILE}.tmp"
        torch.save({"modules": [m.state_dict() for m in self.modules],
                    "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}, tmp)
        os.replace(tmp, folder / EXTRA_MODULES_FILE)  # its presence marks the checkpoint complete

    def load(self, checkpoint: Path) -> None:
        saved = torch.load(checkpoint / EXTRA_MODULES_FILE, map_location="cpu", weights_only=True)
        for module, state in zip(self.modules, saved["modules"], strict=True):
            module.load_state_dict(state)
        if self.optimizer is not None and saved["optimizer"] is not None:
            self.optimizer.load_state_dict(saved["optimizer"])


class ChecksumCheckpoint(TrainerCallback):
    """The sha256 of every file of a checkpoint, written last into it (kd_core.io.write_checksums): a resume
    verifies them and falls back to the previous checkpoint when a file was truncated or corrupted since."""

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank has written its part of the checkpoint
        if state.is_world_process_zero:
            write_checksums(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _all_ranks_agree(flag: bool, world_size: int) -> bool:
    """True on every rank when it is True on any (ranks may receive SIGTERM a step apart)."""
    if world_size <= 1:
        return flag
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopAtNextStep(TrainerCallback):
    """On cancellation: save a checkpoint at the end of the current optimizer step and stop training."""

    def __init__(self):
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if _all_ranks_agree(cancel_requested(), args.world_size):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class FaultHooks(TrainerCallback):
    """The tests' fault hooks on this model folder (kd_core/faults.py; nothing outside the tests). Added after
    every other callback but `StopAtNextStep`: a checkpoint is complete when they act on it, and a SIGTERM at a
    step's end is seen by `StopAtNextStep` at that step."""

    def __init__(self, out_dir: Path):
        self.faults = TrainingFaults(out_dir)

    def on_step_end(self, args, state, control, **kwargs):
        self.faults.step_end(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.faults.checkpoint_saved(state.global_step, args.world_size, args.process_index)
