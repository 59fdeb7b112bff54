"""Ray scaling on this machine (issue 28): distillation on 2 Ray Train workers vs 1, evaluation generations sharded
over 2 Ray actors vs one process, and the fixed cost of submitting a stage to Ray with the cluster up.

    .venv/bin/python bench/ray_scaling.py [--steps 40] [--prompts 128] [--rounds 2]

Set-up (in a scratch folder): params.yaml's data, tokenizer and models (the `sft` student's architecture, the
teacher untrained: `train: false`, which does not change the cost), `prepare` and `train_teacher` in process, a
local Ray of 2 CPUs started here. Every worker and the one-process baselines use one torch thread.

- distill: a `kd` (forward KL, live teacher) student, `--steps` optimizer steps of a global batch of 32
  (1 worker × 32, or 2 workers × 16), as `run_training_job` submits it; throughput = the tokens of the steps'
  batches / the training's own wall time (`train_info.train_time_s`, measured inside rank 0 around the Trainer's
  loop: no start-up, no model loading). Jobs alternate 1, 2, 1, 2, ... for `--rounds` rounds; the median is kept.
- evaluation: `generate` over `--prompts` test prompts (greedy, then two sampling seeds, as evaluate does; batches
  of 16, max 24 new tokens) in this process vs sharded over 2 actors (`kd_core.pipeline.cluster.shards`), warm (actors
  started, model loaded: the state after a stage's first call) and cold (the stage's first call: actors started
  and the model loaded inside the timing); the outputs are checked equal.
- submit cost: a Ray Train job of 1 worker whose function returns at once (Ray's part of a stage: controller,
  placement, worker process, torch.distributed), and a 1-step distill's total minus its training time (Ray's part
  plus the worker's imports and model loading, which a `torchrun` launch pays too).

Prints the figures, the load average before and after, and a control: the speed-up 2 plain processes get over 1
on pure-Python work at that time (2.0 on 2 idle cores), since the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import prepared_run, scratch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB_PARAMS: list[Path] = []  # the jobs' params file, in the scratch folder (set by main)


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg, *args):
        self.lines.append(msg % args if args else msg)


def _spin(n: int) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - start


def machine_parallelism(n: int = 4_000_000) -> float:
    """The control: how much faster 2 plain processes do two units of pure-Python work than 1 process does them one
    after the other, right now (2.0 on 2 idle cores; less when other work holds the cores)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_spin, [1000, 1000]))  # started
        start = time.perf_counter()
        list(pool.map(_spin, [n]))
        list(pool.map(_spin, [n]))
        serial = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(_spin, [n, n]))
        return serial / (time.perf_counter() - start)


def _noop_worker(config: dict) -> None:
    """A Ray Train worker that does nothing (Ray's fixed cost only)."""


def _job_config(params: dict):
    """`params` written as the jobs' params file (their workers read it) and loaded."""
    import yaml

    from kd_core.config import load_config

    JOB_PARAMS[0].write_text(yaml.safe_dump(params, sort_keys=False))
    return load_config(JOB_PARAMS[0])


def _distill(cfg, workers: int, steps: int, batch: int) -> tuple[float, dict]:
    """One distill job on Ray; (its total wall seconds, its train_info)."""
    import json

    from kd_core.pipeline.cluster.dispatch import run_training_job, training_on_ray
    from kd_core.run import RunPaths

    params = cfg.model_dump(mode="json")
    student = params["students"]["fkl"]
    student["training"] = {**student["training"], "batch_size": batch, "max_steps": steps, "save_steps": 0,
                           "logging_steps": steps}
    params["execution"] = {"engine": "ray", "stages": {"distill": {"workers": workers, "cpus_per_worker": 1}}}
    job_cfg = _job_config(params)
    start = time.perf_counter()
    run_training_job("distill", "fkl", JOB_PARAMS[0], None, job_cfg, training_on_ray("distill", job_cfg, "fkl"),
                     Lines())
    total = time.perf_counter() - start
    return total, json.loads(RunPaths.of(job_cfg).train_info("fkl.distill").read_text())


def _tokens_per_example(cfg) -> float:
    from kd_core.data.tokenize import load_tokenizer
    from kd_core.run import RunPaths, load_train_set

    paths = RunPaths.of(cfg)
    ds, _ = load_train_set(cfg, paths, load_tokenizer(paths.tokenizer))
    return statistics.fmean(len(ex.input_ids) for ex in ds.examples)


