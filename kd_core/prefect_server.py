"""The temporary Prefect server of an ad hoc `kd run` (no PREFECT_API_URL): started first thing, so it boots in
its own process while this one imports the pipeline, and stopped when the command ends.

Prefect would start the same server itself (`SubprocessASGIServer`, its "ephemeral" mode) at the flow call, after
the imports and after importing the server's own modules into this process (seconds, only to spawn it): starting
it here takes both off the critical path. It is the same command and settings Prefect uses (uvicorn on
`prefect.server.api.server:create_app`, no UI, the database in PREFECT_HOME), on a free port of 127.0.0.1.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from kd_core.errors import Transient

# what Prefect's SubprocessASGIServer sets for its temporary server
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


TEMPORARY_ENV = "KD_TEMPORARY_PREFECT_API_URL"  # the URL of this command's temporary server


def is_temporary(api_url: str) -> bool:
    """`api_url` is the temporary server of this `kd run` (gone when it ends: the UI needs a server of its own)."""
    return os.environ.get(TEMPORARY_ENV) == api_url


class ServerDidNotStart(Transient):
    """The temporary Prefect server did not answer in time (retryable: a loaded machine)."""


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS picks it; the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process, before exec (Linux): SIGTERM it when the `kd run` process dies, however it dies
    (SIGKILL included: no exit handler of ours runs then)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: `stop` at exit is all there is
        pass


START_ATTEMPTS = 3


def _launch(cmd: list[str], output: IO[bytes]) -> subprocess.Popen:
    """The uvicorn process of the server, its output appended to `output`; it dies with this process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", TEMPORARY_ENV)} | _SERVER_ENV
    return subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)


class TemporaryServer:
    """A Prefect API server process for this command; `PREFECT_API_URL` points at it from `start` on, and it
    is stopped at exit. Its output goes to an anonymous temporary file (nothing to remove, even when `kd run` is
    killed), written to a named log only when the server does not start."""

    def __init__(self, cmd: list[str], url: str):
        """Launch `cmd` (the server, answering at `url`)."""
        self.cmd, self.url = cmd, url
        self.output: IO[bytes] = tempfile.TemporaryFile(prefix="kd-prefect-server-")
        self.proc = _launch(cmd, self.output)

    @classmethod
    def start(cls) -> TemporaryServer | None:
        """Start one unless the user has a server (PREFECT_API_URL) or Prefect is imported already (its settings
        are read: the flow then starts its own, as Prefect does)."""
        if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
            return None
        package = Path(importlib.util.find_spec("prefect").origin).parent
        port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(package.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
        os.environ["PREFECT_API_URL"] = os.environ[TEMPORARY_ENV] = url = f"http://127.0.0.1:{port}/api"
        server = cls(cmd, url)
        atexit.register(server.stop)  # after Prefect's own exit handlers (LIFO): its run logs are sent by then
        return server

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Block until `/health` answers (timeout: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, as Prefect).
        A start that fails with uvicorn's status 3 (its application did not start: e.g. another `kd run` of the
        same Prefect home migrating the database at that moment) is tried again, on the same port (the URL is
        already in the environment), up to `START_ATTEMPTS` times."""
        import httpx

        timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        deadline = time.monotonic() + timeout
        attempts = 1
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if self.proc.returncode != 3 or attempts >= START_ATTEMPTS:
                        break
                    attempts += 1
                    time.sleep(0.5 * attempts)
                    self.proc = _launch(self.cmd, self.output)
                try:
                    if client.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        text = os.pread(self.output.fileno(), os.fstat(self.output.fileno()).st_size, 0).decode(errors="replace")
        tail = text.strip().splitlines()[-1:]
        state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else f"no answer in {timeout:.0f} s"
        self.stop()
        fd, log = tempfile.mkstemp(prefix="kd-prefect-server-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as kept:
            kept.write(text)
        raise ServerDidNotStart(f"the temporary Prefect server ({self.url}) {state}; its log: {log}"
                                + (f" ({tail[0]})" if tail else ""))

    def stop(self) -> None:
        """Stop the server (one uvicorn process) and close its output."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for key in ("PREFECT_API_URL", TEMPORARY_ENV):
            if os.environ.get(key) == self.url:
                del os.environ[key]
        self.output.close()
