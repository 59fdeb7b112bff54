"""A warm worker for `kd stage` under `dvc repro` (issue 16).

DVC starts one process per stage instance, and each would import torch, transformers and MLflow again: on a tiny
config that is most of a stage's time. The first `kd stage` of a `dvc repro` starts a worker (`python -m
kd_core.stage_worker.server SOCKET`, kd_core/stage_worker/server.py) that imports the stack once and then forks
one child per later stage. The `kd stage` process that DVC started hands the child its arguments, working folder,
environment and standard streams (the file descriptors themselves), forwards SIGINT / SIGTERM / SIGHUP to it (one
that comes before the child exists is sent as soon as it does) and exits with its status; if that process dies,
the child is killed. The child runs the same CLI code a fresh process runs, so a stage behaves the same.

When: only under DVC (it sets `DVC_ROOT` for every stage command), not in a distributed launch (WORLD_SIZE > 1),
not with `KD_STAGE_WORKER=0`, and on Linux only (Unix sockets with descriptor passing, and a fork after importing
torch that macOS's runtime does not promise to survive). One worker serves one interpreter, one environment (less
DVC's per-stage variables) and one version of the code: its socket's name hashes those and every `kd_core` source
file's size and mtime, so an edit or another environment gets another worker. A worker exits after
`KD_STAGE_WORKER_IDLE` seconds (default 60) without a stage. Whenever there is no worker to take a stage (the first
one, or a worker that failed before the child started), the stage runs in its own process as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
START_TIMEOUT_S = 120.0  # how long a `kd stage` waits for the worker to start its stage
_VOLATILE_ENV = ("PWD", "OLDPWD", "SHLVL", "_")  # set by the shell that DVC runs each command in
_IN_WORKER = "KD_IN_STAGE_WORKER"


def wanted() -> bool:
    """Whether this `kd stage` should go through the warm worker."""
    return ("DVC_ROOT" in os.environ and os.environ.get("KD_STAGE_WORKER", "1") != "0"
            and _IN_WORKER not in os.environ and int(os.environ.get("WORLD_SIZE") or 1) <= 1
            and sys.platform.startswith("linux") and hasattr(socket, "send_fds"))


def worker_env() -> dict[str, str]:
    """The environment a worker is keyed on and started with: this one less DVC's per-stage variables and the
    shell's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DVC_") and k not in _VOLATILE_ENV}


def socket_path() -> Path:
    """The worker socket for this interpreter, environment and code (a private folder of the user's)."""
    digest = hashlib.sha256(sys.executable.encode())
    digest.update(json.dumps(sorted(worker_env().items())).encode())
    for f in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):  # every kd_core source file
        st = f.stat()
        digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    folder = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"kd-stage-worker-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder}: not a private folder of this user")
    return folder / f"{digest.hexdigest()[:24]}.sock"


# ----------------------------------------------------------------------------------------------- the `kd` side
def run_in_worker(argv: list[str]) -> int | None:
    """Run `kd ARGV` in the warm worker and return its exit status; None when no worker took it (one is started
    for the next stage, and the caller runs this one itself)."""
    try:
        path = socket_path()
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:  # no worker yet (or a stale socket file of one that was killed)
        sock.close()
        _start_worker(path)
        return None
    forward = _Forwarder()
    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        with sock:
            last = _request(sock, argv, forward.started)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if last is None:  # no worker took the stage: the caller runs it, and reacts first to what it was sent
        for signum in forward.caught:
            signal.raise_signal(signum)
        return None
    if last.startswith(b"EXIT "):
        return int(last.split()[1])
    print("kd stage: the stage worker ended without the stage's exit status", file=sys.stderr)
    return 1


class _Forwarder:
    """The `kd` process's handler of FORWARDED_SIGNALS while its stage runs in the worker: each goes to the stage;
    those that come before the stage's pid is known (the worker may be forking it) are kept in `caught` and sent
    when it is (`started`)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.caught: list[int] = []

    def __call__(self, signum, _frame) -> None:
        if self.pid is None:
            self.caught.append(signum)
        else:
            self._send(signum)

    def started(self, pid: int) -> None:
        self.pid = pid
        for signum in self.caught:
            self._send(signum)

    def _send(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)


def _request(sock: socket.socket, argv: list[str], started) -> bytes | None:
    """Send `kd ARGV` (and this process's working folder, environment and standard streams) to the worker, call
    `started(pid)` when the stage's pid comes back, then wait for the status line. None when the worker did not
    start the stage."""
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode() + b"\n"
    try:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        sent = socket.send_fds(sock, [request], [0, 1, 2])
        sock.sendall(request[sent:])
        sock.settimeout(START_TIMEOUT_S)  # a new worker may still be importing; a hung one is given up on
        replies = sock.makefile("rb")
        first = replies.readline()
        sock.settimeout(None)
    except OSError:  # (a timeout too: the worker then sees this end closed and does not start the stage)
        return None
    if not first.startswith(b"PID "):  # the worker failed before the stage started
        return None
    started(int(first.split()[1]))
    return replies.readline()


def _start_worker(path: Path) -> None:
    """A worker for `path`, in the keyed environment, without standard streams, in a process group of its own (a
    terminal's Ctrl-C reaches the stage through its `kd` process only) but in the caller's session: a session of
    its own would be a scheduling group of its own (Linux autogroup), where torch's spinning OpenMP threads slow
    down by 10x or more when another group keeps a core busy (measured)."""
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-m", "kd_core.stage_worker.server", str(path)], cwd="/", env=worker_env(),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         process_group=0, close_fds=True)
