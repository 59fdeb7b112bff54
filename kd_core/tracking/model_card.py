"""The model card of a model of the run: a Hugging Face `README.md` (YAML metadata, then markdown) saying what the
model is, what taught it, on which data, with which objective, how to prompt it, how it was produced and, once
evaluated, how well it does (with CIs). One builder for both places it lives:

- the saved model folder (`runs/<run>/models/<name>/README.md`), written by the stage that writes the folder
  (train_teacher, finetune) with what is known then: `model_card(cfg, name, card_tags(cfg, name, info))`, no
  metrics; its text depends on the config and the model only (no run folder, time or git revision), so the same
  weights give the same folder (`kd.model_hash`);
- the registered MLflow version (register stage): the full card, with the version's tags and metrics, logged as
  `<name>/README.md` beside the logged model and used as the version's description.
"""

from __future__ import annotations

import re

import yaml

from kd_core.config import PipelineConfig
from kd_core.data.template import format_prompt

OBJECTIVES = {
    "sft": "cross-entropy on the reference responses (no teacher)",
    "seqkd": "cross-entropy on teacher-generated responses (sequence-level KD)",
    "kd": "token-level KD on the references: α·CE + (1−α)·D(p_teacher ‖ q_student) per response token",
    "atkd": "adaptive teaching KD: target / non-target KL split, hard tokens by teacher uncertainty",
    "gkd": "generalized KD on a mix of student samples and references",
    "imitkd": "imitation KD on student-generated prefixes",
    "minillm": "reverse KL by policy gradient on student samples (MiniLLM)",
    "distillm": "skew divergence with adaptive off-policy replay (DistiLLM)",
    "okd": "online KD: a trainable module inside the teacher, teacher and student updated together",
    "intermediate": "hidden-state / attention matching plus logit KD",
    "progressive": "layer-wise progressive distillation",
}
EXAMPLE_INSTRUCTION = "sort ascending: 4 35 13 33"


def card_tags(cfg: PipelineConfig, name: str, info: dict) -> dict[str, str]:
    """The `kd.*` facts of a model known when its folder is saved (a subset of the register stage's version tags),
    from its `train_info` (the teacher's, or a student's after finetune)."""
    is_teacher = name == cfg.teacher.name
    tags = {"kd.model": name, "kd.root_teacher": cfg.teacher.name, "kd.parameters": str(info.get("parameters", ""))}
    if "trainable_parameters" in info:  # (LoRA: the adapters)
        tags["kd.trainable_parameters"] = str(info["trainable_parameters"])
    if is_teacher:
        return tags | {"kd.role": "teacher", "kd.method": "teacher-sft", "kd.train_data": "train"}
    student = cfg.student(name)
    return tags | {"kd.role": "student", "kd.method": student.method, "kd.divergence": info.get("divergence", ""),
                   "kd.teacher": student.teacher, "kd.train_data": student.train_data,
                   "kd.finetuned": str(info.get("finetuned", student.finetune.enabled)).lower()}


def _metric_lines(metrics: dict) -> list[str]:
    lines = []
    for key in sorted(k for k in metrics if k.endswith("_mean")):
        base = key.removesuffix("_mean")
        lo, hi = metrics.get(f"{base}_ci_low"), metrics.get(f"{base}_ci_high")
        ci = f" (95% CI {lo:.2f} to {hi:.2f})" if lo is not None and hi is not None else ""
        lines.append(f"| {base} | {metrics[key]:.2f}{ci} |")
    for key in sorted(k for k in metrics if k.endswith(("rougeL_greedy", "exact_match_greedy", "/ppl",
                                                         "top1_agreement", "answer_match_greedy"))
                      or re.search(r"/pass_at_\d+$", k)):
        lines.append(f"| {key} | {metrics[key]:.4g} |")
    return lines


def _hub_id(checkpoint: str | None) -> str | None:
    """A checkpoint's hub name (`org/model`), None for a local folder or no checkpoint."""
    if not checkpoint or checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
        return None
    return checkpoint


