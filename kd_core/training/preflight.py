"""Preflight: the checks a training stage makes before it trains, so that what would fail after an hour of
training (an MLflow server that is down, a read-only or full disk, a student that cannot be compared with its
teacher token by token) fails at once, with one message, and nothing is written or registered.

`check_tracking` runs before every stage (`kd_core.stages.run_stage`); `preflight()` (the folder, the disk, the
models) is called by train_teacher, distill and finetune right after the models are built and before any MLflow
call or training step. A failure is a `PreflightError`: `kd` exits with status 2, the Prefect
flow does not retry it, except an MLflow server that does not answer (`TrackingUnreachable`: transient).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from kd_core.config import PipelineConfig, TrainingConfig, find_secrets
from kd_core.config.tracking_store import unknown_scheme
from kd_core.errors import ConfigError, KDError, PreflightError, TrackingLost, TrackingUnreachable

HEALTH_TIMEOUT_S = 5.0
# Adam keeps two fp32 moments per parameter: a resume checkpoint is weights + 2x weights (+ small files)
OPTIMIZER_STATE_FACTOR = 2
# Trainer's save_total_limit (kd_core/training/trainer.py); one more is being written when the oldest is deleted
CHECKPOINTS_KEPT = 2
DISK_MARGIN = 1.2


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
    """The MLflow tracking store exists and answers: a scheme MLflow has a store for; http(s) -> GET /health;
    sqlite / file -> its folder is writable."""
    if problem := unknown_scheme(uri):
        raise PreflightError(f"MLflow tracking store {uri}: {problem}")
    if uri.startswith(("http://", "https://")):
        _check_server(uri.rstrip("/"))
        return
    if uri.startswith("sqlite:///"):
        folder = sqlite_file(uri).expanduser().parent
    elif uri.startswith("file:"):
        folder = Path(uri.removeprefix("file://").removeprefix("file:"))
    elif "://" not in uri:  # a plain path is a file store
        folder = Path(uri)
    else:  # databricks, postgresql, ...: MLflow's own client reports problems
        return
    try:
        _probe_write(folder)
    except OSError as err:
        raise PreflightError(f"MLflow tracking store {uri}: cannot write in {folder} ({err.strerror or err})") from None


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
def server_lost(cfg: PipelineConfig, what: str):
    """A stage (`what`) failing while its MLflow server has gone (it passed the check when the stage started):
    whatever MLflow's client raised becomes one `TrackingLost` line (exit 75, retried by the flow). The server is
    asked again (GET /health) only after an error that is not ours."""
    try:
        yield
    except Exception as err:
        uri = tracking_uri(cfg) if not isinstance(err, KDError) else ""
        if not uri.startswith(("http://", "https://")):
            raise
        uri = uri.rstrip("/")
        try:
            _check_server(uri)
        except TrackingUnreachable as down:
            now = down.args[0].partition(f"{uri} ")[2].partition(": start it")[0]  # "is not reachable (...)"
            raise TrackingLost(f"{what}: MLflow tracking server {uri} stopped answering during the stage (it {now}): "
                               "run the stage again once it is back; the rerun completes what was registered") from err
        raise


def _probe_write(folder: Path) -> None:
    """Create `folder` if needed and write (then remove) a file in it: permissions, read-only mounts, quotas."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".kd-preflight-", dir=folder)
    os.close(fd)
    os.unlink(name)


def check_writable(*dirs: Path) -> None:
    for d in dirs:
        try:
            _probe_write(Path(d))
        except OSError as err:
            raise PreflightError(f"output folder {d} is not writable ({err.strerror or err})") from None


def checkpoint_bytes(n_parameters: int, training: TrainingConfig, bytes_per_param: int = 4) -> int:
    """Disk a training stage needs at its peak: the resume checkpoints (weights + optimizer state each, up
    to CHECKPOINTS_KEPT + 1 while the oldest is rotated out) when `save_steps` is set, plus the final model
    and its temporary copy (atomic save), with a 20% margin for tokenizer, logs and rounding."""
    weights = n_parameters * bytes_per_param
    need = 2 * weights
    if training.save_steps:
        need += (CHECKPOINTS_KEPT + 1) * weights * (1 + OPTIMIZER_STATE_FACTOR)
    return int(need * DISK_MARGIN)


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(out_dir: Path, n_parameters: int, training: TrainingConfig) -> None:
    need = checkpoint_bytes(n_parameters, training)
    free = shutil.disk_usage(_existing_ancestor(out_dir)).free
    if free < need:
        raise PreflightError(
            f"not enough free disk for {out_dir}: need ~{_gb(need)} ({n_parameters:,} parameters, "
            f"save_steps={training.save_steps}), {_gb(free)} free: free space or set run_dir elsewhere")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def preflight(cfg: PipelineConfig, stage: str, *, model, tokenizer, training: TrainingConfig, out_dir: Path,
              teacher=None, student_source=None, teacher_tokenizer=None) -> None:
    """All checks before a training stage (the tracking store was checked before the stage started); raises one
    `PreflightError` naming the stage and the problem. `teacher_tokenizer`: the teacher's own, for a method that
    distils across tokenizers (each model is checked against its own tokenizer)."""
    from kd_core.models.build import ModelError, check_vocab_compatible, count_parameters

    try:
        check_writable(Path(out_dir).parent, Path(cfg.run_dir) / "train_info")
        if teacher is not None or student_source is not None:
            try:
                check_vocab_compatible(teacher, model, tokenizer, student_source, teacher_tokenizer)
            except ModelError as err:
                raise PreflightError(str(err)) from None
        check_disk(Path(out_dir), count_parameters(model), training)
    except PreflightError as err:
        raise type(err)(f"preflight of {stage}: {err}") from None
