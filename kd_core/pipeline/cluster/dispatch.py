"""Where a stage runs when `execution.engine` is ray: the flow's and `run_stage`'s entry points into the package (no
Ray imported for engine local, nor before a stage asks for it)."""

from __future__ import annotations


def training_on_ray(stage: str, cfg, key: str | None):
    """The `StageResources` of a training stage that runs on Ray, else None (not a training stage, not named in
    `execution.stages`, engine local, or a stage that trains nothing: `teacher.train: false`, `finetune.enabled:
    false`, run in process as always)."""
    from kd_core.config.execution import TRAINING_STAGES

    resources = cfg.execution.on_ray(stage, key)
    if resources is None or stage not in TRAINING_STAGES:
        return None
    if stage == "train_teacher":
        return resources if cfg.teacher.train else None
    if key not in cfg.students or (stage == "finetune" and not cfg.students[key].finetune.enabled):
        return None
    return resources


def run_training_job(stage: str, key: str | None, params_path, overrides: dict | None, cfg, resources, out) -> None:
    """The stage as a Ray Train job (kd_core/pipeline/cluster/train_job.py)."""
    from kd_core.pipeline.cluster.train_job import run_training_job as run

    run(stage, key, params_path, overrides, cfg, resources, out)


def check_cluster(cfg) -> None:
    """Before a run on Ray: a `ClusterUnreachable` with one line per problem of `cluster_problems` (engine local:
    nothing to check). A local Ray started here is announced to the stages' own processes through RAY_ADDRESS."""
    if cfg.execution.engine != "ray":
        return
    from kd_core.pipeline.cluster.check import cluster_problems
    from kd_core.errors import ClusterUnreachable

    problems = cluster_problems(cfg)
    if problems:
        raise ClusterUnreachable("\n".join(problems))
    if cfg.execution.stages:  # joined (or started) once, here: the stages' own processes join the same Ray
        from kd_core.pipeline.cluster.connect import connect

        connect(cfg.execution)

