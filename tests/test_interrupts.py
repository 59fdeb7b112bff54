"""SIGTERM (a cancel) reaches a stage that runs in a process of its own (kd_core.training.interrupts.forwarding_sigterm)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from kd_core.training import interrupts

CHILD = ("import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
         "print('ready', flush=True)\n"
         "time.sleep(120)\n")


def _child() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_is_passed_on_to_a_stage_process_while_it_runs():
    previous = signal.getsignal(signal.SIGTERM)
    running, finished = _child(), _child()
    try:
        interrupts.on_sigterm()
        with interrupts.forwarding_sigterm(finished):
            pass  # registered, then done: no longer a child to pass SIGTERM on to
        with interrupts.forwarding_sigterm(running):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this (main) thread
            assert running.wait(timeout=60) == 143
        assert interrupts.cancel_requested()
        assert finished.poll() is None, "a process whose block has ended gets nothing"
    finally:
        signal.signal(signal.SIGTERM, previous)
        interrupts._requested.clear()
        for proc in (running, finished):
            proc.kill()
            proc.wait()
