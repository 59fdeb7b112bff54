"""The temporary Prefect server of an ad hoc `kd run` (Prefect's own, started at the flow call;
kd_core/pipeline/prefect_server.py) leaves nothing behind: no file in the temporary folder, and no server running
once its `kd run` has ended, whether it ended normally or was killed (SIGKILL: no exit handler runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

_RUN = """
import os, signal, sys
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
from kd_core.pipeline.prefect_server import die_with_this_process

die_with_this_process()  # as `kd run` does before its flow call

@flow
def one() -> int:
    return 1

assert one() == 1  # Prefect starts its temporary server here (no PREFECT_API_URL)
print(SubprocessASGIServer._instances[None].server_process.pid, flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # no exit handler runs
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_the_temporary_server_leaves_no_file_and_no_process_whether_its_run_ends_or_is_killed(project, end):
    temporary = project / "system-tmp"
    temporary.mkdir()
    env = dict(os.environ, TMPDIR=str(temporary), PYTHONPATH=str(REPO), PREFECT_HOME=str(project / ".prefect"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", _RUN, end], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == (-9 if end == "kill" else 0), proc.stderr[-3000:]
    server_pid = int(proc.stdout.split()[-1])
    _wait_gone(server_pid)  # stopped at exit, or SIGTERMed by the kernel when its parent died (PR_SET_PDEATHSIG)
    assert list(temporary.iterdir()) == []


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return  # a zombie: exited, waiting for its (re)parent to reap it
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError(f"server process {pid} still running {timeout} s after its kd run ended")
