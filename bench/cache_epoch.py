"""A KD epoch on the teacher-logit cache vs an SFT epoch and a live-teacher KD epoch, same data and student.

    OMP_NUM_THREADS=1 python bench/cache_epoch.py [--params params.yaml] [--examples 1200] [--rounds 5] [--top-k 64]

The stage functions build a temporary run folder: `prepare`, `train_teacher` (with `train: false`, so the
teacher is params.yaml's architecture at its initial weights: its outputs do not change the cost) and
`cache_teacher` (timed: one teacher pass over the data). Then three one-epoch trainings of the same student
(params.yaml's `sft` student: model, batch size, lr) through `kd_core.training.train`: `sft`, `kd` (fkl)
with the live teacher, and `kd` (fkl) on the cache. Each is timed in wall-clock and in this process's CPU
time (`time.process_time`, less sensitive to other processes on a shared machine). The three are
interleaved and rotated each round (A B C, B C A, ...); reported are the medians, and the median over rounds
of the ratio within a round (the load is closest within a round).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import kd_core  # noqa: F401  (offline defaults)
from kd_core.run import RunPaths, load_model, load_train_set, n_positions
from kd_core.stages import run_stage
from kd_core.stages.cache_teacher import cache_teacher, load_for_training
from kd_core.config import load_config
from kd_core.data.tokenize import load_tokenizer
from kd_core.methods import get_method
from kd_core.models import make_model
from kd_core.training import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--examples", type=int, default=1200, help="built-in examples (train split ~80%%)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kd-bench-cache-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> None:
    base = load_config(args.params)
    student = base.students["sft"].model_dump(mode="json", include={"model", "training"})
    student["training"] = {**student["training"], "epochs": 1.0, "max_steps": -1}
    common = {"teacher": base.teacher.name, "train_data": "train", **student}
    students = {
        "sft": {**common, "method": "sft"},
        "kd-live": {**common, "method": "kd", "divergence": "fkl"},
        "kd-cache": {**common, "method": "kd", "divergence": "fkl",
                     "teacher_cache": {"enabled": True, "top_k": args.top_k}},
    }
    teacher = base.teacher.model_dump(mode="json")
    teacher["train"] = False
    cfg = load_config(args.params, {"run_dir": str(tmp / "run"), "students": students, "teacher": teacher,
                                    "transfer_sets": {}, "data.builtin_examples": args.examples,
                                    "data.eval_sets": {}, "evaluation.eval_sets": ["test"]})
    paths = RunPaths.of(cfg)
    run_stage("prepare", cfg)
    run_stage("train_teacher", cfg)
    start = time.perf_counter()
    built = cache_teacher(cfg, paths, "kd-cache")
    cache_s = time.perf_counter() - start

    tokenizer = load_tokenizer(paths.tokenizer)
    dataset, _ = load_train_set(cfg, paths, tokenizer)
    teacher = load_model(paths, cfg.teacher.name)
    names = list(students)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            sc = cfg.student(name)
            student = make_model(sc.model, tokenizer, n_positions(cfg), seed=0)
            method = get_method(sc.method)(sc, sc.method_args)
            cache = load_for_training(cfg, paths, name, dataset, student) if sc.teacher_cache.enabled else None
            loads.append(os.getloadavg()[0])
            w0, c0 = time.perf_counter(), time.process_time()
            train(student, dataset, tokenizer, sc.training, tmp / "out" / name, method=method, seed=0,
                         teacher=teacher if name == "kd-live" else None, teacher_cache=cache, save=False)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            print(f"round {r}: {name} {wall[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU", flush=True)

    def paired(times: dict[str, list[float]], a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"\n{built['examples']} training examples, {built['tokens']} response tokens, vocabulary "
          f"{built['vocab_size']}, k = {built['top_k']}; cache built in {cache_s:.1f} s wall "
          f"({built['bytes'] / 2**20:.1f} MiB); batch {cfg.student('sft').training.batch_size}; load average "
          f"{min(loads):.1f}-{max(loads):.1f}; {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| epoch | median wall s | median CPU s | wall runs | wall / SFT (paired) | CPU / SFT (paired) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {statistics.median(wall[name]):.1f} | {statistics.median(cpu[name]):.1f} | "
              f"{', '.join(f'{t:.1f}' for t in wall[name])} | {paired(wall, name, 'sft'):.2f} | "
              f"{paired(cpu, name, 'sft'):.2f} |")
    print(f"\nKD on the cache / SFT: {paired(wall, 'kd-cache', 'sft'):.2f} wall, {paired(cpu, 'kd-cache', 'sft'):.2f} "
          f"CPU (target <= 1.15); KD on the cache / live-teacher KD: {paired(wall, 'kd-cache', 'kd-live'):.2f} wall, "
          f"{paired(cpu, 'kd-cache', 'kd-live'):.2f} CPU")


if __name__ == "__main__":
    main()
