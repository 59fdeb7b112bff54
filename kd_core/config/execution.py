"""The `execution` section: where the pipeline's stages run, on this machine (`engine: local`, the default) or on a
Ray cluster (`engine: ray`), with the resources of each stage that runs there.

    execution:
      engine: ray                 # local | ray
      ray_address: null           # null: RAY_ADDRESS when set, else a local Ray started for the run
      max_failures: 2             # a training stage's lost workers restarted this often (resuming from a checkpoint)
      stages:                     # a stage not named here runs as with engine local
        distill: {workers: 2, cpus_per_worker: 1}
        distill@big: {workers: 4, gpus_per_worker: 1}   # one student's own resources (`stage@key` first)
        evaluate: {workers: 2, cpus_per_worker: 1}

A training stage named here (`train_teacher`, `distill`, `finetune`) runs as a Ray Train job of `workers`
data-parallel workers (kd_core/pipeline/cluster/train_job.py); an inference stage (`transfer`, `cache_teacher`, `evaluate`)
fans its generations or teacher forwards out over `workers` Ray actors, one model load each
(kd_core/pipeline/cluster/shards.py). Validation here is what the file alone tells; `kd validate` also asks the cluster
whether a node can offer each stage's workers (kd_core/pipeline/cluster/check.py). The section changes where stages run,
never what they produce: it is not part of the config's fingerprint nor of any stage's DVC params.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kd_core.config.base import StrictModel

TRAINING_STAGES = ("train_teacher", "distill", "finetune")
SHARDED_STAGES = ("transfer", "cache_teacher", "evaluate")
RAY_STAGES = TRAINING_STAGES + SHARDED_STAGES


class StageResources(StrictModel):
    """The Ray workers of one stage: how many, and what each one reserves on its node (Ray's `ScalingConfig` for a
    training stage: `num_workers`, `resources_per_worker`, `accelerator_type`; the actors' options for an inference
    stage)."""

    workers: int = Field(1, ge=1, description="Ray Train workers (training) or actors (inference)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker; also its torch threads")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0: CPU, gloo between the workers)")
    accelerator_type: str | None = Field(None, description="a Ray accelerator type, e.g. A100 or H100 (None: any)")

    @model_validator(mode="after")
    def _accelerator_needs_a_gpu(self) -> StageResources:
        if self.accelerator_type is not None and self.gpus_per_worker == 0:
            raise ValueError(f"accelerator_type: {self.accelerator_type!r} needs gpus_per_worker > 0")
        return self


class ExecutionConfig(StrictModel):
    engine: Literal["local", "ray"] = Field("local", description="local: this machine, as always; ray: the stages "
                                                                  "named in `stages` on a Ray cluster")
    ray_address: str | None = Field(None, description="the cluster (ray://host:10001 or host:6379); None: "
                                                      "RAY_ADDRESS when set, else a local Ray started for the run")
    max_failures: int = Field(2, ge=0, description="a training stage's worker group restarted this often after a "
                                                   "lost worker (it resumes from the last checkpoint)")
    stages: dict[str, StageResources] = Field(
        default_factory=dict, description="stage name (every key of it), or `stage@key` (that student, model or "
                                          "transfer set alone) -> its Ray workers; others run locally")

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: dict) -> dict:
        for name in v:
            if name.partition("@")[0] not in RAY_STAGES:
                raise ValueError(f"{name!r}: not a stage that runs on Ray (allowed: {', '.join(RAY_STAGES)}, "
                                 f"or <stage>@<key>)")
        return v

    def on_ray(self, stage: str, key: str | None = None) -> StageResources | None:
        """The resources of `stage` (for `key`) when it runs on Ray: engine ray and `stage@key` or `stage` named
        (the former first), else None."""
        if self.engine != "ray":
            return None
        return self.stages.get(f"{stage}@{key}") or self.stages.get(stage)


def _keys(cfg, stage: str) -> list[str]:
    """The keys a stage runs for (as kd_core.stages.stage_keys, without importing the stages)."""
    if stage in ("cache_teacher", "distill", "finetune"):
        return list(cfg.students)
    if stage == "evaluate":
        return [cfg.teacher.name, *cfg.students]
    return list(cfg.transfer_sets) if stage == "transfer" else []


def check_execution(cfg) -> None:
    """`stage@key` names a key of that stage; a training stage runs on Ray or under its `training.launcher`
    (torchrun / deepspeed), not both: a ValueError naming the keys."""
    ex = cfg.execution
    for name in ex.stages:
        stage, _, key = name.partition("@")
        if key and key not in _keys(cfg, stage):
            raise ValueError(f"execution.stages.{name}: {stage} has no key {key!r} "
                             f"(allowed: {', '.join(_keys(cfg, stage)) or 'none'})")
    if ex.engine != "ray":
        return
    trainings = [("train_teacher", None, "teacher", cfg.teacher.training)]
    trainings += [(stage, k, f"students.{k}", s.training) for stage in ("distill", "finetune")
                  for k, s in cfg.students.items()]
    for stage, key, where, training in trainings:
        if ex.on_ray(stage, key) is not None and training.launcher is not None:
            raise ValueError(f"execution.stages.{stage}: runs on Ray, but {where}.training.launcher is set too "
                             f"(allowed: one of them)")
