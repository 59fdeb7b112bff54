"""Stage `cache_teacher`: make a student's teacher-logit cache current (`teacher_cache/<student>`): reuse it,
link another student's with the same key, or run the teacher once over the student's training data. A student with
several teachers (`teachers`) gets one such cache per teacher, `teacher_cache/<student>/<teacher>/`."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kd_core.config import PipelineConfig
from kd_core.console import size_text
from kd_core.errors import CacheError
from kd_core.io import CHECKSUMS, atomic_dir, checksum_problem, link_or_copy, write_checksums, write_json_atomic
from kd_core.logit_cache_key import MANIFEST, TENSORS, cache_key, is_old_format, read_manifest, stale_fields
from kd_core.run import RunPaths, load_model, load_run_tokenizer, load_train_set

if TYPE_CHECKING:
    from kd_core.logit_cache import TeacherLogitCache

log = logging.getLogger("kd")


def cache_teacher(cfg: PipelineConfig, paths: RunPaths, student_name: str, teacher: str | None = None) -> dict:
    """The stage: make `teacher_cache/<student>` current (reuse, link another student's, or run the teacher).
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

    from kd_core.logit_cache import build_cache
    from kd_core.served_teacher import served_teacher

    tokenizer = load_run_tokenizer(paths)
    if (served := served_teacher(cfg, teacher, key["vocab_size"])) is not None:  # another process serves it
        ds = _train_rows(cfg, paths, tokenizer, student_cfg, teacher)
        start = time.perf_counter()
        return _save(out, key, info, student_cfg.name, served.build_cache(ds, key["top_k"]), len(ds), start)
    teacher_name, teacher = teacher, load_model(paths, teacher).eval()
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
    routed to that teacher (kd_core/routing.py)."""
    ds, _ = load_train_set(cfg, paths, tokenizer, student_cfg.train_data,
                           loss_on_prompt=student_cfg.training.loss_on_prompt)
    if student_cfg.route is None:
        return ds
    from kd_core.routing import route_rows, routed_subset

    return routed_subset(ds, route_rows(cfg, paths, student_cfg, tokenizer), teacher)


def _save(out, key: dict, info: dict, student: str, tensors: dict, examples: int, start: float) -> dict:
    """Write a built cache (tensors in the stored types of `key["logprobs"]`, manifest with their `encoding`, size
    and bytes per response token, checksums) into `out`, atomically; the stage's result."""
    from safetensors.torch import save_file

    from kd_core.logit_cache_encoding import encode, encoding_of

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
    log.info("teacher cache of %s: %d tokens, k=%d, %s log-probs and %s ids, %s (%.0f bytes per token), %.1f s",
             student, stats["tokens"], key["top_k"], key["logprobs"], str(tensors["top_ids"].dtype).removeprefix(
                 "torch."), size_text(stats["bytes"]), stats["bytes_per_token"], seconds)
    return info | {"source": "built"} | stats


def _cache_teachers(cfg: PipelineConfig, paths: RunPaths, student_cfg) -> dict:
    """Several teachers: a manifest naming them in `teacher_cache/<student>` (a fresh folder when they changed),
    and each teacher's cache in its subfolder."""
    out = paths.teacher_cache(student_cfg.name)
    manifest = {"enabled": True, "teachers": sorted(student_cfg.teachers)}
    if read_manifest(out) != manifest:
        with atomic_dir(out) as tmp:
            write_json_atomic(tmp / MANIFEST, manifest)
    parts = {t: cache_teacher(cfg, paths, student_cfg.name, teacher=t) for t in student_cfg.teachers}
    return {"student": student_cfg.name, "enabled": True, "teachers": parts}


def load_for_training(cfg: PipelineConfig, paths: RunPaths, student_name: str, dataset, student,
                      teacher: str | None = None) -> TeacherLogitCache:
    """Make the student's cache current (see :func:`cache_teacher`; `teacher`: that one of its `teachers`) and
    load it for `dataset` and `student`."""
    from kd_core.logit_cache import TeacherLogitCache

    cache_teacher(cfg, paths, student_name, teacher)
    folder = paths.teacher_cache(student_name)
    cache = TeacherLogitCache(folder / teacher if teacher else folder, dataset)
    rows = student.get_output_embeddings().weight.shape[0]
    shared = min(rows, cache.key["teacher_vocab"])
    if shared != cache.vocab_size:
        raise CacheError(f"{cache.folder}: cached over a vocabulary of {cache.vocab_size}, but teacher and student "
                         f"share {shared} ({cache.key['teacher_vocab']} and {rows} output rows)")
    return cache
