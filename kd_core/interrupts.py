"""Interruptions of a training run: cancellation (SIGTERM) and the deterministic fault hooks of the tests.

Cancellation. Prefect cancels a flow run, and a cluster preempts a node, by sending SIGTERM. `kd run` and
`kd stage` install `on_sigterm` in their main thread: the first SIGTERM only sets a flag; training stops at
the next optimizer-step boundary (`StopAtNextStep`: every rank agrees on the step), writes a checkpoint there,
and the stage raises `Cancelled` (exit status 143 = 128 + SIGTERM, never retried by the flow). The next run of
the stage resumes from that checkpoint. A second SIGTERM while the first is being honoured ends the process at
once, also with 143 (`SystemExit`), as a user pressing Ctrl-C twice expects. In a flow (`kd run`), Prefect's
own handler ends the flow run and sends SIGTERM again once the task threads are done: that second one exits.
A stage the flow runs as a process of its own (side by side with others, or under torchrun / deepspeed:
`kd_core.launcher.run_command`) gets every SIGTERM passed on (`forwarding_sigterm`), so it stops the same way.

The callbacks that act on these are in kd_core/training_callbacks.py (this module imports no torch: the CLI
installs the handler before anything heavy is loaded).

Test hooks (environment variables read when training starts, naming the model folder by its trailing parts):
- `KD_TEST_DIE_AFTER_CHECKPOINT=<model folder>:<step>`: SIGKILL the process right after the checkpoint of
  `step` is complete (a preempted machine that dies without warning); with `KD_TEST_DIE_RANK=<rank>` only that
  rank dies (one lost worker of a distributed job), the others go on;
- `KD_TEST_SIGTERM_AT_STEP=<model folder>:<step>`: the process sends itself SIGTERM at the end of `step` (a
  cancellation, delivered at a known step so the test is deterministic);
- `KD_TEST_DISK_FULL_AFTER_CHECKPOINT=<model folder>:<step>`: once the checkpoint of `step` is complete, every
  write that grows a file fails with EFBIG, as on a full disk (RLIMIT_FSIZE 0);
- `KD_TEST_KILL_TRACKING_SERVER=<process group>`: register SIGKILLs that process group (the test's MLflow
  server) right after the first version is created, before the rest of its registration (`kill_tracking_server`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path

from kd_core.errors import Cancelled

DIE_AFTER_CHECKPOINT_ENV = "KD_TEST_DIE_AFTER_CHECKPOINT"
DIE_RANK_ENV = "KD_TEST_DIE_RANK"
SIGTERM_AT_STEP_ENV = "KD_TEST_SIGTERM_AT_STEP"
DISK_FULL_AFTER_CHECKPOINT_ENV = "KD_TEST_DISK_FULL_AFTER_CHECKPOINT"
KILL_TRACKING_ENV = "KD_TEST_KILL_TRACKING_SERVER"

_requested = threading.Event()
_children: set[subprocess.Popen] = set()  # stage processes started by this one: SIGTERM is passed on to them
_children_lock = threading.Lock()


@contextlib.contextmanager
def forwarding_sigterm(proc: subprocess.Popen):
    """While the block runs, a SIGTERM to this process is passed on to `proc` (a stage in a process of its own),
    which then checkpoints and stops as a stage in this process would."""
    with _children_lock:
        _children.add(proc)
    try:
        yield proc
    finally:
        with _children_lock:
            _children.discard(proc)


def _pass_on_sigterm() -> None:
    with _children_lock:
        children = [p for p in _children if p.poll() is None]
    for proc in children:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)


def on_sigterm(chain: bool = False) -> None:
    """Install the SIGTERM handler (main thread only; elsewhere, e.g. inside a worker thread, it is a no-op).

    `chain=True` (inside a Prefect flow, whose engine has installed its own handler): set the flag first, so a
    stage training in a task's thread stops at its next step, then call Prefect's handler, which ends the flow
    run (its state: cancelled or crashed) once the task threads are done."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM) if chain else None
    _requested.clear()  # a new run (a served deployment runs flow after flow in one process)

    def handler(signum, frame):
        _pass_on_sigterm()
        if callable(previous):
            _requested.set()
            previous(signum, frame)
            return
        if _requested.is_set():  # the second one (or Prefect's re-raise at the end of a cancelled flow): stop now
            raise SystemExit(Cancelled.exit_code)
        _requested.set()

    signal.signal(signal.SIGTERM, handler)


def cancel_requested() -> bool:
    return _requested.is_set()


def hook_step(out_dir: Path, env: str) -> int | None:
    """The step of test hook `env` when it names this model folder (its trailing path parts), else None."""
    target, _, step = os.environ.get(env, "").rpartition(":")
    parts = Path(target).parts
    if not parts or out_dir.parts[-len(parts):] != parts:
        return None
    return int(step)


def kill_tracking_server() -> None:
    """The test hook `KD_TEST_KILL_TRACKING_SERVER`: SIGKILL that process group once (the variable is cleared) and
    return when none of its processes is alive (their sockets are closed: the next request is refused)."""
    group = os.environ.pop(KILL_TRACKING_ENV, "")
    if not group:
        return
    os.killpg(int(group), signal.SIGKILL)
    while _group_alive(int(group)):
        os.sched_yield()


def _group_alive(group: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):  # (state, ppid, pgrp): alive, not a zombie
            return True
    return False
