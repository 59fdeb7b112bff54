"""The warm stage worker itself (the `kd` side and when it is used: kd_core/stage_worker/__init__.py): imports the
stack once, then forks one child per request; each child becomes the requesting `kd stage` process (its streams,
folder, environment and arguments) and runs the CLI; the worker reports the child's exit status back.

    python -m kd_core.stage_worker.server SOCKET
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

from kd_core.stage_worker import _IN_WORKER, FORWARDED_SIGNALS


def _warm_up() -> None:
    """Import what the stages import (the stage modules and, inside their functions, the training, evaluation and
    registration stack). Nothing runs: no Python thread, no torch computation (its OpenMP pool not started) and no
    accelerator initialised before a fork; the native helper threads that importing torch and pyarrow starts are
    there, as in the parent of a DataLoader's forked workers."""
    import importlib

    import kd_core.cli  # noqa: F401
    from kd_core.stages import DECLARATIONS

    for declaration in DECLARATIONS:
        importlib.import_module(f"kd_core.stages.{declaration.name}")
    for module in ("kd_core.methods", "kd_core.training.trainer", "kd_core.evaluation.run", "kd_core.evaluation.compare",
                   "kd_core.teachers.cache", "kd_core.generation", "mlflow.transformers", "peft",
                   "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """A `kd` process's request (argv, cwd, env) and its three standard streams; on a bad request the received
    descriptors are closed and OSError or ValueError raised."""
    conn.settimeout(10)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    try:
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 16)
            if not more:
                raise ConnectionError("request cut short")
            data += more
        if len(fds) != 3:
            raise ConnectionError("request without the three standard streams")
        return json.loads(data), fds
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        raise


def _closed(conn: socket.socket) -> bool:
    """Whether the other end has closed the connection (it sends nothing after its request)."""
    conn.settimeout(0)  # (non-blocking: with a timeout, Python would wait for data before the peek)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _run_child(request: dict, fds: list[int], keep_closed: list[socket.socket]) -> None:
    """In the forked child: become the `kd` process that sent `request`, run it, exit with its status."""
    code = 1
    try:
        _die_with_worker()
        for s in keep_closed:
            s.close()
        for signum in (*FORWARDED_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[_IN_WORKER] = "1"
        sys.argv = ["kd", *request["argv"]]
        from kd_core.cli import app

        app(args=request["argv"], prog_name="kd")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001  (reported on the stage's own stderr, then the status)
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _die_with_worker() -> None:
    """Linux: the child gets SIGKILL if the worker dies first (a stage must not outlive the worker, which alone
    reports its status to the waiting `kd` process)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def serve(path: Path, idle_s: float) -> None:
    """Listen on `path`; one forked child per request; exit after `idle_s` seconds without a running stage."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    listener.bind(str(staging))
    listener.listen(16)
    os.replace(staging, path)  # atomically, over a stale file of a killed worker: clients now queue until accept
    inode = path.stat().st_ino
    try:
        _warm_up()
        running: dict[int, socket.socket] = {}  # child pid -> its `kd` process's connection
        last = time.monotonic()
        while running or time.monotonic() - last < idle_s:
            readable, _, _ = select.select([listener, *running.values()], [], [], 0.05)
            for pid in list(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    conn = running.pop(pid)
                    code = os.waitstatus_to_exitcode(status)
                    with contextlib.suppress(OSError):
                        conn.sendall(f"EXIT {code if code >= 0 else 128 - code}\n".encode())
                    conn.close()
                    last = time.monotonic()
            for sock in readable:
                if sock is listener:
                    conn, _ = listener.accept()
                    try:
                        request, fds = _receive(conn)
                    except (OSError, ValueError):
                        conn.close()
                        continue
                    if _closed(conn):  # the `kd` process gave up waiting (or died): it runs the stage itself
                        for fd in fds:
                            os.close(fd)
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        _run_child(request, fds, [listener, conn, *running.values()])
                    for fd in fds:
                        os.close(fd)
                    conn.settimeout(None)
                    conn.sendall(f"PID {pid}\n".encode())
                    running[pid] = conn
                elif sock in running.values():  # a `kd` process's end: readable only at EOF (it died)
                    pid = next(p for p, c in running.items() if c is sock)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    running.pop(pid).close()
                    last = time.monotonic()
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:
                path.unlink()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(os.environ.get("KD_STAGE_WORKER_IDLE") or 60))
