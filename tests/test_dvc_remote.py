"""Data and model versions travel: `dvc repro` in a git repo, `dvc push` to the project's default remote (a
local folder, `.dvc/config`), `git clone` of that repo, `dvc pull`: every output DVC tracks (splits,
tokenizer, the teacher and the student, reports) and the metrics files come back byte-identical."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_reproduced

pytestmark = pytest.mark.slow


def _files(root: Path, rel: str) -> dict[str, str]:
    """sha256 of every file under `root/rel` (a file or a folder), keyed by path relative to root."""
    target = root / rel
    paths = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_push_then_pull_into_a_fresh_clone_restores_outputs(project, reproduced_project):
    """On a copy of the session's reproduced project (`tests/conftest.py`: the tiny params with one student, every
    stage run by `dvc repro` once a run), without its MLflow store: every output DVC tracks travels."""
    src, clone = project / "src", project / "clone"
    copy_reproduced(reproduced_project[0], src, stores=False)
    (src / ".gitignore").write_text("__pycache__/\n/.prefect/\n/.torch_extensions/\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def sh(cwd, *cmd):
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out

    git = ("git", "-c", "user.email=t@t", "-c", "user.name=t")
    shutil.copy(REPO / ".dvc" / "config", src / ".dvc" / "config")  # the project's remote settings, as committed
    remote = project / "kd-dvc-remote"  # the default remote: ../../kd-dvc-remote from .dvc/, beside the checkout
    assert sh(src, "dvc", "remote", "default").stdout.strip() == "local"
    sh(src, "git", "add", "-A")
    sh(src, *git, "commit", "-q", "-m", "tiny run")
    pushed = sh(src, "dvc", "push")
    assert remote.is_dir() and any(remote.rglob("*")), pushed.stdout

    lock = yaml.safe_load((src / "dvc.lock").read_text())
    tracked = sorted({o["path"] for st in lock["stages"].values() for o in st.get("outs", [])})
    run = "runs/tiny"
    for must in (f"{run}/data/train.jsonl", f"{run}/data/test.jsonl", f"{run}/tokenizer", f"{run}/models/teacher",
                 f"{run}/metrics/teacher.json"):
        assert must in tracked
    before = {k: v for rel in tracked for k, v in _files(src, rel).items()}
    assert any(k.endswith("model.safetensors") for k in before)

    sh(project, "git", "clone", "-q", str(src), str(clone))
    assert not (clone / run / "models" / "teacher").exists(), "weights are not in git"
    sh(clone, "dvc", "pull")
    after = {k: v for rel in tracked for k, v in _files(clone, rel).items()}
    assert after == before
    status = sh(clone, "dvc", "status")
    assert "changed" not in status.stdout, status.stdout
