"""Stage `distill`: train one student with its method against its (frozen) teacher or the teacher's cache."""

from __future__ import annotations

from kd_core.tracking import runs
from kd_core.config import PipelineConfig
from kd_core.data.training_set import encode_training_set
from kd_core.io import write_json_atomic
from kd_core.methods import get_method
from kd_core.models.adapters import trainable_parameters, with_lora
from kd_core.models.build import count_parameters, make_model, set_generation_defaults
from kd_core.run import (RunPaths, is_main_process, load_model_tokenizer, load_student_tokenizer, n_positions,
                         read_split, training_seed)
from kd_core.teachers.factory import teacher_model, teacher_source
from kd_core.training.preflight import preflight
from kd_core.training.trainer import train


def distill(cfg: PipelineConfig, paths: RunPaths, student_name: str) -> dict:
    """Train one student with its method against the (frozen) teacher."""
    student_cfg = cfg.student(student_name)
    method = get_method(student_cfg.method)(student_cfg, student_cfg.method_args)
    teacher = teacher_model(cfg, paths, student_cfg, method.needs_teacher)  # (None: not needed here)
    seed, positions = training_seed(cfg, student_cfg.training.seed), n_positions(cfg)
    rows = read_split(paths, student_cfg.train_data)
    # across tokenizers (uld, gold): each model its own tokenizer, the data encoded under both
    teacher_tokenizer = load_model_tokenizer(paths, student_cfg.teacher) if method.cross_tokenizer else None
    tokenizer = load_student_tokenizer(cfg, paths, student_cfg)
    offsets = method.cross_tokenizer and method.needs_text_offsets  # (character offsets: cross-tokenizer methods)
    ds, dropped = encode_training_set(cfg, rows, student_cfg.train_data, tokenizer, student_cfg.training.loss_on_prompt,
                                      teacher_tokenizer, offsets)
    student = make_model(student_cfg.model, tokenizer, positions, seed, teacher=teacher)
    set_generation_defaults(student, tokenizer, cfg.evaluation.generation.max_new_tokens)
    if student_cfg.lora is not None:  # adapters only (saved merged, the adapter in adapter/: kd_core/models/adapters.py)
        student = with_lora(student, student_cfg.lora, f"students.{student_cfg.name}.lora")
    n_parameters = count_parameters(student)
    # what can fail before training fails before the teacher's cache is built
    preflight(cfg, f"distill {student_cfg.name}", model=student, tokenizer=tokenizer, training=student_cfg.training,
              out_dir=paths.distilled(student_cfg.name), n_parameters=n_parameters, teacher=teacher,
              student_source=student_cfg.model, teacher_tokenizer=teacher_tokenizer)
    source = teacher_source(cfg, paths, student_cfg, method.needs_teacher, ds, student, tokenizer, teacher)
    if teacher_tokenizer is not None:
        method.set_tokenizers(tokenizer, teacher_tokenizer)
    info: dict = {"name": student_cfg.name, "method": student_cfg.method,
                  "divergence": student_cfg.divergence if method.needs_teacher else "",
                  "teacher": student_cfg.teacher, "train_data": student_cfg.train_data,
                  "parameters": n_parameters, "teacher_cache_top_k": 0}
    if student_cfg.lora is not None:
        info["trainable_parameters"] = trainable_parameters(student)
    info |= source.describe() if source is not None else {}
    params = student_cfg.model_dump(mode="json", exclude={"finetune"})
    with runs.stage_run(cfg, paths.root, "distill", student_cfg.name, params=params, main_only=True, result=info):
        result = train(student, ds, tokenizer, student_cfg.training, paths.distilled(student_cfg.name), method=method,
                       seed=seed, teacher=source, on_log=runs.log_step,
                       data_collator=method.collator(tokenizer, teacher_tokenizer) if teacher_tokenizer else None)
        info.update(train_time_s=result.wall_time_s, steps=result.steps, final_loss=result.final_loss,
                    teacher_forward_passes=result.teacher_forward_passes, generated_tokens=result.generated_tokens,
                    dropped_overlong=dropped)
    if is_main_process():
        write_json_atomic(paths.train_info(f"{student_cfg.name}.distill"), info)
    return info
