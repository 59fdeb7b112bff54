"""The MLflow model registry: a model logged and registered as a version (with its model card), the versions of a
registered model with their tags, metrics and aliases, and a version looked up by alias, number or tag.

A version carries the few tags people filter the registry's list by (`VERSION_TAGS`: role, model, method,
divergence, teacher, data version, params hash, git commit, run folder, weights hash); its full lineage (those and
every other `kd.*` fact: DVC hashes of its data and model, hashes of its eval prompts, teacher chain, sizes) is
one JSON document, the tag `kd.lineage` of the version's run (its *Source run* in the UI). `version_rows` and
`get_version` return both merged, so readers see one dict of `kd.*` tags, for versions registered either way
(older versions carry every fact as a version tag).

The champion rule that moves the `champion` alias: `kd_core.tracking.champion`; the DVC hashes a version came
from: `kd_core.tracking.lineage`.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from kd_core import faults

VERSION_TAGS = ("kd.role", "kd.model", "kd.method", "kd.divergence", "kd.teacher", "kd.data_version",
                "kd.params_hash", "kd.git_commit", "kd.run_dir", "kd.model_hash")
LINEAGE_TAG = "kd.lineage"  # a tag of the version's run: the version's full `kd.*` facts as one JSON object
LINEAGE_FILE = "kd_lineage.json"  # the same document as an artifact of the run, when it is over MLflow's tag limit
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]
GENERATION_PARAMS = ("max_new_tokens", "do_sample", "temperature", "top_p")  # the params schema of a logged model


def log_model_and_register(model_dir: Path, registered_name: str, tags: dict[str, str], metrics: dict[str, float],
                           *, artifact_name: str = "model", card: str | None = None, prompt_template: str | None = None,
                           generation: dict | None = None, example: str | None = None) -> int:
    """Log the saved model as an MLflow transformers model (`artifact_name`) in the active run, register a
    version with the `VERSION_TAGS` of `tags` (every one of `tags` in the run's `LINEAGE_TAG`), and with a model
    `card` (markdown): log it as `<artifact_name>/README.md` and make it the version's description.

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
    shown = {k: tags[k] for k in VERSION_TAGS if k in tags}
    mlflow.set_tags(shown | {LINEAGE_TAG: _lineage_tag(json.dumps(tags, sort_keys=True))})
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
    version = mlflow.register_model(info.model_uri, registered_name, tags=shown | {PENDING_TAG: "true"})
    faults.kill_tracking_server()  # (a test hook: the server dies between the registry's calls)
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
        run = client.get_run(v.run_id) if v.run_id else None
        rows.append({"name": registered_name, "version": int(v.version), "run_id": v.run_id,
                     "tags": _all_tags(v.tags, run), "metrics": dict(run.data.metrics) if run else {},
                     "aliases": aliases.get(str(v.version), [])})
    return rows


def _lineage_tag(document: str) -> str:
    """The `LINEAGE_TAG` value for the lineage `document` of the active run: the document itself, or where it is
    longer than MLflow takes in a tag (8,000 characters: many teachers, eval sets, data files) the name of the
    run's artifact `LINEAGE_FILE` that holds it."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    if len(document) <= MAX_TAG_VAL_LENGTH:
        return document
    mlflow.log_text(document, LINEAGE_FILE)
    return json.dumps(LINEAGE_FILE)


def _all_tags(version_tags: dict, run) -> dict[str, str]:
    """A version's `kd.*` facts: its run's `LINEAGE_TAG` document (in the tag, or in the artifact it names; none for
    a version registered before it existed) under the version's own tags (those set later win: `kd.last_seen_*`,
    the pending mark)."""
    lineage = json.loads(run.data.tags.get(LINEAGE_TAG, "{}")) if run is not None else {}
    if isinstance(lineage, str):  # the artifact's name
        lineage = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{lineage}"))
    return lineage | dict(version_tags)


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
    run = client.get_run(v.run_id) if v.run_id else None
    return {"name": name, "version": int(v.version), "run_id": v.run_id, "tags": _all_tags(v.tags, run),
            "aliases": aliases}
