"""Where a stage's teacher comes from, decided in one place: the kind of
:class:`~kd_core.teachers.source.TeacherSource` a student trains with (:func:`teacher_source`: live, cached, served,
several), the one teacher a stage scores data with (:func:`teacher_of`: the cache's builder, the evaluation), what
generates as a model (:func:`generator_of`: the transfer sets, the evaluation; the model or its endpoint), and
the teacher-logit cache kept current (:func:`ensure_cache`, the `cache_teacher` stage: reuse it, link another
student's with the same key, or run the teacher once over the student's training data; a student with several
teachers gets one cache per teacher, `teacher_cache/<student>/<teacher>/`). Whether a model is served by another
process is :meth:`kd_core.config.PipelineConfig.is_served`. Without a cache (a manifest only) nothing here imports
torch."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kd_core.config import PipelineConfig
from kd_core.errors import CacheError, ModelError
from kd_core.io import (CHECKSUMS, atomic_dir, checksum_problem, link_or_copy, size_text, write_checksums,
                        write_json_atomic)
from kd_core.run import RunPaths, load_model, load_run_tokenizer, load_train_set
from kd_core.teachers.cache_key import MANIFEST, TENSORS, cache_key, is_old_format, read_manifest, stale_fields

if TYPE_CHECKING:
    import torch

    from kd_core.config import StudentConfig
    from kd_core.teachers.cache import TeacherLogitCache
    from kd_core.teachers.source import TeacherSource

log = logging.getLogger("kd")


# ----------------------------------------------------------------------------------------------- the teacher
def load_teacher_model(cfg: PipelineConfig, paths: RunPaths, name: str) -> torch.nn.Module:
    """The weights of model `name` of this run (the teacher, or a student teaching as an assistant); a ModelError
    for a teacher served by another process, whose weights are not here."""
    if cfg.is_served(name):
        raise ModelError(f"{paths.model(name)}: model {name!r} is served by another process (teacher.model.endpoint): "
                         f"it gives its top-k log-probs only (kd / atkd students, the teacher cache), not the model")
    return load_model(paths, name)


def teacher_of(cfg: PipelineConfig, paths: RunPaths, name: str, vocab_size: int) -> TeacherSource:
    """Model `name` as a teacher on its own: the client of its endpoint when it is served by another process
    (its top-k over `vocab_size` tokens, the vocabulary shared with the student), else the model, loaded."""
    if cfg.is_served(name):
        from kd_core.teachers.served import ServedTeacher

        return ServedTeacher(cfg.teacher.model.endpoint, vocab_size)
    from kd_core.teachers.source import LiveTeacher

    return LiveTeacher(load_teacher_model(cfg, paths, name))


def generator_of(cfg: PipelineConfig, paths: RunPaths, name: str, tokenizer):
    """What generates as model `name` (transfer sets, evaluation), for :func:`kd_core.generation.generate`: the
    model, loaded, or the client of its endpoint when it is served by another process."""
    source = teacher_of(cfg, paths, name, len(tokenizer))
    return source if source.model is None else source.model


def teacher_model(cfg: PipelineConfig, paths: RunPaths, student_cfg: StudentConfig,
                  needs_teacher: bool) -> torch.nn.Module | None:
    """The student's teacher model when the distill stage needs it here: a method that reads the live teacher
    (`needs_teacher`; not with the cache, not served by another process), or a student cut from its layers."""
    live = needs_teacher and not student_cfg.teacher_cache.enabled and not cfg.is_served(student_cfg.teacher)
    if live or student_cfg.model.from_teacher_layers is not None:
        return load_teacher_model(cfg, paths, student_cfg.teacher)
    return None


def teacher_source(cfg: PipelineConfig, paths: RunPaths, student_cfg: StudentConfig, needs_teacher: bool, dataset,
                   student: torch.nn.Module, tokenizer, model: torch.nn.Module | None = None) -> TeacherSource | None:
    """The teacher a student trains with (None: its method needs none): its several `teachers` combined (each its
    cache, its model or its endpoint), else its cache, else the endpoint serving it, else its live `model` (from
    :func:`teacher_model`). `dataset`: the student's training set (the cache's rows are found in it); `student`,
    `tokenizer`: its model and tokenizer (a served teacher's vocabulary is min(its output rows, the tokenizer's))."""
    from kd_core.teachers.ensemble import TeacherEnsemble
    from kd_core.teachers.source import CachedTeacher, LiveTeacher

    cached = student_cfg.teacher_cache.enabled
    shared_vocab = min(len(tokenizer), student.get_output_embeddings().weight.shape[0])
    routed, subsets = None, {}
    if student_cfg.route is not None:  # each row its own teacher (kd_core/teachers/routing.py)
        from kd_core.teachers.routing import route

        routed, subsets = route(paths, student_cfg, dataset)
    if student_cfg.teachers:
        weights = student_cfg.teacher_weights()
        members = {}
        for name in weights:
            if cached:
                rows = subsets.get(name, dataset)
                members[name] = CachedTeacher(load_cache(cfg, paths, student_cfg.name, rows, student, name))
            elif name == student_cfg.teacher and model is not None:
                members[name] = LiveTeacher(model)
            else:
                members[name] = teacher_of(cfg, paths, name, shared_vocab)
        if routed is not None:
            from kd_core.teachers.routed import RoutedTeachers

            return RoutedTeachers(members, routed, student_cfg.route.model_dump(mode="json"))
        live = model if needs_teacher and not cached else None
        return TeacherEnsemble(members, list(weights.values()), student_cfg.teacher_combine, live)
    if cached:
        return CachedTeacher(load_cache(cfg, paths, student_cfg.name, dataset, student))
    if not needs_teacher:
        return None
    if cfg.is_served(student_cfg.teacher):  # its top-k per batch, asked of the endpoint (kept as a one-teacher ensemble)
        served = teacher_of(cfg, paths, student_cfg.teacher, shared_vocab)
        return TeacherEnsemble({student_cfg.teacher: served}, [1.0])
    return LiveTeacher(model)


# ----------------------------------------------------------------------------------------------- the cache
def ensure_cache(cfg: PipelineConfig, paths: RunPaths, student_name: str, teacher: str | None = None) -> dict:
    """Make `teacher_cache/<student>` current (reuse, link another student's, or run the teacher): the
    `cache_teacher` stage, and what :func:`teacher_source` does first for a cached teacher.
    Without a cache (a manifest only) it imports no torch. `teacher`: only that one of the student's `teachers`
    (`teacher_cache/<student>/<teacher>`)."""
    student_cfg = cfg.student(student_name)
    out = paths.teacher_cache(student_cfg.name)
    if not student_cfg.teacher_cache.enabled:
        if read_manifest(out) != {"enabled": False}:
            with atomic_dir(out) as tmp:
                write_json_atomic(tmp / MANIFEST, {"enabled": False})
        return {"student": student_cfg.name, "enabled": False}
    if student_cfg.teachers and teacher is None:
        return _cache_teachers(cfg, paths, student_cfg)
    teacher = teacher or student_cfg.teacher
    out = out / teacher if student_cfg.teachers else out
    key = cache_key(cfg, paths, student_cfg.name, teacher)
    info = {"student": student_cfg.name, "enabled": True, "top_k": key["top_k"], "vocab_size": key["vocab_size"]}
    current = read_manifest(out)
    changed = stale_fields(current, key)
    if not changed and (out / TENSORS).is_file():
        if (problem := checksum_problem(out)) is None:
            return info | {"source": "current"} | current.get("stats", {})
        log.warning("teacher cache of %s is damaged: %s: rebuilding it", student_cfg.name, problem)
        current, changed = None, []
    root = paths.teacher_cache(student_cfg.name).parent  # every student's caches, and their teachers'
    for other in sorted([*root.glob("*/"), *root.glob("*/*/")]):
        manifest = read_manifest(other)
        if other != out and manifest and not stale_fields(manifest, key) and (other / TENSORS).is_file() \
                and checksum_problem(other) is None:
            with atomic_dir(out) as tmp:
                for name in (TENSORS, MANIFEST, CHECKSUMS):
                    if (other / name).is_file():
                        link_or_copy(other / name, tmp / name)
            log.info("teacher cache of %s: reusing %s's (same key)", student_cfg.name, other.name)
            return info | {"source": f"linked from {other.name}"} | manifest.get("stats", {})
    if is_old_format(current) and changed == ["logprobs"]:
        log.info("teacher cache of %s is in the format before the compact one (float32 log-probs, int32 ids): "
                 "rebuilding it with %s log-probs (teacher_cache.logprobs: float32 reads it as it is)",
                 student_cfg.name, key["logprobs"])
    elif current is not None:
        log.info("teacher cache of %s is stale (%s changed): rebuilding", student_cfg.name, ", ".join(changed))
    import torch

    from kd_core.teachers.cache import build_cache

    tokenizer = load_run_tokenizer(paths)
    source = teacher_of(cfg, paths, teacher, key["vocab_size"])
    if source.model is None:  # served by another process: its top-k, asked of the endpoint
        ds = _train_rows(cfg, paths, tokenizer, student_cfg, teacher)
        start = time.perf_counter()
        return _save(out, key, info, student_cfg.name, source.build_cache(ds, key["top_k"]), len(ds), start)
    teacher_name, teacher = teacher, source.model.eval()
    if torch.cuda.is_available():
        teacher.cuda()
    rows = teacher.get_output_embeddings().weight.shape[0]
    if rows != key["teacher_vocab"]:
        raise CacheError(f"{paths.model(teacher_name)}: output layer has {rows} rows, config says "
                         f"{key['teacher_vocab']}")
    ds = _train_rows(cfg, paths, tokenizer, student_cfg, teacher_name)
    start = time.perf_counter()
    tensors = build_cache(teacher, ds, tokenizer.pad_token_id, key["vocab_size"], student_cfg.temperature,
                          key["top_k"], student_cfg.teacher_cache.batch_size)
    return _save(out, key, info, student_cfg.name, tensors, len(ds), start)


def _train_rows(cfg: PipelineConfig, paths: RunPaths, tokenizer, student_cfg, teacher: str):
    """The student's training examples the cache of `teacher` covers: all of them, or with a `route` the rows
    routed to that teacher (kd_core/teachers/routing.py)."""
    ds, _ = load_train_set(cfg, paths, tokenizer, student_cfg.train_data,
                           loss_on_prompt=student_cfg.training.loss_on_prompt)
    if student_cfg.route is None:
        return ds
    from kd_core.teachers.routing import route

    _, subsets = route(paths, student_cfg, ds)
    return subsets[teacher]


def _save(out, key: dict, info: dict, student: str, tensors: dict, examples: int, start: float) -> dict:
    """Write a built cache (tensors in the stored types of `key["logprobs"]`, manifest with their `encoding`, size
    and bytes per response token, checksums) into `out`, atomically; the stage's result."""
    from safetensors.torch import save_file

    from kd_core.teachers.cache_encoding import encode, encoding_of

    seconds = time.perf_counter() - start
    tensors = encode(tensors, key["logprobs"], key["vocab_size"])
    stats = {"examples": examples, "tokens": int(tensors["offsets"][-1]), "seconds": round(seconds, 3)}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        stats["bytes"] = (tmp / TENSORS).stat().st_size
        stats["bytes_per_token"] = round(stats["bytes"] / max(stats["tokens"], 1), 1)
        write_json_atomic(tmp / MANIFEST, {"enabled": True, "key": key, "encoding": encoding_of(tensors),
                                           "stats": stats})
        write_checksums(tmp)  # verified whenever the cache is used again
    ids_type = str(tensors["top_ids"].dtype).removeprefix("torch.")
    log.info("teacher cache of %s: %d tokens, k=%d, %s log-probs and %s ids, %s (%.0f bytes per token), %.1f s",
             student, stats["tokens"], key["top_k"], key["logprobs"], ids_type, size_text(stats["bytes"]),
             stats["bytes_per_token"], seconds)
    return info | {"source": "built"} | stats


def _cache_teachers(cfg: PipelineConfig, paths: RunPaths, student_cfg) -> dict:
    """Several teachers: a manifest naming them in `teacher_cache/<student>` (a fresh folder when they changed),
    and each teacher's cache in its subfolder."""
    out = paths.teacher_cache(student_cfg.name)
    manifest = {"enabled": True, "teachers": sorted(student_cfg.teachers)}
    if read_manifest(out) != manifest:
        with atomic_dir(out) as tmp:
            write_json_atomic(tmp / MANIFEST, manifest)
    parts = {t: ensure_cache(cfg, paths, student_cfg.name, teacher=t) for t in student_cfg.teachers}
    return {"student": student_cfg.name, "enabled": True, "teachers": parts}


def load_cache(cfg: PipelineConfig, paths: RunPaths, student_name: str, dataset, student,
               teacher: str | None = None) -> TeacherLogitCache:
    """Make the student's cache current (see :func:`ensure_cache`; `teacher`: that one of its `teachers`) and
    load it for `dataset` and `student`."""
    from kd_core.teachers.cache import TeacherLogitCache

    ensure_cache(cfg, paths, student_name, teacher)
    folder = paths.teacher_cache(student_name)
    cache = TeacherLogitCache(folder / teacher if teacher else folder, dataset)
    rows = student.get_output_embeddings().weight.shape[0]
    shared = min(rows, cache.key["teacher_vocab"])
    if shared != cache.vocab_size:
        raise CacheError(f"{cache.folder}: cached over a vocabulary of {cache.vocab_size}, but teacher and student "
                         f"share {shared} ({cache.key['teacher_vocab']} and {rows} output rows)")
    return cache
