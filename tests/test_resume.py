"""A training stage killed with SIGKILL resumes from its last complete checkpoint, and one cancelled with SIGTERM
stops at the next step with a checkpoint (exit 143) and resumes from it; both end with the same weights as an
uninterrupted run (CPU, fixed seed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_core.config import load_config
from kd_core.faults import DIE_AFTER_CHECKPOINT_ENV, SIGTERM_AT_STEP_ENV
from kd_core.run import RunPaths
from kd_core.stages.prepare import prepare
from kd_core.stages.train_teacher import train_teacher
from kd_core.faults import DIE_AFTER_CHECKPOINT_ENV, SIGTERM_AT_STEP_ENV
from kd_core.teachers.source import LiveTeacher
from kd_core.training.trainer import last_complete_checkpoint
from tests.conftest import tiny_params, write_params

KD = str(Path(sys.executable).with_name("kd"))


def _params():
    p = tiny_params()
    p["teacher"]["model"]["config"].update(n_layer=2, hidden=64)
    p["teacher"]["training"] = {"max_steps": 40, "save_steps": 5, "batch_size": 16, "learning_rate": 0.003,
                                "warmup_ratio": 0.0, "logging_steps": 5}
    return p


def _same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(a_dir / "runs/tiny/models/teacher/model.safetensors")
    b = load_file(b_dir / "runs/tiny/models/teacher/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_sigkill_or_sigterm_then_restart_matches_uninterrupted_run(project):
    straight, resumed, cancelled = project / "straight", project / "resumed", project / "cancelled"
    straight.mkdir()
    cfg = load_config(write_params(straight, _params()))
    paths = RunPaths(straight / cfg.run_dir)
    prepare(cfg, paths)
    shutil.copytree(straight, resumed)
    shutil.copytree(straight, cancelled)
    train_teacher(cfg, paths)

    # SIGTERM (a Prefect cancel, a preempted node) at the end of step 12, between two save_steps (5): training
    # stops there with a checkpoint of step 12 and the stage exits 143 with one line; the rerun resumes from it
    stopped = subprocess.run([KD, "stage", "train_teacher"], cwd=cancelled, capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, **{SIGTERM_AT_STEP_ENV: "models/teacher:12"}))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "cancelled (SIGTERM) at step 12" in stopped.stderr and "Traceback" not in stopped.stderr
    cancelled_ckpts = cancelled / "runs/tiny/models/.teacher-checkpoints"
    assert last_complete_checkpoint(cancelled_ckpts).name == "checkpoint-12"
    assert not (cancelled / "runs/tiny/models/teacher").exists(), "a cancelled stage must not leave a final model"
    train_teacher(cfg, RunPaths(cancelled / cfg.run_dir))
    _same_weights(straight, cancelled)

    ckpts = resumed / "runs/tiny/models/.teacher-checkpoints"
    # the stage SIGKILLs itself once the checkpoint of step 15 is complete (kd_core.training.trainer's test hook)
    killed = subprocess.run([KD, "stage", "train_teacher"], cwd=resumed, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **{DIE_AFTER_CHECKPOINT_ENV: "models/teacher:15"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert done and "checkpoint-40" not in done, f"killed too late: {done}"
    assert last_complete_checkpoint(ckpts).name == "checkpoint-15"
    assert not (resumed / "runs/tiny/models/teacher").exists(), "a killed stage must not leave a final model"

    train_teacher(cfg, RunPaths(resumed / cfg.run_dir))  # started again: resumes
    _same_weights(straight, resumed)
    assert not ckpts.exists(), "checkpoints are removed once the final model is saved"


def test_partial_checkpoint_is_skipped(tmp_path):
    complete, partial = tmp_path / "checkpoint-5", tmp_path / "checkpoint-10"
    for folder in (complete, partial):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (complete / name).write_text("{}")
    (partial / "trainer_state.json").write_text("{}")  # killed before the optimizer state was written
    assert last_complete_checkpoint(tmp_path) == complete
    assert not partial.exists()
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_resume_restores_the_methods_extra_trainable_modules(tmp_path):
    """`intermediate` trains hidden-state projections beside the student: a resumed run continues them from
    the checkpoint (weights and Adam state) and ends where an uninterrupted run ends."""
    import copy

    from kd_core.config import TrainingConfig
    from kd_core.methods import get_method
    from kd_core.training.trainer import train
    from tests.method_harness import Interrupted, interrupt_at, student_config, tiny_setup

    setup = tiny_setup()
    cfg = TrainingConfig(max_steps=10, save_steps=3, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0,
                         logging_steps=10)
    sc = student_config("intermediate", method_args={"projection": "always"})

    def run(out_dir, stop_at=None):
        method = get_method("intermediate")(sc, sc.method_args)
        student = setup.student(seed=1)
        if stop_at is not None:
            interrupt_at(method, stop_at)
        try:
            train(student, setup.train_set, setup.tokenizer, cfg, out_dir, method=method, seed=0,
                  teacher=LiveTeacher(copy.deepcopy(setup.teacher)), save=False)
        except Interrupted:
            return None
        return student, method

    straight_student, straight_method = run(tmp_path / "straight" / "s")
    assert run(tmp_path / "resumed" / "s", stop_at=7) is None
    ckpt = last_complete_checkpoint(tmp_path / "resumed" / ".s-checkpoints")
    assert ckpt is not None and ckpt.name == "checkpoint-6" and (ckpt / "extra_modules.pt").is_file()
    resumed_student, resumed_method = run(tmp_path / "resumed" / "s")

    [straight_proj], [resumed_proj] = straight_method.trainable_modules(), resumed_method.trainable_modules()
    fresh = get_method("intermediate")(sc, sc.method_args)
    fresh.setup(setup.student(seed=1), copy.deepcopy(setup.teacher))
    assert not torch.allclose(fresh.trainable_modules()[0][0].weight, straight_proj[0].weight), "projections trained"
    for a, b in zip(straight_proj.parameters(), resumed_proj.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for (name, a), b in zip(straight_student.state_dict().items(), resumed_student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_checkpoint_without_the_extra_modules_file_is_partial(tmp_path):
    """Killed between the Trainer's save and the extra modules' save: not a checkpoint to resume from."""
    older, newer = tmp_path / "checkpoint-3", tmp_path / "checkpoint-6"
    for folder in (older, newer):
        folder.mkdir()
        for name in ("model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (folder / name).write_text("{}")
    (older / "extra_modules.pt").write_bytes(b"x")
    assert last_complete_checkpoint(tmp_path) == newer  # a method without extra modules needs no such file
    assert last_complete_checkpoint(tmp_path, ("extra_modules.pt",)) == older
    assert not newer.exists()


def test_deepspeed_checkpoint_is_complete_once_latest_names_its_folder(tmp_path):
    """DeepSpeed writes no optimizer.pt: weights and optimizer shards are in `global_step<N>/`, and `latest`
    (written after every rank saved) names that folder."""
    older, newer = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    for folder, step in ((older, 2), (newer, 4)):
        (folder / f"global_step{step}").mkdir(parents=True)
        for name in ("trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"):
            (folder / name).write_text("{}")
    (older / "latest").write_text("global_step2")
    assert last_complete_checkpoint(tmp_path) == older  # newer: killed before `latest` was written
    assert not newer.exists()
    (older / "latest").write_text("global_step9")  # names a folder that is not there
    assert last_complete_checkpoint(tmp_path) is None
