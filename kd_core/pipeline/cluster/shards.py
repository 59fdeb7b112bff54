"""An inference stage's batches shared out among Ray actors: `generate` (transfer sets, evaluation) and the teacher
cache's forward passes (`build_cache`), each actor loading the model once from its folder and running the same
code on a contiguous run of whole batches; the driver merges the rows in order.

The merged rows are those of the one-process run, bit for bit: shards are cut on the batch boundaries of the whole
run (every batch, hence its padding, is the one the whole run makes), and sampling is seeded per row
(`kd_core.generation.row_seed`), not per process. Batches are shared as evenly as whole batches allow, the first
actors taking one more when they do not divide.

A model that is not a folder on disk (built in memory) is run in this process, as without Ray. The stage itself
(reading data, metrics, writing its files) runs where it always does: the stage's Prefect task.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import ray
import torch

from kd_core.pipeline.cluster.connect import connect, worker_env
from kd_core.generation import SHARDS
from kd_core.errors import Transient

log = logging.getLogger("kd")


@ray.remote
class ShardWorker:
    """One actor of a stage: its models by folder, loaded on first use and kept for the stage's later calls."""

    def __init__(self, cwd: str, env: dict[str, str], threads: int):
        os.environ.update(env)
        os.chdir(cwd)
        torch.set_num_threads(threads)
        self.models: dict[str, torch.nn.Module] = {}

    def _model(self, folder: str):
        if folder not in self.models:
            from kd_core.models.build import load_checkpoint

            model = load_checkpoint(folder).eval()
            self.models[folder] = model.cuda() if torch.cuda.is_available() else model
        return self.models[folder]

    def generate_ids(self, folder: str, prompts: list[list[int]], **kwargs) -> list[list[int]]:
        from kd_core.generation import generate_ids

        return generate_ids(self._model(folder), prompts, **kwargs)

    def build_cache(self, folder: str, examples: list, *args) -> dict[str, torch.Tensor]:
        from kd_core.data.tokenize import EncodedDataset
        from kd_core.teachers.cache import build_cache

        return build_cache(self._model(folder), EncodedDataset(examples), *args)


def shard_bounds(rows: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """The [start, end) rows of each shard: whole batches of `batch_size` (the last one possibly short), as even as
    they allow, in order; no empty shard (fewer shards than workers when there are fewer batches)."""
    batches = -(-rows // batch_size)
    shards = min(workers, batches)
    bounds, start = [], 0
    for i in range(shards):
        count = batches // shards + (i < batches % shards)
        end = min(rows, start + count * batch_size)
        bounds.append((start, end))
        start = end
    return bounds


def model_folder(model) -> str | None:
    """The folder `model` was loaded from (an absolute path), or None when it has none on disk."""
    source = getattr(model, "name_or_path", "") or ""
    path = Path(source)
    return str(path.resolve()) if source and (path / "config.json").is_file() else None


class ShardPool:
    """The stage's actors (started on first use, `resources` each) and the sharded versions of `generate_ids` and
    `build_cache`."""

    def __init__(self, resources, stage: str):
        self.resources, self.stage = resources, stage
        self.actors: list = []

    def _actors(self) -> list:
        if not self.actors:
            r = self.resources
            options = dict(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)
            if r.accelerator_type:
                options["accelerator_type"] = r.accelerator_type
            threads = max(1, int(r.cpus_per_worker))
            env = worker_env()
            self.actors = [ShardWorker.options(**options).remote(os.getcwd(), env, threads) for _ in range(r.workers)]
            log.info("%s: %d Ray workers (%s CPU, %s GPU each)", self.stage, r.workers, r.cpus_per_worker,
                     r.gpus_per_worker)
        return self.actors

    def _gather(self, refs: list) -> list:
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as err:  # the worker's own error (bad input, a model it cannot load)
            raise err.cause from None
        except ray.exceptions.RayActorError as err:
            raise Transient(f"{self.stage}: a Ray worker was lost ({str(err).splitlines()[0]})") from None

    def generate_ids(self, model, prompts: list[list[int]], *, batch_size: int, **kwargs) -> list[list[int]]:
        from kd_core.generation import generate_ids

        folder = model_folder(model)
        if folder is None:
            return generate_ids(model, prompts, batch_size=batch_size, **kwargs)
        actors = self._actors()
        refs = [actor.generate_ids.remote(folder, prompts[a:b], batch_size=batch_size, first_row=a, **kwargs)
                for actor, (a, b) in zip(actors, shard_bounds(len(prompts), batch_size, len(actors)))]
        return [row for shard in self._gather(refs) for row in shard]

    def build_cache(self, teacher, dataset, pad_token_id: int, vocab_size: int, temperature: float, top_k: int,
                    batch_size: int) -> dict[str, torch.Tensor]:
        from kd_core.teachers.cache import build_cache

        folder = model_folder(teacher)
        args = (pad_token_id, vocab_size, temperature, top_k, batch_size)
        if folder is None or not len(dataset):
            with _unsharded():
                return build_cache(teacher, dataset, *args)
        actors = self._actors()
        refs = [actor.build_cache.remote(folder, dataset.examples[a:b], *args)
                for actor, (a, b) in zip(actors, shard_bounds(len(dataset), batch_size, len(actors)))]
        parts = self._gather(refs)
        counts = torch.cat([p["offsets"].diff() for p in parts])
        merged = {k: torch.cat([p[k] for p in parts]) for k in ("top_logprobs", "top_ids", "tail_logmass")}
        return merged | {"offsets": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])}

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


@contextlib.contextmanager
def _unsharded():
    token = SHARDS.set(None)
    try:
        yield
    finally:
        SHARDS.reset(token)


@contextlib.contextmanager
def sharded(cfg, stage: str, key: str | None = None):
    """The stage's generation and teacher forwards go to a `ShardPool` of its `execution` resources (for `key`) while
    the block runs (this thread); the actors end with it."""
    connect(cfg.execution)
    pool = ShardPool(cfg.execution.on_ray(stage, key), stage)
    token = SHARDS.set(pool)
    try:
        yield pool
    finally:
        SHARDS.reset(token)
        pool.close()
