"""Stage `finetune`: post-distillation fine-tuning (cross-entropy at lr × lr_scale); when disabled, the distilled
model is the final one (hard-linked, no copy). The final folder gets its model card (README.md,
kd_core/tracking/model_card.py)."""

from __future__ import annotations

import json

from kd_core.config import PipelineConfig
from kd_core.io import atomic_dir, link_tree, write_json_atomic, write_text_atomic
from kd_core.training.preflight import preflight
from kd_core.run import RunPaths, is_main_process, load_model_tokenizer, load_train_set, require, training_seed
from kd_core.tracking.model_card import card_tags, model_card


def finetune(cfg: PipelineConfig, paths: RunPaths, student_name: str) -> dict:
    """Post-distillation fine-tuning (CE at lr × lr_scale); when disabled the distilled model is final."""
    student_cfg = cfg.student(student_name)
    src = require(paths.distilled(student_cfg.name), "distilled model", f"distill (--model {student_cfg.name})")
    distill_info = json.loads(paths.train_info(f"{student_cfg.name}.distill").read_text())
    info = dict(distill_info, finetuned=student_cfg.finetune.enabled, finetune_time_s=0.0)
    if not student_cfg.finetune.enabled:
        if is_main_process():
            with atomic_dir(paths.model(student_cfg.name)) as tmp:
                link_tree(src, tmp)
                # its model card (a new file: a rename, never a write through a hard link into distilled/)
                write_text_atomic(tmp / "README.md", model_card(cfg, student_cfg.name, card_tags(cfg, student_cfg.name, info)))
    else:  # (torch, the trainer and MLflow only here: the stage of a student without fine-tuning starts light)
        from kd_core.tracking import runs
        from kd_core.methods import get_method
        from kd_core.models.adapters import load_for_training
        from kd_core.models.build import count_parameters, load_checkpoint
        from kd_core.training.trainer import train

        tokenizer = load_model_tokenizer(paths, student_cfg.name, src)  # the student's own (saved with it)
        if student_cfg.lora is None:
            model = load_checkpoint(src)
        else:  # the same adapter trains on (its base recovered from the merged folder), saved merged again
            model = load_for_training(src, f"students.{student_cfg.name}.lora")
        preflight(cfg, f"finetune {student_cfg.name}", model=model, tokenizer=tokenizer, training=student_cfg.training,
                  out_dir=paths.model(student_cfg.name), n_parameters=count_parameters(model))
        ds, _ = load_train_set(cfg, paths, tokenizer, loss_on_prompt=student_cfg.training.loss_on_prompt)
        lr = student_cfg.training.learning_rate * student_cfg.finetune.lr_scale
        with runs.stage_run(cfg, paths.root, "finetune", student_cfg.name, params=student_cfg.finetune.model_dump(),
                                main_only=True):
            result = train(model, ds, tokenizer, student_cfg.training, paths.model(student_cfg.name),
                           method=get_method("sft")(student_cfg), seed=training_seed(cfg, student_cfg.training.seed),
                           epochs=student_cfg.finetune.epochs, learning_rate=lr, on_log=runs.log_step)
            info.update(finetune_time_s=result.wall_time_s, finetune_steps=result.steps)
    info["train_time_s"] = distill_info["train_time_s"] + info["finetune_time_s"]
    if is_main_process():
        if student_cfg.finetune.enabled:  # the folder's model card (this stage writes the folder: a DVC output of it)
            write_text_atomic(paths.model(student_cfg.name) / "README.md",
                              model_card(cfg, student_cfg.name, card_tags(cfg, student_cfg.name, info)))
        write_json_atomic(paths.train_info(student_cfg.name), info)
    return info
