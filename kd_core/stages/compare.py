"""Stage `compare`: the registered versions side by side (markdown + JSON report, size-vs-quality plot), and the
row of a teacher served by another process (from its metrics: it is never registered)."""

from __future__ import annotations

from kd_core.config import PipelineConfig
from kd_core.run import RunPaths
from kd_core.tracking import registry, store


def compare(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Side-by-side table of registered versions (teacher and students), markdown + JSON + plot; a teacher served
    by another process (never registered) has its row from the run folder's metrics, marked served."""
    from kd_core.evaluation.compare import build_report, served_teacher_row

    uri = store.setup(cfg)
    names = (cfg.tracking.register_teacher_as, cfg.tracking.registered_model)
    versions = [row for name in names for row in registry.version_rows(name)]
    served = served_teacher_row(cfg, paths)
    return build_report(cfg, paths, [served, *versions] if served else versions, uri)


def saved_report(paths: RunPaths) -> dict:
    """What `compare` returned, read back from its report files (for a run that skipped it as up to date)."""
    import json

    from kd_core.run import require

    report = json.loads(require(paths.reports / "compare.json", "comparison report", "compare").read_text())
    return report | {"markdown": str(paths.reports / "compare.md"), "json": str(paths.reports / "compare.json"),
                     "plot": str(paths.reports / "size_vs_quality.png")}
