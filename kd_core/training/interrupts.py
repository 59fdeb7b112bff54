"""Interruptions of a training run: cancellation (SIGTERM), passed on to the stages a flow runs as processes.

Cancellation. Prefect cancels a flow run, and a cluster preempts a node, by sending SIGTERM. `kd run` and
`kd stage` install `on_sigterm` in their main thread: the first SIGTERM only sets a flag; training stops at
the next optimizer-step boundary (`StopAtNextStep`: every rank agrees on the step), writes a checkpoint there,
and the stage raises `Cancelled` (exit status 143 = 128 + SIGTERM, never retried by the flow). The next run of
the stage resumes from that checkpoint. A second SIGTERM while the first is being honoured ends the process at
once, also with 143 (`SystemExit`), as a user pressing Ctrl-C twice expects. In a flow (`kd run`), Prefect's
own handler ends the flow run and sends SIGTERM again once the task threads are done: that second one exits.
A stage the flow runs as a process of its own (side by side with others, or under torchrun / deepspeed:
`kd_core.pipeline.launcher.run_command`) gets every SIGTERM passed on (`forwarding_sigterm`), so it stops the same way.

The callback that acts on it is in kd_core/training/callbacks.py (this module imports no torch: the CLI
installs the handler before anything heavy is loaded).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading

from kd_core.errors import Cancelled

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
