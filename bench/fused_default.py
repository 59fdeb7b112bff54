"""`fused_lm_head` on and off at the default size: a `kd` epoch of params.yaml's student, live teacher and cache.

    OMP_NUM_THREADS=1 python bench/fused_default.py [--params params.yaml] [--examples 1200] [--rounds 3]

As `bench/cache_epoch.py` (whose set-up it shares, bench/common.py: a temporary run folder, `prepare`, `train_teacher` with
`train: false`, `cache_teacher`): one epoch of the same student through `kd_core.training.trainer.train`, `kd` with fkl,
with the live teacher and on the cache (top-64), each with `fused_lm_head` true and false. Interleaved and
rotated; medians of wall and CPU time, the paired ratio fused / unfused within a round, and the final training
loss of each (equal up to float rounding: the same loss).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import EpochTimes, one_epoch_student, prepared_run, scratch  # noqa: E402
from kd_core.stages.cache_teacher import cache_teacher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--examples", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with scratch("kd-bench-fused-") as tmp:
        run(args, tmp)


def run(args, tmp) -> None:
    cache = {"enabled": True, "top_k": 64}
    kd = dict(method="kd", divergence="fkl")
    students = {"live-fused": one_epoch_student(args.params, **kd, fused_lm_head=True),
                "live-unfused": one_epoch_student(args.params, **kd, fused_lm_head=False),
                "cache-fused": one_epoch_student(args.params, **kd, teacher_cache=cache, fused_lm_head=True),
                "cache-unfused": one_epoch_student(args.params, **kd, teacher_cache=cache, fused_lm_head=False)}
    cfg, paths = prepared_run(args.params, tmp, students, **{"data.builtin_examples": args.examples})
    cache_teacher(cfg, paths, "cache-fused")
    times = EpochTimes(cfg, paths, tmp / "out")
    times.run(args.rounds)

    print(f"\nvocabulary {len(times.tokenizer)}, batch {cfg.student('live-fused').training.batch_size}, load average "
          f"{times.load_range()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| epoch | median wall s | median CPU s | final training loss | fused / unfused wall | fused / unfused CPU |")
    print("|---|---|---|---|---|---|")
    for name in times.names:
        other = name.replace("-fused", "-unfused") if name.endswith("-fused") else None
        ratios = (f"{times.paired('wall', name, other):.2f} | {times.paired('cpu', name, other):.2f}"
                  if other else "- | -")
        print(f"| {name} | {times.median('wall', name):.1f} | {times.median('cpu', name):.1f} | "
              f"{times.final_loss[name]:.6f} | {ratios} |")


if __name__ == "__main__":
    main()
