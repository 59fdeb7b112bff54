"""A KD epoch on the teacher-logit cache vs an SFT epoch and a live-teacher KD epoch, same data and student.

    python bench/cache_epoch.py [--params params.yaml] [--examples 1200] [--rounds 3] [--top-k 64]

Uses the real stage functions under a temporary run folder: `prepare`, `train_teacher` (with `train: false`,
so the teacher is params.yaml's architecture at its initial weights: its outputs do not change the cost),
`cache_teacher` once, then one-epoch `distill` runs of three students that differ only in method: `sft`,
`kd` (fkl) with the live teacher, `kd` (fkl) on the cache. The figure per run is the trainer's own wall time
(`train_time_s`: the epoch, without model loading or tracking). The three are interleaved, rotated each round
(A B C, B C A, ...), because the machine is shared; medians are reported with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import kd_core  # noqa: F401  (offline defaults)
from kd_core import logit_cache, stages
from kd_core.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--examples", type=int, default=1200, help="built-in examples (train split ~80%%)")
    ap.add_argument("--rounds", type=int, default=3)
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
    student["training"] = {**student["training"], "epochs": 1.0}
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
    paths = stages.RunPaths.of(cfg)
    stages.prepare(cfg, paths)
    stages.train_teacher(cfg, paths)
    start = time.perf_counter()
    built = logit_cache.cache_teacher(cfg, paths, "kd-cache")
    cache_s = time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in students}
    loads = []
    names = list(students)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            loads.append(os.getloadavg()[0])
            times[name].append(stages.distill(cfg, paths, name)["train_time_s"])
            print(f"round {r}: {name} {times[name][-1]:.1f} s", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    info = json.loads(paths.train_info("kd-cache.distill").read_text())
    print(f"\n{built['examples']} training examples, {built['tokens']} response tokens, vocabulary "
          f"{built['vocab_size']}, k = {built['top_k']}; cache built in {cache_s:.1f} s "
          f"({built['bytes'] / 2**20:.1f} MiB); {info['steps']} steps per epoch; load average "
          f"{min(loads):.1f}-{max(loads):.1f}; {os.cpu_count()} CPUs")
    print("| epoch | median s | all runs s | / SFT |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {med[name]:.1f} | {', '.join(f'{t:.1f}' for t in times[name])} | "
              f"{med[name] / med['sft']:.2f} |")
    print(f"\nKD on the cache / SFT: {med['kd-cache'] / med['sft']:.2f} (target <= 1.15); "
          f"KD on the cache / live-teacher KD: {med['kd-cache'] / med['kd-live']:.2f}")


if __name__ == "__main__":
    main()
