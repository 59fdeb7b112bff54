"""Stage `evaluate`: generation metrics on every eval set (greedy and sampled over seeds), validation loss, and
for students the teacher-forced agreement with the teacher (`metrics/<model>.json`)."""

from __future__ import annotations

from kd_core import tracking
from kd_core.config import PipelineConfig
from kd_core.io import write_json_atomic
from kd_core.run import RunPaths, require


def evaluate(cfg: PipelineConfig, paths: RunPaths, model_name: str) -> dict:
    """Generation metrics on every eval set (greedy and sampled over seeds), validation loss, agreement."""
    from kd_core.evaluation.run import evaluate_model

    model_dir = require(paths.model(model_name), f"model for {model_name!r}", "training stages of that model")
    with tracking.stage_run(cfg, paths.root, "evaluate", model_name):
        metrics = evaluate_model(cfg, paths, model_name, model_dir)
        tracking.log_metrics(metrics)
    write_json_atomic(paths.metrics(model_name), metrics)
    return metrics
