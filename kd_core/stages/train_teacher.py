"""Stage `train_teacher`: supervised fine-tuning of the teacher (full or LoRA), or its checkpoint as is; the saved
folder is a complete Hugging Face model (chat template, context length, generation defaults, README.md card)."""

from __future__ import annotations

from kd_core.tracking import runs
from kd_core.config import PipelineConfig
from kd_core.io import atomic_dir, write_json_atomic, write_text_atomic
from kd_core.methods import get_method
from kd_core.tracking.model_card import card_tags, model_card
from kd_core.models.adapters import trainable_parameters, with_lora
from kd_core.models.build import count_parameters, make_model, set_generation_defaults
from kd_core.training.preflight import preflight
from kd_core.run import (RunPaths, is_main_process, load_run_tokenizer, load_source_tokenizer, load_train_set,
                         n_positions, training_seed)
from kd_core.training.trainer import train


def _save(model, tokenizer, out_dir) -> None:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def train_teacher(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Supervised fine-tuning of the teacher (full or LoRA), or materialise a given checkpoint as is."""
    teacher_cfg = cfg.teacher
    if cfg.is_served(teacher_cfg.name):  # served by another process: what it is, and the run's tokenizer
        from kd_core.teachers.served import save_served_teacher

        return save_served_teacher(cfg, paths)
    out_dir = paths.model(teacher_cfg.name)
    # a teacher built from config with its own `model.tokenizer` trains with it (a checkpoint's is the run's already)
    own = load_source_tokenizer(cfg, teacher_cfg.model, "teacher.model.tokenizer") \
        if teacher_cfg.model.config is not None else None
    tokenizer = own if own is not None else load_run_tokenizer(paths)
    seed = training_seed(cfg, teacher_cfg.training.seed)
    model = make_model(teacher_cfg.model, tokenizer, n_positions(cfg), seed)
    set_generation_defaults(model, tokenizer, cfg.evaluation.generation.max_new_tokens)
    n_parameters = count_parameters(model)
    preflight(cfg, "train_teacher", model=model, tokenizer=tokenizer, training=teacher_cfg.training, out_dir=out_dir,
              n_parameters=n_parameters)
    info: dict = {"name": teacher_cfg.name, "parameters": n_parameters, "trained": teacher_cfg.train,
                  "finetune": teacher_cfg.finetune}
    with runs.stage_run(cfg, paths.root, "train_teacher", teacher_cfg.name, params=teacher_cfg.model_dump(mode="json"),
                        result=info):
        if not teacher_cfg.train:
            _save(model, tokenizer, out_dir)
            info.update(train_time_s=0.0, steps=0)
        else:
            ds, dropped = load_train_set(cfg, paths, tokenizer, loss_on_prompt=teacher_cfg.training.loss_on_prompt)
            if teacher_cfg.finetune == "lora":  # saved merged (a plain causal LM), the adapter in adapter/
                model = with_lora(model, teacher_cfg.lora, "teacher.lora")
                info["trainable_parameters"] = trainable_parameters(model)
            result = train(model, ds, tokenizer, teacher_cfg.training, out_dir, method=get_method("sft")(None),
                           seed=seed, on_log=runs.log_step)
            info.update(train_time_s=result.wall_time_s, steps=result.steps, final_loss=result.final_loss,
                        dropped_overlong=dropped)
    if is_main_process():  # the folder's model card (this stage writes the folder: a DVC output of it)
        write_text_atomic(out_dir / "README.md", model_card(cfg, teacher_cfg.name, card_tags(cfg, teacher_cfg.name, info)))
    write_json_atomic(paths.train_info(teacher_cfg.name), info)
    return info
