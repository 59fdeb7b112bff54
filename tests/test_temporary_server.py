"""The temporary Prefect server of an ad hoc `kd run` (kd_core/prefect_server.py) leaves nothing behind: not when
it stops, not when its `kd run` is killed; only a server that does not start leaves its log, named in the error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kd_core.prefect_server import ServerDidNotStart, TemporaryServer, free_port
from tests.conftest import REPO

_START = """
import os, signal, sys
from kd_core.prefect_server import TemporaryServer
server = TemporaryServer.start()
server.wait_healthy()
print(server.proc.pid, flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # no exit handler runs
server.stop()
"""


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_a_started_server_leaves_no_file_whether_stopped_or_killed(project, end):
    temporary = project / "system-tmp"
    temporary.mkdir()
    env = dict(os.environ, TMPDIR=str(temporary), PYTHONPATH=str(REPO))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", _START, end], cwd=project, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == (-9 if end == "kill" else 0), proc.stderr[-3000:]
    server_pid = int(proc.stdout.split()[0])
    _wait_gone(server_pid)  # stopped, or SIGTERMed by the kernel when its parent died (PR_SET_PDEATHSIG)
    assert list(temporary.iterdir()) == []  # the old server log, /tmp/kd-prefect-server-*.log, stayed when killed


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
    raise AssertionError(f"server process {pid} still running {timeout} s after its kd run ended")


def test_a_server_that_does_not_start_names_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cmd = [sys.executable, "-c", "import sys; print('address already in use'); sys.exit(1)"]
    server = TemporaryServer(cmd, f"http://127.0.0.1:{free_port()}/api")
    with pytest.raises(ServerDidNotStart, match=r"exited with 1; its log: (\S+) \(address already in use\)") as err:
        server.wait_healthy(timeout=30)
    log = Path(re.search(r"its log: (\S+)", str(err.value)).group(1))
    assert log.parent == tmp_path and log.read_text() == "address already in use\n"
    assert list(tmp_path.iterdir()) == [log]
