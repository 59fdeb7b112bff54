"""`fused_lm_head` on and off at the default size: a `kd` epoch of params.yaml's student, live teacher and cache.

    OMP_NUM_THREADS=1 python bench/fused_default.py [--params params.yaml] [--examples 1200] [--rounds 3]

As `bench/cache_epoch.py` (whose set-up it reuses: a temporary run folder, `prepare`, `train_teacher` with
`train: false`, `cache_teacher`): one epoch of the same student through `kd_core.training.train`, `kd` with fkl,
with the live teacher and on the cache (top-64), each with `fused_lm_head` true and false. Interleaved and
rotated; medians of wall and CPU time, the paired ratio fused / unfused within a round, and the final training
loss of each (equal up to float rounding: the same loss).
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
from kd_core.config import load_config
from kd_core.data.tokenize import load_tokenizer
from kd_core.methods import get_method
from kd_core.models import make_model
from kd_core.run import RunPaths, load_model, load_train_set, n_positions
from kd_core.stages import run_stage
from kd_core.stages.cache_teacher import cache_teacher, load_for_training
from kd_core.training import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--examples", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kd-bench-fused-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> None:
    base = load_config(args.params)
    student = base.students["sft"].model_dump(mode="json", include={"model", "training"})
    student["training"] = {**student["training"], "epochs": 1.0, "max_steps": -1}
    common = {"teacher": base.teacher.name, "train_data": "train", "method": "kd", "divergence": "fkl", **student}
    cache = {"teacher_cache": {"enabled": True, "top_k": 64}}
    students = {"live-fused": {**common, "fused_lm_head": True}, "live-unfused": {**common, "fused_lm_head": False},
                "cache-fused": {**common, **cache, "fused_lm_head": True},
                "cache-unfused": {**common, **cache, "fused_lm_head": False}}
    teacher = base.teacher.model_dump(mode="json")
    teacher["train"] = False
    cfg = load_config(args.params, {"run_dir": str(tmp / "run"), "students": students, "teacher": teacher,
                                    "transfer_sets": {}, "data.builtin_examples": args.examples})
    paths = RunPaths.of(cfg)
    run_stage("prepare", cfg)
    run_stage("train_teacher", cfg)
    cache_teacher(cfg, paths, "cache-fused")
    tokenizer = load_tokenizer(paths.tokenizer)
    dataset, _ = load_train_set(cfg, paths, tokenizer)
    teacher_model = load_model(paths, cfg.teacher.name)
    names = list(students)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    final: dict[str, float] = {}
    loads = []
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sc = cfg.student(name)
            model = make_model(sc.model, tokenizer, n_positions(cfg), seed=0)
            method = get_method(sc.method)(sc, sc.method_args)
            cached = load_for_training(cfg, paths, name, dataset, model) if sc.teacher_cache.enabled else None
            loads.append(os.getloadavg()[0])
            w0, c0 = time.perf_counter(), time.process_time()
            result = train(model, dataset, tokenizer, sc.training, tmp / "out" / name, method=method, seed=0,
                           teacher=None if cached else teacher_model, teacher_cache=cached, save=False)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            final[name] = [h["loss"] for h in result.history if "loss" in h][-1]
            print(f"round {r}: {name} {wall[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU", flush=True)

    def paired(times: dict[str, list[float]], a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"\nvocabulary {len(tokenizer)}, batch {cfg.student('live-fused').training.batch_size}, load average "
          f"{min(loads):.1f}-{max(loads):.1f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| epoch | median wall s | median CPU s | last logged loss | fused / unfused wall | fused / unfused CPU |")
    print("|---|---|---|---|---|---|")
    for name in names:
        other = name.replace("-fused", "-unfused") if name.endswith("-fused") else None
        ratios = (f"{paired(wall, name, other):.2f} | {paired(cpu, name, other):.2f}" if other else "- | -")
        print(f"| {name} | {statistics.median(wall[name]):.1f} | {statistics.median(cpu[name]):.1f} | "
              f"{final[name]:.6f} | {ratios} |")


if __name__ == "__main__":
    main()