def _source(source) -> str:
    if source.config is not None:
        c = source.config
        return f"built from a config ({c.arch}, {c.n_layer} layers, hidden {c.hidden}, {c.n_head} heads), " \
               "randomly initialised"
    if source.checkpoint is not None:
        return f"checkpoint `{source.checkpoint}`" + (f" (GGUF `{source.gguf_file}`)" if source.gguf_file else "")
    return f"the teacher's layers {source.from_teacher_layers}"


def _training(training) -> str:
    length = f"{training.max_steps} steps" if training.max_steps > 0 else f"{training.epochs:g} epochs"
    return f"{length}, learning rate {training.learning_rate:g} ({training.lr_scheduler}), batch size " \
           f"{training.batch_size * training.grad_accum}, {training.precision}"


def _weights_trained(lora, trainable: str | None) -> str:
    """What training changed: every weight, or LoRA adapters (r, α, targets), merged into the saved weights."""
    if lora is None:
        return "all of them"
    targets = ", ".join(f"`{t}`" for t in lora.target_modules) if lora.target_modules else "peft's default layers"
    return (f"LoRA adapters only ({trainable + ' parameters; ' if trainable else ''}r = {lora.r}, α = {lora.alpha:g}, "
            f"scaling α/r = {lora.alpha / lora.r:g}, dropout {lora.dropout:g}, on {targets}); merged into these "
            f"weights, the adapter itself in `adapter/` (peft)")


def _data(cfg: PipelineConfig) -> str:
    d = cfg.data
    source = {"builtin": f"the built-in synthetic tasks ({d.builtin_examples} examples)",
              "file": f"the file `{d.path}`", "hub": f"the hub data set `{d.hub_name}` (split `{d.hub_split}`)"}
    return source[d.source]


