"""Preflight: the checks a training stage makes before it trains, so that what would fail after an hour of
training (an MLflow server that is down, a read-only or full disk, a student that cannot be compared with its
teacher token by token) fails at once, with one message, and nothing is written or registered.

`preflight()` (the folder, the disk, the models) is called by train_teacher, distill and finetune right after the
models are built and before any MLflow call or training step; the tracking store was checked before the stage
started (`kd_core.tracking.store.check_tracking`). A failure is a `PreflightError`: `kd` exits with status 2, the
Prefect flow does not retry it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kd_core.config import PipelineConfig, TrainingConfig
from kd_core.errors import PreflightError
from kd_core.io import probe_write

# Adam keeps two fp32 moments per parameter: a resume checkpoint is weights + 2x weights (+ small files)
OPTIMIZER_STATE_FACTOR = 2
# Trainer's save_total_limit (kd_core/training/trainer.py); one more is being written when the oldest is deleted
CHECKPOINTS_KEPT = 2
DISK_MARGIN = 1.2


def check_writable(*dirs: Path) -> None:
    for d in dirs:
        try:
            probe_write(Path(d))
        except OSError as err:
            raise PreflightError(f"output folder {d} is not writable ({err.strerror or err})") from None


def checkpoint_bytes(n_parameters: int, training: TrainingConfig, bytes_per_param: int = 4) -> int:
    """Disk a training stage needs at its peak: the resume checkpoints (weights + optimizer state each, up
    to CHECKPOINTS_KEPT + 1 while the oldest is rotated out) when `save_steps` is set, plus the final model
    and its temporary copy (atomic save), with a 20% margin for tokenizer, logs and rounding."""
    weights = n_parameters * bytes_per_param
    need = 2 * weights
    if training.save_steps:
        need += (CHECKPOINTS_KEPT + 1) * weights * (1 + OPTIMIZER_STATE_FACTOR)
    return int(need * DISK_MARGIN)


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(out_dir: Path, n_parameters: int, training: TrainingConfig) -> None:
    need = checkpoint_bytes(n_parameters, training)
    free = shutil.disk_usage(_existing_ancestor(out_dir)).free
    if free < need:
        raise PreflightError(
            f"not enough free disk for {out_dir}: need ~{_gb(need)} ({n_parameters:,} parameters, "
            f"save_steps={training.save_steps}), {_gb(free)} free: free space or set run_dir elsewhere")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def preflight(cfg: PipelineConfig, stage: str, *, model, tokenizer, training: TrainingConfig, out_dir: Path,
              teacher=None, student_source=None, teacher_tokenizer=None) -> None:
    """All checks before a training stage (the tracking store was checked before the stage started); raises one
    `PreflightError` naming the stage and the problem. `teacher_tokenizer`: the teacher's own, for a method that
    distils across tokenizers (each model is checked against its own tokenizer)."""
    from kd_core.models.build import ModelError, check_vocab_compatible, count_parameters

    try:
        check_writable(Path(out_dir).parent, Path(cfg.run_dir) / "train_info")
        if teacher is not None or student_source is not None:
            try:
                check_vocab_compatible(teacher, model, tokenizer, student_source, teacher_tokenizer)
            except ModelError as err:
                raise PreflightError(str(err)) from None
        check_disk(Path(out_dir), count_parameters(model), training)
    except PreflightError as err:
        raise type(err)(f"preflight of {stage}: {err}") from None
