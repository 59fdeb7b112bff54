"""Prefect's own temporary server for an ad hoc `kd run` (no Prefect server configured), with one addition that
Prefect's lacks: it dies with its `kd run` even when that process is killed (SIGKILL, the out-of-memory killer: no
exit handler runs), where Prefect's own would be left running (tests/test_temporary_server.py).

Prefect starts the server itself, at the flow call (`SubprocessASGIServer`: its command, settings, start-up and
stop at exit); `die_with_this_process` only registers the subclass below as the instance Prefect's ephemeral mode
uses, whose server process gets Linux's PR_SET_PDEATHSIG (elsewhere: Prefect's own behaviour).
"""

from __future__ import annotations

import functools
import signal
import sys
from types import SimpleNamespace


def _set_pdeathsig() -> None:
    """In the server's process, before exec: SIGTERM it when its parent dies, however it dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: Prefect's stop at exit is all there is
        pass


def die_with_this_process() -> None:
    """Make the temporary server that Prefect starts at this process's first flow call (when no PREFECT_API_URL
    is set) die with this process; nothing when a server is configured."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return

    class DiesWithParent(SubprocessASGIServer):
        """Prefect's `SubprocessASGIServer`, its uvicorn process started with PR_SET_PDEATHSIG."""

        def _run_uvicorn_command(self):
            module = sys.modules[SubprocessASGIServer.__module__]
            real = module.subprocess  # Prefect's own command and environment; only the child's set-up is added
            module.subprocess = SimpleNamespace(Popen=functools.partial(real.Popen, preexec_fn=_set_pdeathsig))
            try:
                return super()._run_uvicorn_command()
            finally:
                module.subprocess = real

    DiesWithParent()  # the instance `SubprocessASGIServer()` returns from now on (Prefect keeps one per port)
