"""Stage `cache_teacher`: make a student's teacher-logit cache current (`teacher_cache/<student>`; the work:
:func:`kd_core.teachers.factory.ensure_cache`)."""

from __future__ import annotations

from kd_core.config import PipelineConfig
from kd_core.run import RunPaths
from kd_core.teachers.factory import ensure_cache


def cache_teacher(cfg: PipelineConfig, paths: RunPaths, student_name: str, teacher: str | None = None) -> dict:
    """The stage: make `teacher_cache/<student>` current (reuse, link another student's, or run the teacher).
    Without a cache (a manifest only) it imports no torch. `teacher`: only that one of the student's `teachers`
    (`teacher_cache/<student>/<teacher>`)."""
    return ensure_cache(cfg, paths, student_name, teacher)
