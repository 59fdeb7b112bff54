"""Stage `register`: log every model of the run to MLflow as a transformers model, register a version of each
(its facts: role, method, divergence, teacher chain, sizes, params hash, data version, weights hash, git and DVC
lineage, eval prompts; a few as version tags, all in its run's lineage: `kd_core.tracking.registry`), then apply
the champion rule. A model whose weights are already registered (same `kd.model_hash`) is not registered again: its
version is tagged with this run instead. Idempotent under failures: a version cut off after its creation (the
MLflow server gone) keeps the tag `kd.pending` and is completed by the rerun, never registered twice."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from kd_core.config import PipelineConfig
from kd_core.data.template import format_prompt
from kd_core.errors import MissingInput
from kd_core.io import read_jsonl, tree_hash, write_json_atomic
from kd_core.run import RunPaths, data_version
from kd_core.tracking import lineage, registry, runs
from kd_core.tracking.champion import pinned_set, prompts_hash, prompts_tag, update_champion
from kd_core.tracking.model_card import model_card

log = logging.getLogger("kd")


def version_tags(cfg: PipelineConfig, paths: RunPaths, name: str, info: dict, teacher_info: dict, version: str) -> dict:
    """The registry tags of one model of the run (the teacher or a student)."""
    is_teacher = name == cfg.teacher.name
    student_cfg = None if is_teacher else cfg.student(name)
    teaches = [s.name for s in cfg.students.values() if s.teacher == name]
    role = "teacher" if is_teacher else "assistant" if teaches else "student"
    return {"kd.role": role, "kd.model": name,
            "kd.method": "teacher-sft" if is_teacher else student_cfg.method,
            "kd.divergence": "" if is_teacher else info.get("divergence", ""),
            "kd.teacher": "" if is_teacher else student_cfg.teacher, "kd.root_teacher": cfg.teacher.name,
            "kd.train_data": "train" if is_teacher else student_cfg.train_data,
            "kd.teacher_parameters": str(teacher_info.get("parameters") or ""),  # (none: a served teacher)
            "kd.parameters": str(info["parameters"]), "kd.params_hash": cfg.fingerprint(),
            "kd.data_version": version, "kd.run_dir": str(paths.root),
            "kd.finetuned": str(info.get("finetuned", False)).lower()} | \
        ({"kd.trainable_parameters": str(info["trainable_parameters"])} if "trainable_parameters" in info else {})


def lineage_tags(cfg: PipelineConfig, name: str, lock_text: str | None) -> dict[str, str]:
    """The git revision and, when the run is recorded in DVC, the DVC hashes of the data and the model folder
    the version came from (`kd lineage` prints them, `kd checkout` restores those files): taken from dvc.lock
    when it describes the files of this run (see `lineage.version_lineage`)."""
    git = lineage.git_revision()
    tags = {"kd.git_commit": git["commit"], "kd.git_dirty": git["dirty"]}
    if lock_text:
        stage = "train_teacher" if name == cfg.teacher.name else f"finetune@{name}"
        for key, value in lineage.version_lineage(Path.cwd(), lock_text, cfg.run_dir, stage).items():
            tags["kd.dvc." + re.sub(r"[^\w./ -]", "_", key.replace(":", "."))] = value
    return tags


def _version_params(cfg: PipelineConfig, name: str) -> dict:
    """The settings that made the model, as MLflow params of its register run (MLflow's compare view)."""
    if name == cfg.teacher.name:
        return {"teacher": cfg.teacher.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json")}
    return {"student": cfg.student(name).model_dump(mode="json"), "data": cfg.data.model_dump(mode="json")}


def _example_instruction(cfg: PipelineConfig, paths: RunPaths, name: str) -> str | None:
    """An instruction the model was evaluated on (without an input): the logged model's input example."""
    for set_name in cfg.evaluation.eval_sets:
        per_prompt = paths.generations(name) / f"{set_name}.jsonl"
        if per_prompt.is_file():
            row = next((r for r in read_jsonl(per_prompt) if not (r.get("context") or "").strip()), None)
            if row is not None:
                return row["instruction"].strip()
    return None


def eval_prompt_tags(cfg: PipelineConfig, paths: RunPaths, name: str) -> dict[str, str]:
    """`kd.eval_prompts.<set>`: the hash of the prompts the model was evaluated on, per eval set (the champion
    rule compares versions only on identical prompts)."""
    tags = {}
    for set_name in cfg.evaluation.eval_sets:
        per_prompt = paths.generations(name) / f"{set_name}.jsonl"
        if per_prompt.is_file():
            tags[prompts_tag(set_name)] = prompts_hash(read_jsonl(per_prompt))
    return tags


def register(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Log every model of the run to MLflow as a transformers model, register it, move `champion`. A teacher served
    by another process (teacher.model.endpoint) is not registered (its weights are not here): `not_registered`."""
    names = [cfg.teacher.name] + list(cfg.students)
    missing = [n for n in names if not paths.metrics(n).is_file()]
    if missing:
        raise MissingInput(f"no metrics for {missing}: run the evaluate stage first (nothing registered)")
    version = data_version(paths)
    teacher_info = json.loads(paths.train_info(cfg.teacher.name).read_text())
    registered: dict = {"versions": {}}
    if cfg.is_served(cfg.teacher.name):
        why = f"served by another process ({teacher_info['served']['url']}): no weights here, not registered"
        registered["not_registered"] = {cfg.teacher.name: why}
        log.info("%s: %s", cfg.teacher.name, why)
        names.remove(cfg.teacher.name)
    lock = Path("dvc.lock")
    lock_text = lineage.read_lock()  # the stages before this one are recorded (a flow settles its commits first)
    for name in names:
        info = json.loads(paths.train_info(name).read_text())
        metrics = json.loads(paths.metrics(name).read_text())
        tags = version_tags(cfg, paths, name, info, teacher_info, version)
        reg_name = cfg.tracking.register_teacher_as if name == cfg.teacher.name else cfg.tracking.registered_model
        tags["kd.model_hash"] = tree_hash(paths.model(name))
        tags |= lineage_tags(cfg, name, lock_text) | eval_prompt_tags(cfg, paths, name)
        existing = registry.version_with_tag(reg_name, "kd.model_hash", tags["kd.model_hash"])
        if existing is not None:  # the same weights: no duplicate version
            pending = registry.is_pending(reg_name, existing)
            if pending:  # cut off by a failure (a server gone) after it was created: completed now
                registry.complete_version(reg_name, existing, model_card(cfg, name, tags, metrics))
            registry.tag_version(reg_name, existing, {"kd.last_seen_params_hash": tags["kd.params_hash"],
                                                      "kd.last_seen_run_dir": tags["kd.run_dir"]})
            registered["versions"][name] = {"registered_model": reg_name, "version": existing, "new": pending}
            continue
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        numeric |= {"train_time_s": info.get("train_time_s", 0.0), "parameters": info["parameters"]}
        card = model_card(cfg, name, tags, metrics)  # the folder's README.md, now with metrics and the version's tags
        with runs.stage_run(cfg, paths.root, "register", name, params=_version_params(cfg, name)):
            for set_name in cfg.evaluation.eval_sets:  # per-prompt scores: the champion's paired test reads them
                per_prompt = paths.generations(name) / f"{set_name}.jsonl"
                if per_prompt.is_file():
                    runs.log_artifact(per_prompt, "eval")
            if (paths.model(name) / "adapter").is_dir():  # a LoRA model: its adapter (models.adapters.ADAPTER_DIR)
                runs.log_artifacts(paths.model(name) / "adapter", f"{name}/adapter")
            if any(k.startswith("kd.dvc.") for k in tags):  # what `kd checkout` restores
                runs.log_artifact(lock, "lineage")
            number = registry.log_model_and_register(
                paths.model(name), reg_name, tags, numeric, artifact_name=name, card=card,
                prompt_template=format_prompt({"instruction": "{prompt}"}, cfg.data.template),
                generation={"max_new_tokens": cfg.evaluation.generation.max_new_tokens, "do_sample": False,
                            "temperature": cfg.evaluation.generation.temperature,
                            "top_p": cfg.evaluation.generation.top_p},
                example=_example_instruction(cfg, paths, name))
        registered["versions"][name] = {"registered_model": reg_name, "version": number, "new": True}
    # the prompts of the champion metric's set, as this run's models were evaluated on them (the teacher's; a
    # served teacher's students')
    set_name = pinned_set(cfg.tracking.champion)
    files = [paths.generations(n) / f"{set_name}.jsonl" for n in [cfg.teacher.name, *cfg.students]]
    pinned = next((f for f in files if f.is_file()), None)
    registered["champion"] = update_champion(cfg, prompts_hash(read_jsonl(pinned)) if pinned else None)
    write_json_atomic(paths.registry, registered)
    return registered
