"""Stage `distill`: train one student with its method against its (frozen) teacher or the teacher's cache."""

from __future__ import annotations

from kd_core import tracking
from kd_core.config import PipelineConfig
from kd_core.io import write_json_atomic
from kd_core.methods import get_method
from kd_core.models import count_parameters, make_model, set_generation_defaults
from kd_core.preflight import preflight
from kd_core.run import (RunPaths, is_main_process, load_model, load_run_tokenizer, load_train_set, n_positions,
                         training_seed)
from kd_core.stages.cache_teacher import load_for_training
from kd_core.training import train


def distill(cfg: PipelineConfig, paths: RunPaths, student_name: str) -> dict:
    """Train one student with its method against the (frozen) teacher."""
    student_cfg = cfg.student(student_name)
    tokenizer = load_run_tokenizer(paths)
    method = get_method(student_cfg.method)(student_cfg, student_cfg.method_args)
    cached = student_cfg.teacher_cache.enabled  # the teacher's top-k log-probs come from teacher_cache/<student>
    live_teacher = method.needs_teacher and not cached
    needs_teacher_model = live_teacher or student_cfg.model.from_teacher_layers is not None
    teacher = load_model(paths, student_cfg.teacher) if needs_teacher_model else None
    seed = training_seed(cfg, student_cfg.training.seed)
    student = make_model(student_cfg.model, tokenizer, n_positions(cfg), seed, teacher=teacher)
    set_generation_defaults(student, tokenizer, cfg.evaluation.generation.max_new_tokens)
    preflight(cfg, f"distill {student_cfg.name}", model=student, tokenizer=tokenizer, training=student_cfg.training,
              out_dir=paths.distilled(student_cfg.name), teacher=teacher, student_source=student_cfg.model)
    ds, dropped = load_train_set(cfg, paths, tokenizer, student_cfg.train_data,
                                 loss_on_prompt=student_cfg.training.loss_on_prompt)
    teacher_cache = load_for_training(cfg, paths, student_cfg.name, ds, student) if cached else None
    info: dict = {"name": student_cfg.name, "method": student_cfg.method,
                  "divergence": student_cfg.divergence if method.needs_teacher else "",
                  "teacher": student_cfg.teacher, "train_data": student_cfg.train_data,
                  "parameters": count_parameters(student),
                  "teacher_cache_top_k": teacher_cache.key["top_k"] if cached else 0}
    params = student_cfg.model_dump(mode="json", exclude={"finetune"})
    with tracking.stage_run(cfg, paths.root, "distill", student_cfg.name, params=params, main_only=True):
        result = train(student, ds, tokenizer, student_cfg.training, paths.distilled(student_cfg.name), method=method,
                       seed=seed, teacher=teacher if live_teacher else None, teacher_cache=teacher_cache,
                       on_log=tracking.log_step)
        info.update(train_time_s=result.wall_time_s, steps=result.steps, final_loss=result.final_loss,
                    teacher_forward_passes=result.teacher_forward_passes, generated_tokens=result.generated_tokens,
                    dropped_overlong=dropped)
        tracking.log_metrics(info)
    if is_main_process():
        write_json_atomic(paths.train_info(f"{student_cfg.name}.distill"), info)
    return info
