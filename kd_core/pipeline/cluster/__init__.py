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

`dispatch` is what the flow calls and `sharding` what `run_stage` calls (neither imports Ray for engine local);
`kd_core.generation.SHARDS` is where `generate` and `build_cache` find the stage's shard pool. Importing this package
imports nothing.
"""
