"""Every distillation method at the SFT baseline's convergence budget, 3 training seeds, each paired against SFT.

    python bench/methods.py --converge 150 300 600 1200       # step 1: the SFT baseline's convergence budget
    python bench/methods.py --steps N [--seeds 0 1 2] [--methods sft kd-fkl ...] [--out docs/benchmarks_methods.md]

The default scenario of params.yaml (its data, unlabeled pool, teacher and transfer set `augmented`); every
student is params.yaml's `sft` student (model, batch, schedule) with one method's defaults, untuned, trained for
the same `--steps` optimizer steps on the labeled rows (`train`; SeqKD on the transfer set: the teacher's answers
are its method). Runs the real stage functions in one process under `runs/bench-methods` (the teacher is trained
once; finished students are reused, so the script resumes where it stopped) and evaluates on the pinned set (500
fixed prompts, 5 sampling seeds at T = 1, and greedy).

Convergence (`--converge B1 B2 ...`): SFT (seed 0) is trained for each budget with its own cosine schedule; the
criterion is the smallest budget whose validation loss is within 1 % of the lowest of the sweep (further steps
buy < 1 % of loss, or overfit). The method table then uses that budget for every method.

Paired test against SFT: per prompt, each model's ROUGE-L averaged over its 5 sampling seeds and its training
seeds, SFT's likewise; a paired bootstrap over the prompts (`kd_core.evaluation.stats.paired_bootstrap`) gives
the difference, its 95 % CI, p and the minimal detectable difference; "seeds >" counts the training seeds whose own
paired difference (seed s against SFT seed s) is positive.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import kd_core  # noqa: F401  (offline defaults)
from kd_core.config import load_config
from kd_core.evaluation.compare import prompt_scores
from kd_core.evaluation.stats import paired_bootstrap
from kd_core.run import RunPaths
from kd_core.stages import run_stage

EVAL_SET = "pinned"
# label -> student settings on top of params.yaml's `sft` student (model and training)
METHODS: dict[str, dict] = {
    "sft": {"method": "sft"},
    "seqkd": {"method": "seqkd", "train_data": "augmented"},
    "kd-fkl": {"method": "kd", "divergence": "fkl"},
    "kd-rkl": {"method": "kd", "divergence": "rkl"},
    "kd-jsd": {"method": "kd", "divergence": "jsd", "divergence_args": {"beta": 0.5}},
    "kd-tvd": {"method": "kd", "divergence": "tvd"},
    "kd-skl": {"method": "kd", "divergence": "skl"},
    "kd-srkl": {"method": "kd", "divergence": "srkl"},
    "kd-akl": {"method": "kd", "divergence": "akl"},
    "atkd": {"method": "atkd", "divergence": "fkl"},
    "imitkd": {"method": "imitkd", "method_args": {"max_new_tokens": 8}},
    "gkd": {"method": "gkd", "method_args": {"max_new_tokens": 8}},
    "minillm": {"method": "minillm", "method_args": {"max_new_tokens": 8}},
    "distillm": {"method": "distillm", "method_args": {"max_new_tokens": 8}},
    "okd": {"method": "okd"},
    "intermediate": {"method": "intermediate"},
    "progressive": {"method": "progressive"},
}


def student(base, label: str, seed: int, steps: int) -> dict:
    template = base.students["sft"].model_dump(mode="json", include={"model", "training"})
    body = {"teacher": base.teacher.name, "train_data": "train", **template, **METHODS[label]}
    body["training"] = {**template["training"], "seed": seed, "max_steps": steps}
    return body


def config(args, students: dict):
    overrides = {"run_dir": args.run_dir, "students": students, "evaluation.eval_sets": [EVAL_SET],
                 "evaluation.exaccerr_prompts": 0}  # not in the table; the default pipeline reports it
    return load_config(args.params, overrides)


def train_and_evaluate(cfg, paths: RunPaths, names: list[str]) -> None:
    """The shared stages once, then each student not yet evaluated (a stopped run resumes here)."""
    if not (paths.data / "report.json").is_file():
        run_stage("prepare", cfg)
    if not paths.model(cfg.teacher.name).is_dir():
        run_stage("train_teacher", cfg)
    for ts in cfg.transfer_sets:
        if any(cfg.students[n].train_data == ts for n in names) and not paths.split(ts).is_file():
            run_stage("transfer", cfg, ts)
    if not paths.metrics(cfg.teacher.name).is_file():
        run_stage("evaluate", cfg, cfg.teacher.name)
    for name in names:
        if not paths.metrics(name).is_file():
            run_stage("distill", cfg, name)
            run_stage("finetune", cfg, name)
            run_stage("evaluate", cfg, name)


def converge(args) -> None:
    base = load_config(args.params)
    students = {f"sft-steps{b}": student(base, "sft", 0, b) for b in args.converge}
    cfg = config(args, students)
    paths = RunPaths.of(cfg)
    train_and_evaluate(cfg, paths, list(students))
    losses = {b: json.loads(paths.metrics(f"sft-steps{b}").read_text())["val/loss"] for b in args.converge}
    rouge = {b: json.loads(paths.metrics(f"sft-steps{b}").read_text())[f"{EVAL_SET}/rougeL_sampled_mean"]
             for b in args.converge}
    best = min(losses.values())
    chosen = min(b for b, v in losses.items() if v <= 1.01 * best)
    for b in args.converge:
        print(f"SFT {b:>5} steps: val loss {losses[b]:.4f}  {EVAL_SET} ROUGE-L (T=1) {rouge[b]:.2f}"
              f"{'  <- converged (within 1 % of the lowest val loss)' if b == chosen else ''}")
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.run_dir) / "convergence.json").write_text(json.dumps(
        {"budgets": args.converge, "val_loss": losses, "rougeL": rouge, "chosen": chosen}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, help="optimizer steps of every student (the SFT convergence budget)")
    ap.add_argument("--converge", type=int, nargs="+", help="SFT step budgets to find the convergence budget")
    ap.add_argument("--run-dir", default="runs/bench-methods")
    ap.add_argument("--out", default="docs/benchmarks_methods.md")
    args = ap.parse_args()
    if args.converge:
        converge(args)
        return
    if args.steps is None:
        ap.error("--steps N (run --converge first to find N)")
    labels = ["sft"] + [m for m in args.methods if m != "sft"]  # SFT first: every paired test needs it
    base = load_config(args.params)
    students = {f"{label}-s{seed}": student(base, label, seed, args.steps) for label in labels for seed in args.seeds}
    cfg = config(args, students)
    paths = RunPaths.of(cfg)
    start = time.perf_counter()
    for label in labels:  # one method (all seeds) at a time, the table rewritten after each
        train_and_evaluate(cfg, paths, [f"{label}-s{seed}" for seed in args.seeds])
        write_table(args, cfg, paths, labels[:labels.index(label) + 1], time.perf_counter() - start)


def _ms(values: list[float], fmt: str = "{:.2f}") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def _mean_scores(paths: RunPaths, names: list[str]) -> dict:
    """{prompt id: the per-prompt ROUGE-L (T=1, mean over sampling seeds) averaged over the models `names`}."""
    per_model = [prompt_scores(paths.generations(n) / f"{EVAL_SET}.jsonl") for n in names]
    return {i: statistics.mean(s[i] for s in per_model) for i in per_model[0]
            if all(s.get(i) is not None for s in per_model)}


def _paired(a: dict, b: dict, seed: int) -> dict:
    ids = [i for i in a if i in b]
    return paired_bootstrap([a[i] for i in ids], [b[i] for i in ids], seed=seed)


def write_table(args, cfg, paths: RunPaths, labels: list[str], wall: float) -> None:
    teacher = json.loads(paths.metrics(cfg.teacher.name).read_text())
    key = f"{EVAL_SET}/rougeL_sampled_mean"
    sft_names = [f"sft-s{s}" for s in args.seeds]
    sft_mean = _mean_scores(paths, sft_names)
    conv = Path(args.run_dir) / "convergence.json"
    conv_line = ""
    if conv.is_file():
        c = json.loads(conv.read_text())
        conv_line = ("Convergence budget (`--converge`): SFT validation loss " + ", ".join(
            f"{v:.4f} at {b} steps" for b, v in c["val_loss"].items()) + f"; the criterion (smallest budget within 1 % "
            f"of the lowest validation loss) gives {c['chosen']} steps.")
    load = os.getloadavg()
    lines = [
        "# Every method at the SFT baseline's convergence budget, 3 training seeds, paired against SFT", "",
        f"Generated by `python bench/methods.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}` "
        f"on {platform.machine()}, 2 cores, fp32; wall time {wall / 60:.1f} min, load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs shared the machine: `train s` is an upper bound "
        "and comparable only within this table).", "",
        f"Scenario: params.yaml's default (teacher {teacher['parameters']:,} parameters, {cfg.teacher.training.max_steps} "
        f"steps); every student is its `sft` student ({cfg.students['sft-s0'].model.config}), batch "
        f"{cfg.students['sft-s0'].training.batch_size}, **{args.steps} steps**, one method's defaults, untuned, on the "
        "labeled rows (SeqKD: labeled rows + the teacher's answers to the unlabeled prompts). "
        + conv_line, "",
        f"Evaluation: the pinned set ({cfg.data.eval_sets[EVAL_SET].limit} fixed prompts), ROUGE-L sampled at T = 1, "
        f"top-p 1, seeds {cfg.evaluation.sample_seeds} (mean per prompt), and greedy; ± = std over training seeds "
        f"{args.seeds}. Δ vs SFT: paired bootstrap over prompts of the per-prompt ROUGE-L averaged over sampling and "
        "training seeds; MDE = the difference this test detects with 80 % power at α = 0.05; seeds > = training seeds "
        "whose own paired difference (seed s vs SFT seed s) is positive.", "",
        f"Teacher: ROUGE-L (T=1) {teacher[key]:.2f}, greedy {teacher[f'{EVAL_SET}/rougeL_greedy']:.2f}.", "",
        "| method | ROUGE-L (T=1) | ROUGE-L greedy | EM % (T=1) | val ppl | top-1 agree | Δ vs SFT [95% CI] | p | MDE "
        "| seeds > | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        names = [f"{label}-s{s}" for s in args.seeds]
        runs = [json.loads(paths.metrics(n).read_text()) | json.loads(paths.train_info(n).read_text()) for n in names]

        def col(k: str, fmt: str = "{:.2f}") -> str:
            values = [r[k] for r in runs if k in r]
            return _ms(values, fmt) if values else "–"
        if label == "sft":
            delta, p, mde, better = "–", "–", "–", "–"
        else:
            res = _paired(sft_mean, _mean_scores(paths, names), cfg.seed)
            delta = f"{res['mean_diff']:+.2f} [{res['ci_low']:+.2f}, {res['ci_high']:+.2f}]"
            p = "< 0.001" if res["p_value"] < 0.001 else f"{res['p_value']:.3f}"
            mde = f"{res['mde']:.2f}"
            per_seed = [_paired(_mean_scores(paths, [f"sft-s{s}"]), _mean_scores(paths, [f"{label}-s{s}"]), cfg.seed)
                        for s in args.seeds]
            better = f"{sum(r['mean_diff'] > 0 for r in per_seed)}/{len(per_seed)}"
            if res["p_value"] < 0.05:
                delta, p = f"**{delta}**", f"**{p}**"
        lines.append(f"| {label} | {col(key)} | {col(f'{EVAL_SET}/rougeL_greedy')} | "
                     f"{col(f'{EVAL_SET}/exact_match_sampled_mean', '{:.1f}')} | {col('val/ppl')} | "
                     f"{col('test/top1_agreement', '{:.3f}')} | {delta} | {p} | {mde} | {better} | "
                     f"{col('train_time_s', '{:.0f}')} |")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[-len(labels) - 2:]), flush=True)


if __name__ == "__main__":
    main()
