"""Stage `distill`: train one student with its method against its (frozen) teacher or the teacher's cache."""

from __future__ import annotations

from kd_core import tracking
from kd_core.config import PipelineConfig
from kd_core.io import write_json_atomic
from kd_core.methods import get_method
from kd_core.models import count_parameters, make_model, set_generation_defaults
from kd_core.multi_teacher import TeacherEnsemble
from kd_core.preflight import preflight
from kd_core.run import (RunPaths, is_main_process, load_model, load_model_tokenizer, load_paired_train_set,
                         load_student_tokenizer, load_train_set, n_positions, training_seed)
from kd_core.served_teacher import served_teacher
from kd_core.stages.cache_teacher import load_for_training
from kd_core.training import train


def distill(cfg: PipelineConfig, paths: RunPaths, student_name: str) -> dict:
    """Train one student with its method against the (frozen) teacher."""
    student_cfg = cfg.student(student_name)
    method = get_method(student_cfg.method)(student_cfg, student_cfg.method_args)
    # across tokenizers (uld, gold): each model its own tokenizer, the data encoded under both
    tokenizer = load_student_tokenizer(cfg, paths, student_cfg, method.cross_tokenizer)
    teacher_tokenizer = load_model_tokenizer(paths, student_cfg.teacher) if method.cross_tokenizer else None
    if teacher_tokenizer is not None:
        method.set_tokenizers(tokenizer, teacher_tokenizer)
    cached = student_cfg.teacher_cache.enabled  # the teacher's top-k log-probs come from teacher_cache/<student>
    live_teacher = method.needs_teacher and not cached
    served = cfg.teacher.model.endpoint is not None and student_cfg.teacher == cfg.teacher.name  # another process's
    needs_teacher_model = (live_teacher and not served) or student_cfg.model.from_teacher_layers is not None
    teacher = load_model(paths, student_cfg.teacher) if needs_teacher_model else None
    seed = training_seed(cfg, student_cfg.training.seed)
    student = make_model(student_cfg.model, tokenizer, n_positions(cfg), seed, teacher=teacher)
    set_generation_defaults(student, tokenizer, cfg.evaluation.generation.max_new_tokens)
    preflight(cfg, f"distill {student_cfg.name}", model=student, tokenizer=tokenizer, training=student_cfg.training,
              out_dir=paths.distilled(student_cfg.name), teacher=teacher, student_source=student_cfg.model,
              teacher_tokenizer=teacher_tokenizer)
    if teacher_tokenizer is None:
        ds, dropped = load_train_set(cfg, paths, tokenizer, student_cfg.train_data,
                                     loss_on_prompt=student_cfg.training.loss_on_prompt)
    else:
        ds, dropped = load_paired_train_set(cfg, paths, tokenizer, teacher_tokenizer, student_cfg.train_data,
                                            loss_on_prompt=student_cfg.training.loss_on_prompt,
                                            with_offsets=method.needs_text_offsets)
    teacher_cache, teachers = None, None
    shared_vocab = min(len(tokenizer), student.get_output_embeddings().weight.shape[0])  # (a served teacher's)
    if student_cfg.route is not None:  # each row its own teacher (kd_core/routing.py)
        teachers = _routed_teachers(cfg, paths, student_cfg, tokenizer, ds, student, teacher, cached, shared_vocab)
    elif student_cfg.teachers:  # several: each one's cache (teacher_cache/<student>/<name>) or live model
        weights = student_cfg.teacher_weights()
        members = [load_for_training(cfg, paths, student_cfg.name, ds, student, name) if cached
                   else teacher if name == student_cfg.teacher and teacher is not None
                   else served_teacher(cfg, name, shared_vocab) or load_model(paths, name) for name in weights]
        teachers = TeacherEnsemble(members, list(weights.values()), student_cfg.teacher_combine)
    elif cached:
        teacher_cache = load_for_training(cfg, paths, student_cfg.name, ds, student)
    elif live_teacher and served:  # its top-k log-probs per batch, asked of the endpoint (kd_core/served_teacher.py)
        teachers = TeacherEnsemble([served_teacher(cfg, student_cfg.teacher, shared_vocab)], [1.0])
    first_cache = teacher_cache or (teachers.members[0] if teachers and cached else None)
    info: dict = {"name": student_cfg.name, "method": student_cfg.method,
                  "divergence": student_cfg.divergence if method.needs_teacher else "",
                  "teacher": student_cfg.teacher, "train_data": student_cfg.train_data,
                  "parameters": count_parameters(student),
                  "teacher_cache_top_k": first_cache.key["top_k"] if cached else 0}
    if student_cfg.route is not None:
        info.update(route=student_cfg.route.model_dump(mode="json"))
    elif teachers:
        info.update(teachers=student_cfg.teacher_weights(), teacher_combine=student_cfg.teacher_combine)
    params = student_cfg.model_dump(mode="json", exclude={"finetune"})
    with tracking.stage_run(cfg, paths.root, "distill", student_cfg.name, params=params, main_only=True):
        result = train(student, ds, tokenizer, student_cfg.training, paths.distilled(student_cfg.name), method=method,
                       seed=seed, teacher=teacher if live_teacher else None, teacher_cache=teacher_cache,
                       teachers=teachers, on_log=tracking.log_step,
                       data_collator=method.collator(tokenizer, teacher_tokenizer) if teacher_tokenizer else None)
        info.update(train_time_s=result.wall_time_s, steps=result.steps, final_loss=result.final_loss,
                    teacher_forward_passes=result.teacher_forward_passes, generated_tokens=result.generated_tokens,
                    dropped_overlong=dropped)
        tracking.log_metrics(info)
    if is_main_process():
        write_json_atomic(paths.train_info(f"{student_cfg.name}.distill"), info)
    return info


def _routed_teachers(cfg, paths, student_cfg, tokenizer, ds, student, teacher, cached: bool, shared_vocab: int):
    """The student's routed teachers: each one's cache over its own rows, or its live (or served) model."""
    from kd_core.routed_signal import RoutedTeachers
    from kd_core.routing import route_rows, routed_subset

    routed = route_rows(cfg, paths, student_cfg, tokenizer)
    names = student_cfg.route.teachers()
    members = []
    for name in names:
        if cached:
            members.append(load_for_training(cfg, paths, student_cfg.name, routed_subset(ds, routed, name), student,
                                             name))
        elif name == student_cfg.teacher and teacher is not None:
            members.append(teacher)
        else:
            members.append(served_teacher(cfg, name, shared_vocab) or load_model(paths, name))
    return RoutedTeachers(members, names, routed)
