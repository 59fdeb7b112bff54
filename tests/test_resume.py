"""A training stage killed with SIGKILL resumes from its last complete checkpoint and ends with the same
weights as an uninterrupted run (CPU, fixed seed)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_core.config import load_config
from kd_core.stages import RunPaths, prepare, train_teacher
from kd_core.training import last_complete_checkpoint
from tests.conftest import tiny_params, write_params

KD = str(Path(sys.executable).with_name("kd"))


def _params():
    p = tiny_params()
    p["teacher"]["model"]["config"].update(n_layer=2, hidden=64)
    p["teacher"]["training"] = {"max_steps": 40, "save_steps": 5, "batch_size": 16, "learning_rate": 0.003,
                                "warmup_ratio": 0.0, "logging_steps": 5}
    return p


@pytest.mark.slow
def test_sigkill_then_restart_matches_uninterrupted_run(project):
    straight, resumed = project / "straight", project / "resumed"
    straight.mkdir()
    cfg = load_config(write_params(straight, _params()))
    paths = RunPaths(straight / cfg.run_dir)
    prepare(cfg, paths)
    shutil.copytree(straight, resumed)
    train_teacher(cfg, paths)

    ckpts = resumed / "runs/tiny/models/.teacher-checkpoints"
    proc = subprocess.Popen([KD, "stage", "train_teacher"], cwd=resumed,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name == "checkpoint-15" for p in ckpts.iterdir())):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert done and "checkpoint-40" not in done, f"killed too late: {done}"
    assert not (resumed / "runs/tiny/models/teacher").exists(), "a killed stage must not leave a final model"

    train_teacher(cfg, RunPaths(resumed / cfg.run_dir))  # started again: resumes
    a = load_file(straight / "runs/tiny/models/teacher/model.safetensors")
    b = load_file(resumed / "runs/tiny/models/teacher/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
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
