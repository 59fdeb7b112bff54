"""MLflow: one parent run per pipeline (run folder), a nested run per stage, the model registry.

The tracking store defaults to a sqlite file in the project (no server); `tracking.tracking_uri` in
params or `MLFLOW_TRACKING_URI` points it at a real server. Stages run as separate processes under DVC,
so the parent run's id is kept in the run folder (`mlflow_parent.json`) and each stage attaches to it.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from kd_core.config import PipelineConfig
from kd_core.interrupts import kill_tracking_server
from kd_core.io import write_json_atomic
from kd_core.preflight import check_tracking, sqlite_file, tracking_uri  # noqa: F401  (tracking_uri: part of this API)
from kd_core.run import is_main_process

PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


def setup(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store and select (creating if needed) the experiment."""
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


def _parent_file(run_dir: Path) -> Path:
    return run_dir / "mlflow_parent.json"


def parent_run_id(cfg: PipelineConfig, run_dir: Path) -> str:
    """The pipeline's parent run for this run folder: the flow's own (`start_pipeline_run`), else the one the
    folder's stages share while it is running (`dvc repro`, `kd stage`); a finished one, or one of another
    store or experiment, is not reused: a new parent is started."""
    setup(cfg)
    saved = _saved_parent(cfg, run_dir)
    return saved if saved is not None else start_pipeline_run(cfg, run_dir)


def _saved_parent(cfg: PipelineConfig, run_dir: Path) -> str | None:
    path = _parent_file(run_dir)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("tracking_uri") != tracking_uri(cfg) or saved.get("experiment") != cfg.tracking.experiment:
        return None
    try:
        run = MlflowClient().get_run(saved["run_id"])
    except mlflow.exceptions.MlflowException:
        return None  # the store was reset
    return saved["run_id"] if run.info.status == "RUNNING" else None


def experiment_of(run_id: str) -> str:
    """The experiment id of a run."""
    return MlflowClient().get_run(run_id).info.experiment_id


def start_pipeline_run(cfg: PipelineConfig, run_dir: Path, name: str | None = None) -> str:
    """A new parent run for the pipeline of this run folder; later stages of the folder nest under it. A parent
    left RUNNING by a killed pipeline is marked KILLED, with its stage runs that were still running."""
    setup(cfg)
    previous = _saved_parent(cfg, run_dir)
    if previous is not None:
        _close_killed_runs(previous, experiment_of(previous))
        MlflowClient().set_terminated(previous, "KILLED")
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    run = MlflowClient().create_run(
        exp.experiment_id, run_name=name or f"pipeline:{run_dir.name}",
        tags={"kd.role": "pipeline", "kd.run_dir": str(run_dir), "kd.params_hash": cfg.fingerprint()})
    MlflowClient().set_terminated(run.info.run_id, "RUNNING")
    write_json_atomic(_parent_file(run_dir), {"run_id": run.info.run_id, "tracking_uri": tracking_uri(cfg),
                                              "experiment": cfg.tracking.experiment})
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
              params: dict | None = None, main_only: bool = False) -> Iterator[mlflow.ActiveRun | None]:
    """A nested MLflow run for one stage; FAILED if the stage raises. `main_only`: under `torchrun` /
    `deepspeed` only rank 0 tracks; the other ranks get no run (and the log_* calls below do nothing there)."""
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


GENERATION_PARAMS = ("max_new_tokens", "do_sample", "temperature", "top_p")  # the params schema of a logged model


