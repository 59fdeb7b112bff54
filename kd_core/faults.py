"""Fault injection for the tests: the one reader of the `KD_TEST_*` hooks. Production code calls each hook point
once (`TrainingFaults.step_end` / `checkpoint_saved` from the training callbacks, `kill_tracking_server` from
registration); with no hook set (outside the tests) every call does nothing.

The hooks (environment variables read when training starts, naming the model folder by its trailing parts):
- `KD_TEST_DIE_AFTER_CHECKPOINT=<model folder>:<step>`: SIGKILL the process right after the checkpoint of
  `step` is complete (a preempted machine that dies without warning); with `KD_TEST_DIE_RANK=<rank>` only that
  rank dies (one lost worker of a distributed job), the others go on;
- `KD_TEST_SIGTERM_AT_STEP=<model folder>:<step>`: the process sends itself SIGTERM at the end of `step` (a
  cancellation, delivered at a known step so the test is deterministic);
- `KD_TEST_DISK_FULL_AFTER_CHECKPOINT=<model folder>:<step>`: once the checkpoint of `step` is complete, every
  write that grows a file fails with EFBIG, as on a full disk (RLIMIT_FSIZE 0);
- `KD_TEST_KILL_TRACKING_SERVER=<process group>`: register SIGKILLs that process group (the test's MLflow
  server) right after the first version is created, before the rest of its registration.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

DIE_AFTER_CHECKPOINT_ENV = "KD_TEST_DIE_AFTER_CHECKPOINT"
DIE_RANK_ENV = "KD_TEST_DIE_RANK"
SIGTERM_AT_STEP_ENV = "KD_TEST_SIGTERM_AT_STEP"
DISK_FULL_AFTER_CHECKPOINT_ENV = "KD_TEST_DISK_FULL_AFTER_CHECKPOINT"
KILL_TRACKING_ENV = "KD_TEST_KILL_TRACKING_SERVER"


def hook_step(out_dir: Path, env: str) -> int | None:
    """The step of test hook `env` when it names this model folder (its trailing path parts), else None."""
    target, _, step = os.environ.get(env, "").rpartition(":")
    parts = Path(target).parts
    if not parts or Path(out_dir).parts[-len(parts):] != parts:
        return None
    return int(step)


class TrainingFaults:
    """The training hooks the environment asks for on one model folder, read when training starts."""

    def __init__(self, out_dir: Path):
        self.sigterm_at = hook_step(out_dir, SIGTERM_AT_STEP_ENV)
        self.die_after = hook_step(out_dir, DIE_AFTER_CHECKPOINT_ENV)
        self.disk_full_after = hook_step(out_dir, DISK_FULL_AFTER_CHECKPOINT_ENV)

    def step_end(self, step: int) -> None:
        """At the end of optimizer step `step`, before cancellation is looked at: SIGTERM this process (a cancel)."""
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def checkpoint_saved(self, step: int, world_size: int, rank: int = 0) -> None:
        """Once the checkpoint of `step` is complete (every other callback has written its part, checksums
        included): SIGKILL this process, or make every later write that grows a file fail with EFBIG (a full disk:
        RLIMIT_FSIZE 0, with SIGXFSZ ignored so that the write raises instead of killing the process)."""
        if step == self.die_after:
            if world_size > 1:
                import torch.distributed as dist

                dist.barrier()  # every rank has written its part of the checkpoint
            if os.environ.get(DIE_RANK_ENV, str(rank)) == str(rank):
                os.kill(os.getpid(), signal.SIGKILL)
        if step == self.disk_full_after:
            import resource

            # Python ignores SIGXFSZ from the start; set only where something changed that (signal.signal works in
            # the main thread only, and in a flow the stage trains in a task's thread)
            if signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def kill_tracking_server() -> None:
    """The hook `KD_TEST_KILL_TRACKING_SERVER`: SIGKILL that process group once (the variable is cleared) and
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