def bench_distill(cfg, steps: int, rounds: int) -> dict:
    per_example = _tokens_per_example(cfg)
    tokens = per_example * 32 * steps
    rates: dict[int, list[float]] = {1: [], 2: []}
    totals: dict[int, list[float]] = {1: [], 2: []}
    losses: dict[int, float] = {}
    for _ in range(rounds):
        for workers in (1, 2):
            total, info = _distill(cfg, workers, steps, 32 // workers)
            rates[workers].append(tokens / info["train_time_s"])
            totals[workers].append(total)
            losses[workers] = info["final_loss"]
            print(f"  distill on {workers} worker(s): {tokens / info['train_time_s']:.0f} tokens/s "
                  f"(train {info['train_time_s']:.1f} s, job {total:.1f} s)", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    return {"tokens_per_step": per_example * 32, "one_worker_tokens_s": one, "two_workers_tokens_s": two,
            "speedup": two / one, "job_s": {w: statistics.median(t) for w, t in totals.items()},
            "final_loss": losses}


def bench_generation(cfg, n_prompts: int, rounds: int) -> dict:
    import torch

    from kd_core.pipeline.cluster.shards import sharded
    from kd_core.config import parse_config
    from kd_core.data.tokenize import encode_prompt, load_tokenizer
    from kd_core.generation import generate
    from kd_core.io import read_jsonl
    from kd_core.run import RunPaths, load_model

    torch.set_num_threads(1)
    paths = RunPaths.of(cfg)
    tokenizer = load_tokenizer(paths.tokenizer)
    rows = (read_jsonl(paths.split("test")) * 8)[:n_prompts]
    prompts = [encode_prompt(r, tokenizer, cfg.data.template, cfg.tokenizer.max_length) for r in rows]
    model = load_model(paths, cfg.teacher.name)
    args = dict(max_new_tokens=24, batch_size=16)

    def evaluation() -> list:
        out = [generate(model, tokenizer, prompts, do_sample=False, **args).token_ids]
        return out + [generate(model, tokenizer, prompts, do_sample=True, seed=s, **args).token_ids for s in (0, 1)]

    params = cfg.model_dump(mode="json")
    params["execution"] = {"engine": "ray", "stages": {"evaluate": {"workers": 2, "cpus_per_worker": 1}}}
    ray_cfg = parse_config(params)
    local, warm, cold = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        expected = evaluation()
        local.append(time.perf_counter() - start)
        with sharded(ray_cfg, "evaluate"):
            start = time.perf_counter()
            got = evaluation()
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            evaluation()
            warm.append(time.perf_counter() - start)
        assert got == expected, "sharded generations differ from one process's"
        print(f"  evaluation generations: one process {local[-1]:.1f} s, 2 actors warm {warm[-1]:.1f} s, "
              f"cold {cold[-1]:.1f} s", flush=True)
    one, two = statistics.median(local), statistics.median(warm)
    return {"prompts": n_prompts, "one_process_s": one, "two_workers_warm_s": two, "two_workers_cold_s":
            statistics.median(cold), "speedup_warm": one / two, "speedup_cold": one / statistics.median(cold)}


def bench_submit(cfg, rounds: int) -> dict:
    from kd_core.pipeline.cluster import train_job
    from kd_core.pipeline.cluster.dispatch import run_training_job, training_on_ray

    params = cfg.model_dump(mode="json")
    params["execution"] = {"engine": "ray", "stages": {"distill": {"workers": 1, "cpus_per_worker": 1}}}
    job_cfg = _job_config(params)
    resources = training_on_ray("distill", job_cfg, "fkl")
    noop = []
    real = train_job._worker
    train_job._worker = _noop_worker
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            run_training_job("distill", "fkl", JOB_PARAMS[0], None, job_cfg, resources, Lines())
            noop.append(time.perf_counter() - start)
    finally:
        train_job._worker = real
    one_step = []
    for _ in range(rounds):
        total, info = _distill(cfg, 1, 1, 32)
        one_step.append(total - info["train_time_s"])
    print(f"  submit: empty job {noop}, 1-step distill minus training {one_step}", flush=True)
    return {"empty_job_s": statistics.median(noop), "one_step_distill_overhead_s": statistics.median(one_step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import ray

    load_before = os.getloadavg()
    with scratch("kd-bench-ray-") as tmp:  # (run from the project root: the data's eval sets are read from it)
        JOB_PARAMS.append(tmp / "bench-params.yaml")
        base = __import__("kd_core.config", fromlist=["load_config"]).load_config(REPO / "params.yaml")
        student = base.students["sft"].model_dump(mode="json", include={"model", "training"})
        students = {"fkl": {"method": "kd", "divergence": "fkl", "teacher": base.teacher.name, "train_data": "train",
                            **student}}
        cfg, _ = prepared_run(str(REPO / "params.yaml"), tmp, students)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        control = [machine_parallelism()]
        results = {"submit": bench_submit(cfg, args.rounds),
                   "evaluation": bench_generation(cfg, args.prompts, args.rounds)}
        control.append(machine_parallelism())
        results["distill"] = bench_distill(cfg, args.steps, args.rounds)
        control.append(machine_parallelism())
        ray.shutdown()
    load_after = os.getloadavg()
    d, e, s = results["distill"], results["evaluation"], results["submit"]
    print(f"\nload average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} ({os.cpu_count()} cores); the machine's "
          f"parallelism (2 processes vs 1, pure Python; 2.0 when idle) before / between / after: "
          f"{' / '.join(f'{c:.2f}x' for c in control)}")
    print(f"distill: 1 worker {d['one_worker_tokens_s']:.0f} tokens/s, 2 workers {d['two_workers_tokens_s']:.0f} "
          f"tokens/s: {d['speedup']:.2f}x (target >= 1.7); job wall {d['job_s']}; {d['tokens_per_step']:.0f} "
          f"tokens/step; final loss {d['final_loss']}")
    print(f"evaluation generations ({e['prompts']} prompts x 3): one process {e['one_process_s']:.1f} s, 2 actors "
          f"{e['two_workers_warm_s']:.1f} s warm ({e['speedup_warm']:.2f}x, target >= 1.7), "
          f"{e['two_workers_cold_s']:.1f} s cold ({e['speedup_cold']:.2f}x)")
    print(f"submit cost: empty Ray Train job {s['empty_job_s']:.1f} s (target <= 5 s); 1-step distill job minus "
          f"its training {s['one_step_distill_overhead_s']:.1f} s")


if __name__ == "__main__":
    main()
