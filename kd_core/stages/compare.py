"""Stage `compare`: the registered versions side by side (markdown + JSON report, size-vs-quality plot)."""

from __future__ import annotations

from kd_core.config import PipelineConfig
from kd_core.run import RunPaths
from kd_core.tracking import registry, store


def compare(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Side-by-side table of registered versions (teacher and students), markdown + JSON + plot."""
    from kd_core.evaluation.compare import build_report

    uri = store.setup(cfg)
    names = (cfg.tracking.register_teacher_as, cfg.tracking.registered_model)
    versions = [row for name in names for row in registry.version_rows(name)]
    return build_report(cfg, paths, versions, uri)


def saved_report(paths: RunPaths) -> dict:
    """What `compare` returned, read back from its report files (for a run that skipped it as up to date)."""
    import json

    from kd_core.run import require

    report = json.loads(require(paths.reports / "compare.json", "comparison report", "compare").read_text())
    return report | {"markdown": str(paths.reports / "compare.md"), "json": str(paths.reports / "compare.json"),
                     "plot": str(paths.reports / "size_vs_quality.png")}