def model_card(cfg: PipelineConfig, name: str, tags: dict[str, str], metrics: dict | None = None,
               template_text: str | None = None) -> str:
    """README.md of one model of the run (the teacher or a student). `tags`: its `kd.*` facts (`card_tags` when
    the folder is saved, the registered version's tags at register time); `metrics`: its evaluation, None when
    the card is written before the evaluate stage (the card then points to the registered version)."""
    is_teacher = name == cfg.teacher.name
    student = None if is_teacher else cfg.student(name)
    model_cfg = cfg.teacher if is_teacher else student
    if is_teacher:
        lora = cfg.teacher.lora if cfg.teacher.train and cfg.teacher.finetune == "lora" else None
    else:
        lora = student.lora
    method = "teacher-sft" if is_teacher else student.method
    # the registry names are params of the register stage, not of the stages that save the folder: the folder's
    # card (metrics None) names the setting, so that renaming the registered model leaves the folder current
    if metrics is None:
        registered = "<tracking.register_teacher_as>" if is_teacher else "<tracking.registered_model>"
    else:
        registered = cfg.tracking.register_teacher_as if is_teacher else cfg.tracking.registered_model
    template_text = template_text or format_prompt({"instruction": "<your instruction>", "context": ""},
                                                   cfg.data.template)
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["knowledge-distillation", method] + ([tags["kd.divergence"]] if tags.get("kd.divergence") else []),
            "base_model": _hub_id(model_cfg.model.checkpoint),
            "datasets": [cfg.data.hub_name or cfg.data.path or f"builtin:{cfg.data.builtin_examples}"]}
    meta = {k: v for k, v in meta.items() if v is not None}
    if is_teacher:
        objective = ("supervised fine-tuning on the reference responses" + (" (LoRA, merged)" if cfg.teacher.finetune
                                                                            == "lora" else "")
                     if cfg.teacher.train else "none: the checkpoint as is (teacher.train is false)")
    else:
        objective = OBJECTIVES.get(method, method)
        if tags.get("kd.divergence"):
            objective += f"; divergence `{student.divergence}` {dict(student.divergence_args) or ''}".rstrip() + \
                f", temperature {student.temperature}, α = {student.alpha}"
    teacher_line = "—"
    if not is_teacher:
        teacher_line = f"{tags.get('kd.teacher') or student.teacher} (root teacher {cfg.teacher.name}"
        teacher_line += f", {tags['kd.teacher_parameters']} parameters)" if tags.get("kd.teacher_parameters") else ")"
    data_line = f"`{tags.get('kd.train_data', 'train')}`" + \
        (" split" if tags.get("kd.train_data", "train") == "train" else " (a teacher-generated transfer set)") + \
        f" of {_data(cfg)}, `{cfg.data.template}` prompt template"
    if tags.get("kd.data_version"):
        data_line += f"; data version {tags['kd.data_version']}"
    if student is not None:
        ft = student.finetune
        data_line += "; post-distillation fine-tuning: " + (f"{ft.epochs:g} epoch(s) at {ft.lr_scale:g}× the learning "
                                                            "rate" if ft.enabled else "none")
    stages = "`kd stage train_teacher`" if is_teacher else \
        f"`kd stage distill --model {name}`, then `kd stage finetune --model {name}`"
    produced = f"kd-pipeline, {stages}; seed {model_cfg.training.seed if model_cfg.training.seed is not None else cfg.seed}"
    if tags.get("kd.run_dir"):
        produced += f"; run `{tags['kd.run_dir']}`, params hash {tags.get('kd.params_hash')}, " \
                    f"git {tags.get('kd.git_commit') or 'unknown'}; `kd lineage` prints the DVC hashes of its data"
    gen = cfg.evaluation.generation
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {name}: {'teacher' if is_teacher else 'distilled student'} ({tags.get('kd.parameters')} parameters)",
             "", f"- **Method**: `{method}` — {objective}",
             f"- **Teacher**: {teacher_line}",
             f"- **Initialisation**: {_source(model_cfg.model)}",
             f"- **Training data**: {data_line}",
             f"- **Training**: {_training(model_cfg.training) if not is_teacher or cfg.teacher.train else 'none'}",
             f"- **Weights trained**: {_weights_trained(lora, tags.get('kd.trainable_parameters'))}",
             f"- **Produced by**: {produced}",
             "", "## How to prompt it", "",
             f"The model was trained and evaluated on prompts in the `{cfg.data.template}` template; an instruction "
             "is wrapped as:", "", "```", template_text, "```", "",
             "The tokenizer's chat template renders a user message (an optional `context` key is the input) the same "
             "way, and `generation_config.json` holds the evaluation's greedy defaults (up to "
             f"{gen.max_new_tokens} new tokens, stop at EOS):", "", "```python",
             "from transformers import pipeline", "",
             'generate = pipeline("text-generation", model="<this folder>")',
             f'chat = generate([{{"role": "user", "content": "{EXAMPLE_INSTRUCTION}"}}])',
             'print(chat[0]["generated_text"][-1]["content"])', "```", "",
             f"Registered in MLflow (as `{registered}`), the model answers plain instructions (the template is "
             "applied for you; params `max_new_tokens`, `do_sample`, `temperature`, `top_p`); "
             f"`models:/{registered}/<version>` serves one version. From the project folder (MLflow starts "
             "`uvicorn` from PATH: the project's virtual environment goes first):", "", "```bash",
             f'PATH="$PWD/.venv/bin:$PATH" .venv/bin/mlflow models serve -m models:/{registered}'
             f'{"/latest" if is_teacher else "@champion"} --env-manager local --port 5001',
             "curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\",
             f"  -d '{{\"inputs\": [\"{EXAMPLE_INSTRUCTION}\"], \"params\": {{\"max_new_tokens\": {gen.max_new_tokens}}}}}'",
             "```", "", "## Evaluation", ""]
    if metrics is None:
        lines += ["Not known when this folder was written (evaluation runs after training): the registered version "
                  f"of this model in MLflow (`{registered}`, tag `kd.model` = `{name}`) carries the full card, with "
                  "metrics and 95% CIs, as its description; `kd compare` lists the versions side by side.", ""]
    else:
        lines += [f"Sampling at T = {gen.temperature}, top-p {gen.top_p}, {len(cfg.evaluation.sample_seeds)} seeds, "
                  f"up to {gen.max_new_tokens} new tokens; greedy decoding for the `_greedy` metrics; 95% CIs "
                  "bootstrap over prompts.",
                  "", "| metric | value |", "|---|---|", *_metric_lines(metrics), ""]
    return "\n".join(lines)
