"""Whether the stage about to run shares its batches out among Ray workers: what `run_stage` asks (no Ray imported
for engine local)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def stage_shards(cfg, stage: str, key: str | None = None):
    """While a stage runs (for `key`): its shard pool when `execution` puts this inference stage on Ray, else
    nothing."""
    from kd_core.config.execution import SHARDED_STAGES

    if stage not in SHARDED_STAGES or cfg.execution.on_ray(stage, key) is None:
        yield
        return
    from kd_core.pipeline.cluster.shards import sharded

    with sharded(cfg, stage, key):
        yield
