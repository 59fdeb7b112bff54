"""The run lock: one pipeline at a time per run folder (the flow holds it while its tasks run stages; `kd stage`
under `dvc repro` takes it per stage)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from kd_core.errors import RunFolderBusy
from kd_core.run import RunPaths, is_main_process

LOCK_ENV = "KD_RUN_LOCK"  # set by the holder for its children (stages it launches with torchrun): they do not lock
_held: dict[str, tuple[object, int]] = {}  # lock file -> (open handle, depth) held by this process
_held_guard = threading.Lock()


def lock_file(paths: RunPaths) -> Path:
    """The lock of a run folder: in the system's temp folder, named by the folder's absolute path (taking it
    writes nothing into the project, so a stage refused for bad input leaves no trace)."""
    import hashlib
    import tempfile

    root = str(paths.root.resolve())
    return Path(tempfile.gettempdir()) / "kd-run-locks" / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def run_lock(paths: RunPaths, wait_s: float = 0.0):
    """One pipeline at a time per run folder: an exclusive lock (fcntl, released when the process ends, even by
    SIGKILL) on the folder's `lock_file`. Re-entrant within a process (the flow holds it while its tasks run stages);
    a process launched by the holder (env KD_RUN_LOCK) does not lock. Another holder: wait up to `wait_s`, then
    RunFolderBusy naming it (host, pid, since when). Different run folders never block each other. Under
    `torchrun` / `deepspeed` only rank 0 locks: the ranks are one pipeline."""
    import fcntl

    path = lock_file(paths)
    key = str(path)
    if os.environ.get(LOCK_ENV) == key or not is_main_process():  # the ranks of a launch share rank 0's lock
        yield
        return
    with _held_guard:
        if key in _held:
            handle, depth = _held[key]
            _held[key] = (handle, depth + 1)
            reentered = True
        else:
            reentered = False
    if not reentered:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held across the context)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    handle.close()
                    raise RunFolderBusy(f"run folder {paths.root} is in use by {holder}: wait for it to finish, or "
                                        f"set run_dir to another folder") from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        handle.flush()
        with _held_guard:
            _held[key] = (handle, 1)
    previous = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = key
    try:
        yield
    finally:
        with _held_guard:
            handle, depth = _held[key]
            if depth > 1:
                _held[key] = (handle, depth - 1)
            else:
                del _held[key]
                if previous is None:
                    os.environ.pop(LOCK_ENV, None)
                else:
                    os.environ[LOCK_ENV] = previous
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
