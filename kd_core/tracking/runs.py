"""MLflow runs: one parent run per pipeline (run folder), a nested run per stage, and what a stage logs in its run.

Stages run as separate processes under DVC, so the parent run's id is kept in the run folder
(`mlflow_parent.json`) and each stage attaches to it. The store itself: `kd_core.tracking.store`; registered
versions: `kd_core.tracking.registry`.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from kd_core.config import PipelineConfig
from kd_core.io import write_json_atomic
from kd_core.run import is_main_process
from kd_core.tracking import store


def _parent_file(run_dir: Path) -> Path:
    return run_dir / "mlflow_parent.json"


def parent_run_id(cfg: PipelineConfig, run_dir: Path) -> str:
    """The pipeline's parent run for this run folder: the flow's own (`start_pipeline_run`), else the one the
    folder's stages share while it is running (`dvc repro`, `kd stage`); a finished one, or one of another
    store or experiment, is not reused: a new parent is started."""
    store.setup(cfg)
    saved = _saved_parent(run_dir, cfg.tracking.experiment)
    return saved if saved is not None else _new_parent(cfg, run_dir)


def _saved_parent(run_dir: Path, experiment: str) -> str | None:
    """The parent run saved in the run folder, while it is RUNNING in `experiment` of the store set up now (the
    store answers: a run of another store is not found in this one)."""
    path = _parent_file(run_dir)
    if not path.is_file():
        return None
    run_id = json.loads(path.read_text())["run_id"]
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None  # another store, or the store was reset
    current = mlflow.get_experiment_by_name(experiment)
    if current is None or run.info.experiment_id != current.experiment_id:
        return None
    return run_id if run.info.status == "RUNNING" else None


def experiment_of(run_id: str) -> str:
    """The experiment id of a run."""
    return MlflowClient().get_run(run_id).info.experiment_id


def start_pipeline_run(cfg: PipelineConfig, run_dir: Path, name: str | None = None) -> str:
    """A new parent run for the pipeline of this run folder; later stages of the folder nest under it. A parent
    left RUNNING by a killed pipeline is marked KILLED, with its stage runs that were still running."""
    store.setup(cfg)
    previous = _saved_parent(run_dir, cfg.tracking.experiment)
    if previous is not None:
        _close_killed_runs(previous, experiment_of(previous))
        MlflowClient().set_terminated(previous, "KILLED")
    return _new_parent(cfg, run_dir, name)


def _new_parent(cfg: PipelineConfig, run_dir: Path, name: str | None = None) -> str:
    """A new parent run in the store (set up already: :func:`kd_core.tracking.store.setup`), its id saved in the run
    folder for its stages."""
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    run = MlflowClient().create_run(
        exp.experiment_id, run_name=name or f"pipeline:{run_dir.name}",
        tags={"kd.role": "pipeline", "kd.run_dir": str(run_dir), "kd.params_hash": cfg.fingerprint()})
    MlflowClient().set_terminated(run.info.run_id, "RUNNING")
    write_json_atomic(_parent_file(run_dir), {"run_id": run.info.run_id})
    return run.info.run_id


def end_pipeline_run(run_id: str, *, params: dict | None = None, tags: dict[str, str] | None = None,
                     artifacts: dict[str, Path] | None = None, status: str = "FINISHED") -> None:
    """Close the pipeline's parent run with what describes the whole run: the resolved config as params, tags
    (git revision), and files (params.yaml, dvc.lock, the comparison report and plots) as artifacts."""
    client = MlflowClient()
    if params:
        flat: dict[str, Any] = {}
        _flatten("", params, flat)
        items = sorted(flat.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in items[start:start + 100]])
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    for artifact_path, path in (artifacts or {}).items():
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_path or None)
    client.set_terminated(run_id, status)


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj


@contextlib.contextmanager
def stage_run(cfg: PipelineConfig, run_dir: Path, stage: str, model_name: str | None = None,
              params: dict | None = None, main_only: bool = False,
              result: dict | None = None) -> Iterator[mlflow.ActiveRun | None]:
    """A nested MLflow run for one stage; FAILED if the stage raises. `result`: the stage's result, which the block
    may fill in, logged as the run's metrics (:func:`log_metrics`) when the block ends without error. `main_only`:
    under `torchrun` / `deepspeed` only rank 0 tracks; the other ranks get no run (and the log_* calls below do
    nothing there)."""
    if main_only and not is_main_process():
        yield None
        return
    parent = parent_run_id(cfg, run_dir)
    name = f"{stage}:{model_name}" if model_name else stage
    experiment = experiment_of(parent)
    _close_killed_runs(parent, experiment, stage, model_name or "")
    # a child of the parent run without activating the parent (activating and leaving it would end it)
    run = mlflow.start_run(run_name=name, experiment_id=experiment, parent_run_id=parent,
                           tags={"kd.stage": stage, "kd.model": model_name or "", "kd.params_hash": cfg.fingerprint()})
    try:
        if params:
            flat: dict[str, Any] = {}
            _flatten("", params, flat)
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        yield run
        log_metrics(result or {})
    except BaseException:
        # the store may be what failed (a server gone, a full disk): the stage's own error is the one reported;
        # a run left RUNNING is closed as KILLED by the next run of the stage
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def _close_killed_runs(parent: str, experiment: str, stage: str | None = None, model: str = "") -> None:
    """Stage runs still RUNNING under a pipeline run (all of them, or those of `stage` and `model`) when the
    same stage or a new pipeline starts belong to a process that was killed (SIGKILL leaves no chance to close
    them): mark them KILLED."""
    client = MlflowClient()
    query = f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"
    if stage is not None:
        query += f" and tags.`kd.stage` = '{stage}' and tags.`kd.model` = '{model}'"
    for run in client.search_runs([experiment], filter_string=query):
        client.set_terminated(run.info.run_id, "KILLED")


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params(params)


def log_metrics(values: dict[str, Any]) -> None:
    """The numeric entries of `values` (booleans and text left out) as metrics of the active run (rank 0 only)."""
    if not is_main_process():
        return
    numeric = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric)


def log_dict(obj: dict, artifact_file: str) -> None:
    mlflow.log_dict(obj, artifact_file)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: Path, artifact_path: str) -> None:
    """Every file of `folder` as artifacts of the active run under `artifact_path`."""
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


@contextlib.contextmanager
def downloaded_artifact(run_id: str, artifact_path: str) -> Iterator[Path | None]:
    """A run's artifact as a local file in a temporary folder that is removed when the block ends (MLflow's own
    download folders are never removed: a scheduled pipeline would leave two per champion decision); None when
    the run has no such artifact."""
    with tempfile.TemporaryDirectory(prefix="kd-artifact-") as folder:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                             dst_path=folder))
        except (mlflow.exceptions.MlflowException, OSError):
            local = None
        yield local


def log_step(entry: dict) -> None:
    """One Trainer log entry ({step, loss, ...}) as MLflow metrics of the active run."""
    metrics = {k: float(v) for k, v in entry.items() if k != "step"}
    if metrics:
        mlflow.log_metrics(metrics, step=int(entry["step"]))
