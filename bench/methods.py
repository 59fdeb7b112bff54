"""Every distillation method on the built-in data: same teacher, same student size, several seeds.

    python bench/methods.py [--params params.yaml] [--seeds 0 1 2] [--methods sft kd-fkl ...] [--out docs/benchmarks_methods.md]

Runs the real stage functions (prepare, train_teacher, transfer, distill, finetune, evaluate) in one
process under `runs/bench-methods` (the teacher is trained once and reused), then writes a table of
test ROUGE-L and exact match (sampled at T=1, mean ± std over seeds of the per-seed means) and training
time per method. The methods use their defaults; nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import kd_core  # noqa: F401  (offline defaults)
from kd_core.run import RunPaths
from kd_core.stages import run_stage
from kd_core.config import load_config

# label -> student settings on top of the base student (model and training come from params.yaml's `sft`)
METHODS: dict[str, dict] = {
    "sft": {"method": "sft"},
    "kd-fkl": {"method": "kd", "divergence": "fkl"},
    "kd-rkl": {"method": "kd", "divergence": "rkl"},
    "kd-jsd": {"method": "kd", "divergence": "jsd", "divergence_args": {"beta": 0.5}},
    "kd-tvd": {"method": "kd", "divergence": "tvd"},
    "kd-skl": {"method": "kd", "divergence": "skl"},
    "kd-srkl": {"method": "kd", "divergence": "srkl"},
    "kd-akl": {"method": "kd", "divergence": "akl"},
    "atkd": {"method": "atkd", "divergence": "fkl"},
    "seqkd": {"method": "seqkd", "train_data": "bench_teacher_samples"},
    "imitkd": {"method": "imitkd", "method_args": {"max_new_tokens": 24}},
    "gkd": {"method": "gkd", "method_args": {"max_new_tokens": 24}},
    "minillm": {"method": "minillm", "method_args": {"max_new_tokens": 24}},
    "distillm": {"method": "distillm", "method_args": {"max_new_tokens": 24}},
    "okd": {"method": "okd"},
    "intermediate": {"method": "intermediate"},
    "progressive": {"method": "progressive"},
}
TRANSFER = {"bench_teacher_samples": {"source": "teacher", "n_samples": 1, "max_new_tokens": 24}}


def build_overrides(base, labels: list[str], seeds: list[int], run_dir: str, epochs: float | None,
                    eval_limit: int | None, sample_seeds: list[int] | None) -> dict:
    template = base.students["sft"].model_dump(mode="json", include={"model", "training"})
    if epochs is not None:  # epochs instead of params.yaml's max_steps
        template["training"].update(epochs=epochs, max_steps=-1)
    students = {}
    for label in labels:
        for seed in seeds:
            body = {"teacher": base.teacher.name, "train_data": "train", **template, **METHODS[label]}
            body["training"] = {**template["training"], "seed": seed}
            students[f"{label}-s{seed}"] = body
    overrides = {"run_dir": run_dir, "students": students, "transfer_sets": TRANSFER,
                 "data.eval_sets": {}, "evaluation.eval_sets": ["test"],
                 "evaluation.exaccerr_prompts": 0}  # not in the table; the default pipeline reports it
    if eval_limit is not None:
        overrides["evaluation.limit"] = eval_limit
    if sample_seeds is not None:
        overrides["evaluation.sample_seeds"] = sample_seeds
    return overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--run-dir", default="runs/bench-methods")
    ap.add_argument("--out", default="docs/benchmarks_methods.md")
    ap.add_argument("--student-epochs", type=float, default=None, help="override the students' epochs")
    ap.add_argument("--eval-limit", type=int, default=None, help="override evaluation.limit (test prompts)")
    ap.add_argument("--sample-seeds", type=int, nargs="+", default=None, help="override evaluation.sample_seeds")
    args = ap.parse_args()

    base = load_config(args.params)
    cfg = load_config(args.params, build_overrides(base, args.methods, args.seeds, args.run_dir, args.student_epochs,
                                                   args.eval_limit, args.sample_seeds))
    paths = RunPaths.of(cfg)
    start = time.perf_counter()
    if not (paths.data / "report.json").is_file():
        run_stage("prepare", cfg)
    if not paths.model(cfg.teacher.name).is_dir():
        run_stage("train_teacher", cfg)
    if "seqkd" in args.methods and not paths.split("bench_teacher_samples").is_file():
        run_stage("transfer", cfg, "bench_teacher_samples")
    if not paths.metrics(cfg.teacher.name).is_file():
        run_stage("evaluate", cfg, cfg.teacher.name)
    teacher = json.loads(paths.metrics(cfg.teacher.name).read_text())
    results: dict[str, list[dict]] = {}
    for name in cfg.chain_order():  # finished students are reused: the script can be stopped and restarted
        if not paths.metrics(name).is_file():
            run_stage("distill", cfg, name)
            run_stage("finetune", cfg, name)
            run_stage("evaluate", cfg, name)
        info = json.loads(paths.train_info(name).read_text())
        metrics = json.loads(paths.metrics(name).read_text())
        results.setdefault(name.rsplit("-s", 1)[0], []).append({**metrics, "train_time_s": info["train_time_s"]})
        write_table(args, cfg, results, teacher, time.perf_counter() - start)  # partial tables survive a stop


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def write_table(args, cfg, results: dict[str, list[dict]], teacher: dict, wall: float) -> None:
    lines = [
        "# Every method on the built-in data",
        "",
        f"Generated by `python bench/methods.py --seeds {' '.join(map(str, args.seeds))}"
        f"{f' --student-epochs {args.student_epochs:g}' if args.student_epochs else ''}"
        f"{f' --eval-limit {args.eval_limit}' if args.eval_limit else ''}"
        f"{' --sample-seeds ' + ' '.join(map(str, args.sample_seeds)) if args.sample_seeds else ''}` on "
        f"{platform.machine()} ({platform.processor() or 'cpu'}), wall time {wall / 60:.1f} min. Teacher and "
        f"student sizes as in `{args.params}` (teacher {teacher['parameters']:,} parameters); every method with its "
        f"defaults, untuned. Test split (first {cfg.evaluation.limit} prompts), sampling at T=1 with evaluation seeds "
        f"{cfg.evaluation.sample_seeds} (their mean per student), and greedy; mean ± std over training seeds "
        f"{args.seeds}.",
        "",
        f"Teacher: ROUGE-L {teacher['test/rougeL_sampled_mean']:.2f}, exact match {teacher['test/exact_match_sampled_mean']:.1f}%.",
        "",
        "| method | ROUGE-L (T=1) | exact match % (T=1) | ROUGE-L greedy | top-1 agreement | train s |",
        "|---|---|---|---|---|---|",
    ]
    for label, runs in results.items():
        def col(key: str) -> list[float]:
            return [r[key] for r in runs if key in r]
        agree = col("test/top1_agreement")
        lines.append(f"| {label} | {_ms(col('test/rougeL_sampled_mean'))} | {_ms(col('test/exact_match_sampled_mean'))} | "
                     f"{_ms(col('test/rougeL_greedy'))} | {_ms(agree) if agree else '–'} | {_ms(col('train_time_s'))} |")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
