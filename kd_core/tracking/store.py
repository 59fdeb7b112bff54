"""The MLflow tracking store: its URI (the one place that says which store a run uses), its check before a stage
writes anything, and MLflow pointed at it with the run's experiment selected.

The store defaults to a sqlite file in the working directory (no server); `tracking.tracking_uri` in params or
`MLFLOW_TRACKING_URI` points it at a real server. `check_tracking` runs before every stage
(`kd_core.pipeline.one_stage.run_stage`); a store that cannot be used is a `PreflightError` (`kd` exits with
status 2, the flow does not retry it), except an MLflow server that does not answer (`TrackingUnreachable`:
transient); a server lost during a stage is one `TrackingLost` line (`server_lost`).
"""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from kd_core.config import PipelineConfig, find_secrets
from kd_core.config.tracking_store import unknown_scheme
from kd_core.errors import ConfigError, KDError, PreflightError, TrackingLost, TrackingUnreachable
from kd_core.io import probe_write

HEALTH_TIMEOUT_S = 5.0


def tracking_uri(cfg: PipelineConfig) -> str:
    """The MLflow tracking store: `tracking.tracking_uri`, else MLFLOW_TRACKING_URI (never with a password in
    it), else a sqlite file in the working directory."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
        if find_secrets({"MLFLOW_TRACKING_URI": uri}):  # it would end up in run folders, reports and logs
            raise ConfigError("MLFLOW_TRACKING_URI contains a password (user:password@): set "
                              "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead")
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path:
    """The database file of a `sqlite:///` tracking URI."""
    return Path(uri.removeprefix("sqlite:///"))


def check_tracking(uri: str) -> None:
    """The MLflow tracking store exists and answers: http(s) -> GET /health; else a scheme MLflow has a store for,
    and for sqlite / file its folder is writable."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri.rstrip("/"))
        return
    folder = _store_folder(uri)
    if problem := unknown_scheme(uri):
        raise PreflightError(f"MLflow tracking store {uri}: {problem}")
    if folder is None:  # databricks, postgresql, ...: MLflow's own client reports problems
        return
    try:
        probe_write(folder)
    except OSError as err:
        raise PreflightError(f"MLflow tracking store {uri}: cannot write in {folder} ({err.strerror or err})") from None


def _store_folder(uri: str) -> Path | None:
    """The folder a sqlite or file store writes in (a plain path is a file store); None for a server or database."""
    if uri.startswith("sqlite:///"):
        return sqlite_file(uri).expanduser().parent
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    return Path(uri) if "://" not in uri else None


def _check_server(uri: str) -> None:
    """GET /health (open on a basic-auth server too), then one authenticated read: wrong or missing
    credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, as MLflow's client sends them) are found
    here, not at the first logging call."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=HEALTH_TIMEOUT_S) as resp:  # noqa: S310 (http(s) only)
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnreachable(f"MLflow tracking server {uri} is not reachable ({reason}): start it, or fix "
                             "MLFLOW_TRACKING_URI / tracking.tracking_uri") from None
    if status != 200:
        raise TrackingUnreachable(f"MLflow tracking server {uri} is not healthy: GET /health -> {status}")
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S).close()  # noqa: S310
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            who = f"user {user!r}" if user and password else "no credentials"
            raise PreflightError(f"MLflow tracking server {uri} refused {who} ({err.code}): set "
                                 "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD") from None
    except (urllib.error.URLError, OSError):
        pass  # reachable a moment ago: let MLflow's client retry and report


@contextlib.contextmanager
def server_lost(uri: str, what: str):
    """A stage (`what`) failing while its MLflow server (`uri`) has gone (it passed the check when the stage started):
    whatever MLflow's client raised becomes one `TrackingLost` line (exit 75, retried by the flow). The server is
    asked again (GET /health) only after an error that is not ours."""
    try:
        yield
    except Exception as err:
        if isinstance(err, KDError) or not uri.startswith(("http://", "https://")):
            raise
        uri = uri.rstrip("/")
        try:
            _check_server(uri)
        except TrackingUnreachable as down:
            now = down.args[0].partition(f"{uri} ")[2].partition(": start it")[0]  # "is not reachable (...)"
            raise TrackingLost(f"{what}: MLflow tracking server {uri} stopped answering during the stage (it {now}): "
                               "run the stage again once it is back; the rerun completes what was registered") from err
        raise


def setup(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store and select (creating if needed) the experiment."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    check_tracking(uri)  # fail in seconds with one message, not after MLflow's minutes of HTTP retries
    mlflow.set_tracking_uri(uri)
    with _sqlite_setup_lock(uri):
        client = MlflowClient()
        if client.get_experiment_by_name(cfg.tracking.experiment) is None:
            location = None
            if uri.startswith("sqlite:"):  # keep artifacts in the project, beside the sqlite file
                location = (sqlite_file(uri).parent / "mlartifacts").resolve().as_uri()
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # a concurrent run created it
                client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        mlflow.set_experiment(cfg.tracking.experiment)
    return uri


@contextlib.contextmanager
def _sqlite_setup_lock(uri: str):
    """Serialise the first touch of a sqlite store across processes: MLflow creates and migrates the schema
    on first use, and two pipelines starting at once on a fresh file race in that migration."""
    if not uri.startswith("sqlite:"):
        yield
        return
    import fcntl

    db = sqlite_file(uri)
    lock_path = db.with_name(db.name + ".lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
