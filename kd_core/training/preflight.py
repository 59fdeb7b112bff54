"""Preflight: the checks a training stage makes before it trains, so that what would fail after an hour of
training (an MLflow server that is down, a read-only or full disk, a student that cannot be compared with its
teacher token by token) fails at once, with one message, and nothing is written or registered.

`preflight()` (the models' vocabularies, the disk, the folder) is called by train_teacher, distill and finetune once
the models are built, before distill's teacher source (whose cache may take a while to build) and before the stage's
MLflow run and training; the tracking
store was checked before the stage started (`kd_core.tracking.store.check_tracking`). A failure is a
`PreflightError`: `kd` exits with status 2, the Prefect flow does not retry it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from kd_core.config import ModelSource, PipelineConfig, TrainingConfig
from kd_core.config.methods import METHOD_SPECS
from kd_core.data.tokenize import load_tokenizer
from kd_core.errors import ModelError, PreflightError
from kd_core.io import probe_write

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

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


def check_vocab_compatible(teacher: torch.nn.Module | None, student: torch.nn.Module,
                           tokenizer: PreTrainedTokenizerBase, student_source: ModelSource | None = None,
                           teacher_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """The models must cover the run's tokenizer (extra padded embedding rows are fine: losses slice to the
    shared vocabulary, `kd_core.losses.tokens.shared_vocab`), and a student checkpoint must come with
    the run's tokenizer: token-level distillation compares distributions over the same token ids, so a
    different tokenizer is an error, not something to slice. A method that distils across tokenizers gives the
    teacher's own (`teacher_tokenizer`): each model must then cover its own tokenizer, and they may differ."""
    for role, model, tok in (("teacher", teacher, teacher_tokenizer or tokenizer), ("student", student, tokenizer)):
        if model is None:
            continue
        size = model.get_output_embeddings().weight.shape[0]
        if size < len(tok):
            raise ModelError(f"{role} vocabulary ({size}) is smaller than the tokenizer's ({len(tok)}): "
                             + ("it was built for another tokenizer" if teacher_tokenizer is not None
                                else "teacher and student must share a tokenizer"))
    if (student_source is not None and student_source.checkpoint is not None and teacher_tokenizer is None
            and student_source.tokenizer is None):  # (a `tokenizer` key replaces the checkpoint's files)
        _check_same_tokenizer(tokenizer, student_source)


def _check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, source: ModelSource) -> None:
    try:
        own = load_tokenizer(source.checkpoint, source.trust_remote_code, gguf_file=source.gguf_file)
    except (OSError, ValueError):  # no tokenizer files in the checkpoint: the size check is all there is
        return
    run_vocab, own_vocab = tokenizer.get_vocab(), own.get_vocab()
    differ = sorted((i, t) for t, i in run_vocab.items() if own_vocab.get(t) != i)
    if differ:
        i, t = differ[0]
        raise ModelError(f"student checkpoint {source.checkpoint!r} has another tokenizer than the run's (the "
                         f"teacher's): {len(differ)} of {len(run_vocab)} tokens have other ids (e.g. {t!r}: id {i} "
                         f"vs {own_vocab.get(t)}); teacher and student must share a tokenizer, or use a "
                         f"method that distils across tokenizers: {', '.join(_cross_tokenizer_methods())}")


def _cross_tokenizer_methods() -> list[str]:
    return sorted(name for name, spec in METHOD_SPECS.items() if spec.cross_tokenizer)


def preflight(cfg: PipelineConfig, stage: str, *, model, tokenizer, training: TrainingConfig, out_dir: Path,
              n_parameters: int, teacher=None, student_source=None, teacher_tokenizer=None) -> None:
    """All checks before a training stage (the tracking store was checked before the stage started); raises one
    `PreflightError` naming the stage and the problem. `n_parameters`: the model's (what its checkpoints weigh);
    `teacher_tokenizer`: the teacher's own, for a method that distils across tokenizers (each model is checked
    against its own tokenizer)."""
    try:
        if teacher is not None or student_source is not None:
            try:
                check_vocab_compatible(teacher, model, tokenizer, student_source, teacher_tokenizer)
            except ModelError as err:
                raise PreflightError(str(err)) from None
        check_disk(Path(out_dir), n_parameters, training)
        check_writable(Path(out_dir).parent, Path(cfg.run_dir) / "train_info")
    except PreflightError as err:
        raise type(err)(f"preflight of {stage}: {err}") from None
