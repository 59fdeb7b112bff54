"""The warm stage worker (kd_core/stage_worker/, issue 16): under DVC a `kd stage` runs in a child forked from a
worker that has the stack imported, with the caller's streams, folder, environment and exit status; a signal to the
`kd` process reaches the stage; a `kd` process that dies takes its stage with it. Speed: bench/cli_startup.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kd_core import stage_worker
from tests.conftest import tiny_params, write_params

KD = str(Path(sys.executable).with_name("kd"))


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (/proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _worker_pid(path: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"kd_core.stage_worker.server" in cmdline and str(path).encode() in cmdline:
                return int(entry.name)
    return None


def _wait_for(condition, what: str, limit: int = 3000):
    """Poll `condition` every 10 ms until it holds (a readiness wait, not a timing: the limit only stops a hang)."""
    import time

    for _ in range(limit):
        if value := condition():
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def under_dvc(project, monkeypatch):
    """The tiny project as DVC runs its stages (DVC_ROOT set); its worker, if any, killed at the end."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the worker's tests read /proc")
    write_params(project, tiny_params())
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("KD_STAGE_WORKER_IDLE", "60")
    monkeypatch.delenv("KD_STAGE_WORKER", raising=False)
    paths: list[Path] = []

    def socket_path() -> Path:
        """The socket a `kd` started by this test uses: asked of a child process in the test's call phase (pytest's
        PYTEST_CURRENT_TEST is part of the key, and the C environment a child inherits can hold variables that
        os.environ lacks here, e.g. COLUMNS)."""
        code = "from kd_core import stage_worker; print(stage_worker.socket_path())"
        out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True)
        paths.append(Path(out.stdout.strip()))
        return paths[-1]

    yield project, socket_path
    for path in paths:
        if (pid := _worker_pid(path)) is not None:
            os.kill(pid, signal.SIGKILL)


def test_the_worker_is_keyed_on_the_environment_less_dvcs_variables(under_dvc, monkeypatch):
    _, _ = under_dvc
    path = stage_worker.socket_path()
    monkeypatch.setenv("DVC_STAGE", "distill@fkl")  # per stage: the same worker
    assert stage_worker.socket_path() == path
    monkeypatch.setenv("KD_SOMETHING", "1")  # another environment: another worker
    assert stage_worker.socket_path() != path
    assert stage_worker.wanted()
    monkeypatch.setenv("KD_STAGE_WORKER", "0")
    assert not stage_worker.wanted()
    monkeypatch.delenv("KD_STAGE_WORKER")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not stage_worker.wanted()


def test_stages_run_in_the_worker_with_the_callers_streams_and_status(under_dvc, monkeypatch):
    project, socket_path = under_dvc
    path = socket_path()
    # no worker yet: this stage runs in its own process and one starts
    first = subprocess.run([KD, "stage", "prepare"], cwd=project, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    worker = _wait_for(lambda: _worker_pid(path), "the worker")
    assert path.exists()
    (project / "runs/tiny/data/train.jsonl").unlink()

    # the same stage again, now in a child of the worker: same output, same files
    again = subprocess.run([KD, "stage", "prepare"], cwd=project, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and (project / "runs/tiny/data/train.jsonl").is_file()
    assert _worker_pid(path) == worker

    # bad input: the one-line error on the caller's stderr, status 2, from the worker's child
    bad = subprocess.run([KD, "stage", "distill", "--model", "nope"], cwd=project, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    # and in this process, with its environment made the children's: the worker takes it (None would mean it did not)
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    child_env = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    for key, value in child_env.items():
        monkeypatch.setenv(key, value)
    assert stage_worker.socket_path() == path
    assert stage_worker.run_in_worker(["stage", "distill", "--model", "nope"]) == 2


def test_a_signal_reaches_the_stage_and_a_killed_caller_takes_its_stage_along(under_dvc):
    project, socket_path = under_dvc
    path = socket_path()
    params = tiny_params()
    params["teacher"]["training"] = dict(params["teacher"]["training"], max_steps=100000, save_steps=0)
    write_params(project, params)
    subprocess.run([KD, "stage", "prepare"], cwd=project, check=True, capture_output=True, timeout=300)
    worker = _wait_for(lambda: _worker_pid(path), "the worker")

    # SIGTERM to `kd`: forwarded; the stage stops as on a SIGTERM of its own (status 143), its child reaped
    caller = subprocess.Popen([KD, "stage", "train_teacher"], cwd=project, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    stage = _wait_for(lambda: _children(worker), "the stage's process")[0]
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=300) == 143, caller.stderr.read()
    _wait_for(lambda: stage not in _children(worker), "the stage to end")

    # SIGKILL to `kd` (no chance to forward): the worker kills the stage
    caller = subprocess.Popen([KD, "stage", "train_teacher"], cwd=project, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    stage = _wait_for(lambda: _children(worker), "the stage's process")[0]
    caller.kill()
    caller.wait(timeout=60)
    _wait_for(lambda: stage not in _children(worker) and not Path(f"/proc/{stage}").exists(), "the stage to die")


def test_a_request_whose_caller_gave_up_is_not_started():
    """The worker checks, before it forks, that the `kd` process still waits (it closes its end when it stops waiting
    for a hung worker, and then runs the stage itself)."""
    from kd_core.stage_worker.server import _closed

    worker_end, caller_end = socket.socketpair()
    with worker_end:
        worker_end.settimeout(10)
        assert not _closed(worker_end)
        caller_end.close()
        assert _closed(worker_end)


def test_a_signal_sent_before_the_stage_exists_reaches_it_once_it_does(tmp_path):
    """A SIGTERM that reaches `kd` after it sent its request but before the worker has answered with the stage's
    pid (the worker is forking it) is kept and forwarded with the pid; before, it killed `kd` with the default
    action (status -15) and the stage was SIGKILLed as an orphan. A stand-in worker: it signals the caller while
    holding back the pid of a stand-in stage (a `sleep`)."""
    from kd_core.stage_worker.server import _receive

    path = tmp_path / "w.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    code = ("import sys; from pathlib import Path; from kd_core import stage_worker\n"
            "stage_worker.socket_path = lambda: Path(sys.argv[1])\n"
            "sys.exit(stage_worker.run_in_worker(['stage', 'prepare']))")
    caller = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        listener.settimeout(120)
        conn, _ = listener.accept()
        with conn:
            request, fds = _receive(conn)
            for fd in fds:
                os.close(fd)
            assert request["argv"] == ["stage", "prepare"]
            caller.send_signal(signal.SIGTERM)  # the request is in: kd's forwarding handler is in place
            conn.sendall(f"PID {sleeper.pid}\n".encode())
            _wait_for(lambda: sleeper.poll() is not None or caller.poll() is not None, "the signal's effect", 12000)
            assert caller.poll() is None, f"kd ended with {caller.returncode}: {caller.stderr.read()}"
            assert sleeper.returncode == -signal.SIGTERM
            conn.sendall(b"EXIT 143\n")
        assert caller.wait(timeout=120) == 143, caller.stderr.read()
    finally:
        for proc in (caller, sleeper):
            if proc.poll() is None:
                proc.kill()
        listener.close()
