"""The pipeline's stages on a Ray cluster (`execution.engine: ray`, kd_core/config/execution.py).

- `connect`: this process joins the cluster that `execution.ray_address` or RAY_ADDRESS names, or starts a local
  Ray for the run;
- `train_job`: a training stage (`train_teacher`, `distill`, `finetune`) as a Ray Train `TorchTrainer` job, its
  workers running the stage's own training code (torch.distributed set up by Ray), its log streamed into the
  Prefect task's, its failure raised as the in-process error, a lost worker restarted (resuming from the stage's
  last checkpoint);
- `shards`: an inference stage (`transfer`, `cache_teacher`, `evaluate`) shares its generation and teacher-forward
  batches out among Ray actors (one model load each) and merges their rows in order: the files of the one-process
  run;
- `check`: what `kd validate` asks the cluster (it answers; a node can offer each stage's workers).

Importing this package imports no Ray (`context` is what the rest of the code reads).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def stage_shards(cfg, stage: str):
    """While a stage runs: its shard pool when `execution` puts this inference stage on Ray, else nothing."""
    from kd_core.config.execution import SHARDED_STAGES

    if stage not in SHARDED_STAGES or cfg.execution.on_ray(stage) is None:
        yield
        return
    from kd_core.cluster.shards import sharded

    with sharded(cfg, stage):
        yield


def training_on_ray(stage: str, cfg, key: str | None):
    """The `StageResources` of a training stage that runs on Ray, else None (not a training stage, not named in
    `execution.stages`, engine local, or a stage that trains nothing: `teacher.train: false`, `finetune.enabled:
    false`, run in process as always)."""
    from kd_core.config.execution import TRAINING_STAGES

    resources = cfg.execution.on_ray(stage)
    if resources is None or stage not in TRAINING_STAGES:
        return None
    if stage == "train_teacher":
        return resources if cfg.teacher.train else None
    if key not in cfg.students or (stage == "finetune" and not cfg.students[key].finetune.enabled):
        return None
    return resources


def run_training_job(stage: str, key: str | None, params_path, overrides: dict | None, cfg, resources, out) -> None:
    """The stage as a Ray Train job (kd_core/cluster/train_job.py)."""
    from kd_core.cluster.train_job import run_training_job as run

    run(stage, key, params_path, overrides, cfg, resources, out)


def check_cluster(cfg) -> None:
    """Before a run on Ray: a `ClusterUnreachable` with one line per problem of `cluster_problems` (engine local:
    nothing to check). A local Ray started here is announced to the stages' own processes through RAY_ADDRESS."""
    if cfg.execution.engine != "ray":
        return
    from kd_core.cluster.check import cluster_problems
    from kd_core.errors import ClusterUnreachable

    problems = cluster_problems(cfg)
    if problems:
        raise ClusterUnreachable("\n".join(problems))