def log_model_and_register(model_dir: Path, registered_name: str, tags: dict[str, str], metrics: dict[str, float],
                           *, artifact_name: str = "model", card: str | None = None, prompt_template: str | None = None,
                           generation: dict | None = None, example: str | None = None) -> int:
    """Log the saved model as an MLflow transformers model (`artifact_name`) in the active run, register a
    version with `tags`, and with a model `card` (markdown): log it as `<artifact_name>/README.md` and make it
    the version's description.

    The served model (pyfunc, `mlflow models serve`) answers plain instructions as the evaluation's greedy
    answers: `prompt_template` (with `{prompt}` where the instruction goes) wraps each input as the model was
    trained, only the new text comes back (stripped, as the evaluation strips it), and the prompt is tokenized as
    the evaluation tokenizes it (special tokens added; a prompt longer than the context keeps its end).
    `generation` ({max_new_tokens, do_sample, temperature, top_p}) are the defaults of the signature's params
    schema: a request's `params` override them (sampling as the evaluation samples: no top-k cut-off).
    `example`: an instruction for the input example (with the params)."""
    import logging

    from mlflow.models import infer_signature
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # it looks for a hub model card and license for local folders: noise, not information
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    # top_k 0 below (no top-k cut-off when a request samples) draws "generation flags are not valid: ['top_k']"
    # whenever the greedy default runs, first here on the input example: noise as well
    logging.getLogger("transformers.generation.configuration_utils").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.set_tags(tags)
    params = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_p": 1.0} | (generation or {})
    params = {k: params[k] for k in GENERATION_PARAMS}
    # fixed settings of the served pipeline (not request params): the evaluation's prompt encoding and sampling
    model_config = params | {"return_full_text": False, "add_special_tokens": True, "top_k": 0}
    if getattr(tokenizer, "model_max_length", 0) < 10**9:  # a real context length (unset: ~1e30)
        model_config["handle_long_generation"] = "hole"  # a long prompt keeps its end, as in evaluation
    inputs = [example or "sort ascending: 4 35 13 33"]
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, name=artifact_name, task="text-generation",
        pip_requirements=PIP_REQUIREMENTS, prompt_template=prompt_template,
        input_example=(inputs, {"max_new_tokens": params["max_new_tokens"]}),
        signature=infer_signature(inputs, ["an answer"], params=params), model_config=model_config)
    if card is not None:
        mlflow.log_text(card, f"{artifact_name}/README.md")
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags | {PENDING_TAG: "true"})
    kill_tracking_server()  # (a test hook: the server dies between the registry's calls)
    complete_version(registered_name, int(version.version), card)
    return int(version.version)


# A version is created with this tag and loses it once complete (its description set): one that still has it was
# cut off by a failure (a server gone) and is completed by the rerun (`complete_version`), never duplicated.
PENDING_TAG = "kd.pending"


def complete_version(registered_name: str, version: int, card: str | None) -> None:
    """The rest of a version's registration: the model `card` as its description (the version page renders
    markdown: the card without its YAML metadata block; README.md keeps it), then the pending tag removed."""
    client = MlflowClient()
    if card is not None:
        body = re.sub(r"\A---\n.*?\n---\n+", "", card, flags=re.S)
        client.update_model_version(registered_name, str(version), description=body)
    client.delete_model_version_tag(registered_name, str(version), PENDING_TAG)


def is_pending(registered_name: str, version: int) -> bool:
    return PENDING_TAG in MlflowClient().get_model_version(registered_name, str(version)).tags


def version_rows(registered_name: str) -> list[dict]:
    """Every registered version with its tags, its run's metrics and aliases, oldest first."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{registered_name}'")
    except mlflow.exceptions.MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        for alias, ver in client.get_registered_model(registered_name).aliases.items():
            aliases.setdefault(str(ver), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
        rows.append({"name": registered_name, "version": int(v.version), "run_id": v.run_id, "tags": dict(v.tags),
                     "metrics": dict(metrics), "aliases": aliases.get(str(v.version), [])})
    return rows


def set_alias(registered_name: str, alias: str, version: int) -> None:
    MlflowClient().set_registered_model_alias(registered_name, alias, str(version))


def version_with_tag(registered_name: str, key: str, value: str) -> int | None:
    """The newest registered version whose tag `key` equals `value`, None when there is none."""
    try:
        versions = MlflowClient().search_model_versions(f"name='{registered_name}' and tags.`{key}` = '{value}'")
    except mlflow.exceptions.MlflowException:
        return None
    return max((int(v.version) for v in versions), default=None)


def tag_version(registered_name: str, version: int, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, str(version), key, value)


def get_version(spec: str) -> dict:
    """A registered version by `NAME@alias`, `NAME:version` or `NAME` (the newest): {name, version, run_id,
    tags, aliases}. A LookupError names what is registered when there is no such version."""
    client = MlflowClient()
    name, _, alias = spec.partition("@")
    name, _, number = name.partition(":")
    try:
        if alias:
            v = client.get_model_version_by_alias(name, alias)
        elif number:
            v = client.get_model_version(name, number)
        else:
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise LookupError(f"no registered model {name!r}")
            v = max(versions, key=lambda x: int(x.version))
    except mlflow.exceptions.MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
        raise LookupError(f"no registered version {spec!r} (registered models: {known})") from None
    aliases = [a for a, ver in client.get_registered_model(name).aliases.items() if str(ver) == str(v.version)]
    return {"name": name, "version": int(v.version), "run_id": v.run_id, "tags": dict(v.tags), "aliases": aliases}
