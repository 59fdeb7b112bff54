"""One pipeline at a time per run folder (kd_core.pipeline.lock.run_lock): a second one is refused with a message naming
the holder; the holder's own threads and the processes it launches pass; a killed holder releases it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kd_core.errors import RunFolderBusy, exit_code, is_retryable
from kd_core.pipeline.lock import LOCK_ENV, lock_file, run_lock
from kd_core.run import RunPaths
from tests.conftest import tiny_params, write_params

KD = str(Path(sys.executable).with_name("kd"))
HOLD = """
import sys, time
from pathlib import Path
from kd_core.pipeline.lock import run_lock
from kd_core.run import RunPaths
with run_lock(RunPaths(Path(sys.argv[1]))):
    print("held", flush=True)
    time.sleep(120)
"""


def test_reentrant_in_one_process_and_across_threads(tmp_path):
    paths = RunPaths(tmp_path / "run")
    with run_lock(paths):
        with run_lock(paths):  # a stage inside the flow's lock
            pass
        errors = []

        def stage():
            try:
                with run_lock(paths):
                    pass
            except Exception as err:  # noqa: BLE001
                errors.append(err)
        t = threading.Thread(target=stage)
        t.start()
        t.join()
        assert errors == []
        assert os.environ[LOCK_ENV] == str(lock_file(paths))
        assert not paths.root.exists(), "taking the lock writes nothing into the run folder"
    assert LOCK_ENV not in os.environ


def test_another_process_is_refused_naming_the_holder_until_the_holder_dies(project):
    params = tiny_params()
    write_params(project, params)
    paths = RunPaths(project / params["run_dir"])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(paths.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"run folder .*{params['run_dir']} is in use by pid {holder.pid} on host "):
            with run_lock(paths):
                pass
        out = subprocess.run([KD, "stage", "prepare"], cwd=project, capture_output=True, text=True)
        assert out.returncode == 2 and f"is in use by pid {holder.pid}" in out.stderr
        assert not paths.split("train").exists(), "the refused stage wrote nothing"
        # a process the holder launched (e.g. torchrun ranks of a stage) does not lock
        env = dict(os.environ, **{LOCK_ENV: str(lock_file(paths))})
        assert subprocess.run([KD, "stage", "prepare"], cwd=project, env=env).returncode == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(paths):  # released by the kernel when the holder died
        pass


def test_busy_is_a_user_error_that_the_flow_retries():
    err = RunFolderBusy("x")
    assert exit_code(err) == 2 and is_retryable(err)
