"""The first hour of a new user (issue 29, item 4): a copy of the project that is not a git repository (a
downloaded archive) runs, with DVC bookkeeping off and one line saying so and how to turn it on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import dvc_project, registered_versions, tiny_params


@pytest.mark.slow
def test_kd_run_in_a_project_copy_without_git(project, empty_stores):
    """The tiny config through `kd run` (a process, as a user runs it) in a DVC project whose `.git` is gone."""
    from prefect.settings import PREFECT_API_URL

    dvc_project(project, tiny_params())
    shutil.rmtree(project / ".git")
    with empty_stores.prefect_harness():
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        out = subprocess.run([str(Path(sys.executable).with_name("kd")), "run"], cwd=project, text=True,
                             capture_output=True, env=env | {"PREFECT_API_URL": PREFECT_API_URL.value()})
    shown = out.stdout + out.stderr
    assert out.returncode == 0, shown[-5000:]
    assert "Traceback" not in shown and "SCMError" not in shown, shown[-5000:]
    off = [line for line in shown.splitlines() if "DVC" in line and "off" in line]
    assert off == [f"DVC bookkeeping off: {project.resolve()} is not a git repository (DVC needs one): `git init` "
                   "here turns it on; every stage runs"], shown[-5000:]
    assert not (project / "dvc.lock").exists()  # nothing recorded
    assert {v.tags["kd.model"] for v in registered_versions("kd-student")} == {"sft", "fkl"}
    assert any(line.startswith("champion:") for line in shown.splitlines())
