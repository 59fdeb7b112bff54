"""A KD epoch on the teacher-logit cache (compact and float32) vs an SFT epoch and a live-teacher KD epoch, same data
and student.

    OMP_NUM_THREADS=1 python bench/cache_epoch.py [--params params.yaml] [--examples 1200] [--rounds 5] [--top-k 64]

The stage functions build a temporary run folder (bench/common.py): `prepare`, `train_teacher` (with `train: false`, so the
teacher is params.yaml's architecture at its initial weights: its outputs do not change the cost) and
`cache_teacher` (timed: one teacher pass over the data). Then four one-epoch trainings of the same student
(params.yaml's `sft` student: model, batch size, lr) through `kd_core.training.trainer.train`: `sft`, `kd` (fkl)
with the live teacher, `kd` (fkl) on the cache in its default compact format (float16 log-probs, uint16 ids:
`kd-cache`) and on a float32 one (`kd-cache-f32`, the format before). Each is timed in wall-clock and in this process's CPU
time (`time.process_time`, less sensitive to other processes on a shared machine). The four are
interleaved and rotated each round (A B C, B C A, ...); reported are the medians, and the median over rounds
of the ratio within a round (the load is closest within a round).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import EpochTimes, one_epoch_student, prepared_run, scratch  # noqa: E402
from kd_core.stages.cache_teacher import cache_teacher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--examples", type=int, default=1200, help="built-in examples (train split ~80%%)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()
    with scratch("kd-bench-cache-") as tmp:
        run(args, tmp)


def run(args, tmp) -> None:
    students = {
        "sft": one_epoch_student(args.params, method="sft"),
        "kd-live": one_epoch_student(args.params, method="kd", divergence="fkl"),
        "kd-cache": one_epoch_student(args.params, method="kd", divergence="fkl",
                                      teacher_cache={"enabled": True, "top_k": args.top_k}),
        "kd-cache-f32": one_epoch_student(args.params, method="kd", divergence="fkl",
                                          teacher_cache={"enabled": True, "top_k": args.top_k, "logprobs": "float32"}),
    }
    cfg, paths = prepared_run(args.params, tmp, students, **{"data.builtin_examples": args.examples})
    start = time.perf_counter()
    built = cache_teacher(cfg, paths, "kd-cache")
    cache_s = time.perf_counter() - start
    built32 = cache_teacher(cfg, paths, "kd-cache-f32")
    times = EpochTimes(cfg, paths, tmp / "out")
    times.run(args.rounds)

    print(f"\n{built['examples']} training examples, {built['tokens']} response tokens, vocabulary "
          f"{built['vocab_size']}, k = {built['top_k']}; cache built in {cache_s:.1f} s wall "
          f"({built['bytes'] / 2**20:.1f} MiB, {built['bytes_per_token']:.0f} bytes per token; float32: "
          f"{built32['bytes'] / 2**20:.1f} MiB, {built32['bytes_per_token']:.0f}); batch {cfg.student('sft').training.batch_size}; load average "
          f"{times.load_range()}; {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| epoch | median wall s | median CPU s | wall runs | wall / SFT (paired) | CPU / SFT (paired) |")
    print("|---|---|---|---|---|---|")
    for name in times.names:
        print(f"| {name} | {times.median('wall', name):.1f} | {times.median('cpu', name):.1f} | "
              f"{', '.join(f'{t:.1f}' for t in times.wall[name])} | {times.paired('wall', name, 'sft'):.2f} | "
              f"{times.paired('cpu', name, 'sft'):.2f} |")
    print(f"\nKD on the cache / SFT: {times.paired('wall', 'kd-cache', 'sft'):.2f} wall, "
          f"{times.paired('cpu', 'kd-cache', 'sft'):.2f} CPU (target <= 1.15); KD on the cache / live-teacher KD: "
          f"{times.paired('wall', 'kd-cache', 'kd-live'):.2f} wall, {times.paired('cpu', 'kd-cache', 'kd-live'):.2f} CPU; "
          f"compact cache / float32 cache: {times.paired('wall', 'kd-cache', 'kd-cache-f32'):.2f} wall, "
          f"{times.paired('cpu', 'kd-cache', 'kd-cache-f32'):.2f} CPU")


if __name__ == "__main__":
    main()
