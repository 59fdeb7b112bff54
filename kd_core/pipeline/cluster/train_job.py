"""A training stage (`train_teacher`, `distill`, `finetune`) as a Ray Train job: a `TorchTrainer` of the stage's
`execution.stages.<stage>` workers, each running the stage itself (`run_stage`: the same training code as in
process, HF Trainer / DeepSpeed inside) with torch.distributed set up by Ray (gloo on CPU, NCCL on GPUs) and the
torchrun variables (RANK, WORLD_SIZE, ...) set, so rank 0 writes the outputs as under torchrun.

- Where: the cluster of `execution` (kd_core/pipeline/cluster/connect.py); each worker works in the submitting process's
  folder, which every node must see at the same path (a shared volume), with its environment (`worker_env`, set
  by the worker itself, so that Ray may give the job its idle worker processes).
- Log: every line a worker prints or logs (prefixed `[rank N]:`) is streamed through a `LogChannel` actor into the
  stage task's log, as a launched stage's lines are (kd_core/pipeline/launcher.py).
- Failure: a worker's error is recorded in the channel and raised by `run_training_job` as the error the stage
  raises in process (same class, message, exit status, retry rule: `launcher.error_from_record`). A worker lost
  (killed, its node gone) makes Ray restart the group (`FailureConfig(max_failures=execution.max_failures)`): the
  stage runs again and resumes from its last complete checkpoint (`training.save_steps`, in the run folder). An
  error that is not retryable (bad input) is not run again: the restarted workers find it in the channel and end
  at once. Workers lost more often than that: `Transient` (the flow retries the task).
- Ray's own records of the job (`RunConfig.storage_path`) go to `<run folder>/.ray-train/`, removed after a
  success.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import threading
import uuid
from pathlib import Path

import ray

from kd_core import errors
from kd_core.pipeline.cluster.connect import connect, worker_env

log = logging.getLogger("kd")
DRAIN_INTERVAL_S = 0.5


@ray.remote(num_cpus=0)
class LogChannel:
    """The lines the workers of one job print (drained by the submitting process) and their errors' records."""

    def __init__(self):
        self.lines: list[str] = []
        self.records: list[dict] = []
        self.fatal = False

    def put(self, lines: list[str]) -> None:
        self.lines.extend(lines)

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out

    def fail(self, record: dict, fatal: bool) -> None:
        self.records.append(record)
        self.fatal = self.fatal or fatal

    def failure(self) -> tuple[list[dict], bool]:
        return self.records, self.fatal


class _LineStream(io.TextIOBase):
    """A text stream that sends each complete line (prefixed) to the channel."""

    def __init__(self, channel, prefix: str):
        self.channel, self.prefix, self.partial = channel, prefix, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self.partial + text).replace("\r", "\n").split("\n")
        self.partial = lines.pop()
        lines = [self.prefix + line for line in lines if line.strip()]
        if lines:
            self.channel.put.remote(lines)
        return len(text)

    def flush(self) -> None:
        if self.partial.strip():
            self.channel.put.remote([self.prefix + self.partial])
        self.partial = ""


def error_record(err: BaseException, rank: int) -> dict:
    """A worker's error as the record a launched `kd` prints (`launcher.print_error_line`)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return {"class": type(err).__name__, "exit_code": errors.exit_code(err), "message": str(message), "rank": rank}


def _worker(config: dict) -> None:
    """One Ray Train worker: the stage, in the submitting process's folder, its lines and errors to the channel."""
    import torch
    from ray import train

    context = train.get_context()
    channel, rank = config["channel"], context.get_world_rank()
    if ray.get(channel.failure.remote())[1]:
        return  # a restart after an error that fails the same way again: the submitter raises it
    os.environ.update(config["env"])  # (here, not as a runtime env: Ray can then use its idle worker processes)
    os.chdir(config["cwd"])
    torch.set_num_threads(config["threads"])
    stream = _LineStream(channel, f"[rank{rank}]: ")
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = stream
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=stream, force=True)
    print(f"worker {rank} of {context.get_world_size()} on node {ray.get_runtime_context().get_node_id()[:8]} "
          f"(pid {os.getpid()}, {config['threads']} threads)", file=stream)
    try:
        from kd_core.config import load_config
        from kd_core.pipeline.one_stage import run_stage

        run_stage(config["stage"], load_config(config["params_path"], config["overrides"]), config["key"])
    except BaseException as err:
        stream.write(f"error: {error_record(err, rank)['message']}\n")
        ray.get(channel.fail.remote(error_record(err, rank), not errors.is_retryable(err)))
        raise
    finally:
        stream.flush()
        sys.stdout, sys.stderr = saved


def _drain(channel, out, stop: threading.Event) -> None:
    while not stop.wait(DRAIN_INTERVAL_S):
        for line in ray.get(channel.take.remote()):
            out.info("%s", line)


def _raised(records: list[dict], what: str, cause: BaseException | None) -> BaseException:
    """The error to raise for a failed job: rank 0's recorded error (else the first), else a lost worker."""
    from kd_core.pipeline.launcher import error_from_record

    if records:
        return error_from_record(next((r for r in reversed(records) if r.get("rank") == 0), records[0]))
    failures = getattr(cause, "worker_failures", None) or {}
    reason = "; ".join(f"rank {rank}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:200]}"
                       for rank, e in sorted(failures.items()))
    if not reason:
        reason = (str(cause).strip().splitlines() or ["no error recorded"])[0] if cause is not None else "no error"
    return errors.Transient(f"{what}: Ray workers lost ({reason}); a rerun resumes from the last checkpoint")


def run_training_job(stage: str, key: str | None, params_path: str | os.PathLike, overrides: dict | None, cfg,
                     resources, out) -> None:
    """Run the stage as a Ray Train job of `resources` on the cluster of `cfg.execution`, its lines to `out.info`;
    raises the stage's in-process error when it fails (see the module's docstring)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kd_core.run import RunPaths

    what = f"{stage}" + (f" --model {key}" if key else "") + " on Ray"
    address = connect(cfg.execution)
    channel = LogChannel.remote()
    r = resources
    per_worker = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})
    storage = RunPaths.of(cfg).root.resolve() / ".ray-train"
    name = f"{stage}-{key or 'run'}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"channel": channel, "cwd": os.getcwd(), "env": worker_env(),
                           "threads": max(1, int(r.cpus_per_worker)),
                           "stage": stage, "key": key, "params_path": str(Path(params_path).resolve()),
                           "overrides": overrides},
        torch_config=TorchConfig(backend="nccl" if r.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=bool(r.gpus_per_worker),
                                     resources_per_worker=per_worker, accelerator_type=r.accelerator_type),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.execution.max_failures)))
    out.info("submitting %s: %d workers (%s CPU, %s GPU each) to %s", what, r.workers, r.cpus_per_worker,
             r.gpus_per_worker, address)
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(channel, out, stop), daemon=True)
    drainer.start()
    failed: BaseException | None = None
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 (Ray's TrainingFailedError: mapped to the stage's own error below)
        failed = err
    finally:
        stop.set()
        drainer.join()
        for line in ray.get(channel.take.remote()):
            out.info("%s", line)
    records, fatal = ray.get(channel.failure.remote())
    ray.kill(channel)
    if failed is not None or fatal:
        raise _raised(records, what, failed)
    shutil.rmtree(storage / name, ignore_errors=True)
    with_other_jobs = storage.is_dir() and any(storage.iterdir())
    if not with_other_jobs:
        shutil.rmtree(storage, ignore_errors=True)
    out.info("%s: finished", what)
