"""Running one stage for one key on a run folder: what `kd stage`, the flow's tasks, a launched rank and a Ray Train
worker all call (the checks and the lock around the stage's own function)."""

from __future__ import annotations

from kd_core.pipeline.cluster.sharding import stage_shards
from kd_core.errors import PreflightError
from kd_core.pipeline.lock import run_lock
from kd_core.run import RunPaths
from kd_core.stages import check_key, get_stage
from kd_core.tracking import store


def run_stage(name: str, cfg, key: str | None = None) -> dict:
    """Run one stage (for one key) on the run folder of `cfg`: the tracking store checked first (a store that cannot
    be used stops the stage before it writes anything), the folder's lock held (`run_lock`), an MLflow server
    lost mid-stage reported as one retryable line (`store.server_lost`); an inference stage that `execution` puts
    on Ray shares its batches out among Ray workers (`cluster.sharding`)."""
    stage = get_stage(name)
    check_key(stage, cfg, key)
    label = f"{name} {key}" if key else name
    uri = store.tracking_uri(cfg)
    try:
        store.check_tracking(uri)
    except PreflightError as err:
        raise type(err)(f"preflight of {label}: {err}") from None
    paths = RunPaths.of(cfg)
    with run_lock(paths), store.server_lost(uri, label), stage_shards(cfg, name, key):
        return stage.function(cfg, paths, key) if stage.per else stage.function(cfg, paths)
