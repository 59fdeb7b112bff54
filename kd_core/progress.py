"""Progress bars: one per training or generation stage, on a terminal only (none when stderr is a pipe or a
file, none on ranks other than 0). `progress(total, unit)` (the Trainer's steps, `generation.generate`'s
prompts) adds to the bar of the current stage (`stage_bar`, set by the flow around each stage), or opens a bar
of its own outside the flow.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading

def bars_enabled() -> bool:
    """Progress bars on a terminal only, and from rank 0 of a launch."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and int(os.environ.get("RANK", "0") or 0) == 0


class StageBar:
    """One stage's progress bar, labelled with the stage, created on first use and removed when the stage ends
    (its end line stays): the first `progress(total)` gives its total; when a second one comes (several
    generation passes), it counts units without a total."""

    def __init__(self, label: str | None):
        self.label = label
        self._bar = None
        self._lock = threading.Lock()

    def add(self, total: int, unit: str) -> None:
        from tqdm import tqdm

        with self._lock:
            if self._bar is None:
                self._bar = tqdm(total=total, desc=self.label, unit=f" {unit}", leave=False, dynamic_ncols=True,
                                 file=sys.stderr)
            elif self._bar.total is not None:  # more work than the first part announced (evaluate: a generate()
                self._bar.total = None             # per eval set and seed): a count, never a percentage going back
                self._bar.refresh()

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


_STAGE: contextvars.ContextVar[StageBar | None] = contextvars.ContextVar("kd_stage_bar", default=None)


@contextlib.contextmanager
def stage_bar(label: str):
    """The progress bar of the stage run inside (the flow sets it around each stage; none off a terminal)."""
    bar = StageBar(label) if bars_enabled() else None
    token = _STAGE.set(bar)
    try:
        yield bar
    finally:
        _STAGE.reset(token)
        if bar is not None:
            bar.close()


class Progress:
    """`total` more units of work for the current stage's bar (`update(n)` as they are done); a no-op off a
    terminal. Outside a stage bar (e.g. `kd stage` on a terminal) it is a bar of its own, closed by `close`."""

    def __init__(self, total: int, unit: str = "it"):
        self._own, self.n = None, 0
        self._bar = _STAGE.get()
        if self._bar is None and bars_enabled():
            self._bar = self._own = StageBar(None)
        if self._bar is not None:
            self._bar.add(int(total), unit)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def update_to(self, n: int) -> None:
        self.update(n - self.n)

    def close(self) -> None:
        if self._own is not None:
            self._own.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, unit: str = "it") -> Progress:
    return Progress(total, unit)
