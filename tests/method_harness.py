"""A tiny distillation setup for method tests: built-in data, a BPE tokenizer, a briefly trained teacher,
and helpers to run any registered method a few steps through the real trainer.

Cached per process: building it takes a few seconds.
"""

from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_core.config import ArchConfig, StudentConfig, TrainingConfig
from kd_core.data.builtin import generate_builtin
from kd_core.data.split import split_rows
from kd_core.data.template import format_prompt
from kd_core.data.tokenize import IGNORE_INDEX, CausalCollator, EncodedDataset, encode_rows, train_bpe_tokenizer
from kd_core.methods import StepContext, get_method
from kd_core.models.build import build_from_config
from kd_core.teachers.source import LiveTeacher
from kd_core.training.trainer import train

TEMPLATE = "minimal"
MAX_LENGTH = 48


@dataclass
class TinySetup:
    tokenizer: object
    train_set: EncodedDataset
    val_set: EncodedDataset
    teacher: torch.nn.Module
    workdir: Path

    def student(self, seed: int = 1, n_layer: int = 1, hidden: int = 32, arch: str = "gpt2") -> torch.nn.Module:
        return build_from_config(ArchConfig(arch=arch, n_layer=n_layer, hidden=hidden, n_head=2), self.tokenizer,
                                 n_positions=MAX_LENGTH + 16, seed=seed)

    def val_batches(self, batch_size: int = 16) -> list[dict]:
        collate = CausalCollator(self.tokenizer.pad_token_id)
        items = [self.val_set[i] for i in range(len(self.val_set))]
        return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


@functools.lru_cache(maxsize=1)
def tiny_setup() -> TinySetup:
    rows = generate_builtin(400, seed=0)
    splits = split_rows(rows, 0.15, 0.0, seed=0)
    tok = train_bpe_tokenizer((format_prompt(r, TEMPLATE) + r["response"] for r in splits["train"]), vocab_size=400)
    train_set, _ = encode_rows(splits["train"], tok, TEMPLATE, MAX_LENGTH, "truncate")
    val_set, _ = encode_rows(splits["val"][:48], tok, TEMPLATE, MAX_LENGTH, "truncate")
    workdir = Path(tempfile.mkdtemp(prefix="kd-method-tests-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    teacher = build_from_config(ArchConfig(n_layer=2, hidden=64, n_head=2), tok, n_positions=MAX_LENGTH + 16, seed=0)
    cfg = TrainingConfig(max_steps=30, learning_rate=3e-3, batch_size=16, warmup_ratio=0.0, logging_steps=10)
    train(teacher, train_set, tok, cfg, workdir / "teacher", method=get_method("sft")(None), seed=0, save=False)
    return TinySetup(tok, train_set, val_set, teacher.cpu().eval(), workdir)  # (trained on a GPU if there is one)


def student_config(method: str, **fields) -> StudentConfig:
    """A StudentConfig for a method (validated like params.yaml would be)."""
    body = {"name": "s", "method": method, "model": {"config": {"n_layer": 1, "hidden": 32, "n_head": 2}}} | fields
    return StudentConfig.model_validate(body)


@torch.no_grad()
def method_loss(method, student, teacher, batches, tokenizer, seed: int = 0) -> float:
    """The method's own objective on fixed batches (token mean), evaluation mode, fixed RNG."""
    torch.manual_seed(seed)
    student.eval()
    device = next(student.parameters()).device  # the trainer moves the models to the GPU if there is one
    total = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        ctx = StepContext(student=student, batch=batch, num_items=batch["labels"][:, 1:].ne(IGNORE_INDEX).sum(),
                          teacher=teacher, tokenizer=tokenizer, progress=0.5, state={})
        total += float(method.compute_loss(ctx).loss)
    return total / len(batches)


def run_method(sc: StudentConfig, steps: int = 12, student: torch.nn.Module | None = None, seed: int = 0):
    """Train a fresh student with the method for a few steps through the real trainer, against a copy of
    the cached teacher (methods such as OKD modify the teacher they are given).

    Returns (method, student, teacher_in_use, loss_before, loss_after), losses on the validation batches.
    """
    setup = tiny_setup()
    student = student or setup.student()
    method = get_method(sc.method)(sc, sc.method_args)
    teacher = copy.deepcopy(setup.teacher) if method.needs_teacher else None
    teacher_in_use = method.setup(student, teacher)
    batches = setup.val_batches()
    before = method_loss(method, student, teacher_in_use, batches, setup.tokenizer)
    cfg = TrainingConfig(max_steps=steps, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0, logging_steps=steps)
    train(student, setup.train_set, setup.tokenizer, cfg, setup.workdir / f"student-{sc.method}", method=method,
          seed=seed, teacher=LiveTeacher(teacher) if teacher is not None else None, save=False)
    after = method_loss(method, student, teacher_in_use, batches, setup.tokenizer)
    return method, student, teacher_in_use, before, after


def assert_student_grads(method, student, teacher, progress: float = 0.5) -> None:
    """Finite and nonzero student gradients from the method's loss on one validation batch (on the
    student's device: after training that is the GPU, if there is one)."""
    student.train()
    student.zero_grad()
    device = next(student.parameters()).device
    batch = {k: v.to(device) for k, v in tiny_setup().val_batches()[0].items()}
    ctx = StepContext(student=student, batch=batch, num_items=batch["labels"][:, 1:].ne(IGNORE_INDEX).sum(),
                      teacher=teacher, progress=progress)
    method.compute_loss(ctx).loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def padded_batch(ids: torch.Tensor, prompt_len: int = 4, pad_row: int = 1, pad_from: int = 9) -> dict[str, torch.Tensor]:
    """A right-padded batch of `ids` [B,T]: row `pad_row` padded from `pad_from`, labels IGNORE_INDEX on the first
    `prompt_len` positions (the prompt) and on padding."""
    attention = torch.ones_like(ids)
    attention[pad_row, pad_from:] = 0
    labels = ids.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    labels[attention == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


class Interrupted(Exception):
    """Stands in for a preempted machine in process (the SIGKILL tests in test_resume.py cover a real kill)."""


def interrupt_at(method, step: int):
    """`method` with its loss replaced by one that raises `Interrupted` when the trainer reaches optimizer step
    `step` (after the checkpoints of the earlier steps are written); returns `method`."""
    compute = method.compute_loss

    def interrupted(ctx):
        if ctx.trainer.state.global_step == step:
            raise Interrupted
        return compute(ctx)
    method.compute_loss = interrupted
    return method
