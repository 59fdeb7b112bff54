"""Every distillation method at the SFT baseline's convergence budget, 3 training seeds, each paired against SFT.

    python bench/methods.py --converge 150 300 600 1200       # step 1: the SFT baseline's convergence budget
    python bench/methods.py --steps N [--seeds 0 1 2] [--methods sft kd-fkl ...] [--out docs/benchmarks_methods.md]

The default scenario of params.yaml (its data, unlabeled pool, teacher and transfer set `augmented`); every
student is params.yaml's `sft` student (model, batch, schedule) with one method's defaults, untuned, trained for
the same `--steps` optimizer steps on the labeled rows (`train`; SeqKD on the transfer set: the teacher's answers
are its method). Runs the real stage functions in one process under `runs/bench-methods` (the teacher is trained
once; finished students are reused, so the script resumes where it stopped) and evaluates on the pinned set (500
fixed prompts, 5 sampling seeds at T = 1, and greedy).

Convergence (`--converge B1 B2 ...`, budgets doubling): SFT (seed 0) is trained for each budget with its own cosine
schedule; the criterion is the smallest budget whose doubling lowers the validation loss by less than 5 %
(`converged_budget`). The method table then uses that budget for every method.

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
from kd_core.pipeline.one_stage import run_stage

EVAL_SET = "pinned"
# label -> student settings on top of params.yaml's `sft` student (model and training)
METHODS: dict[str, dict] = {  # in the order they run (the table fills as they finish): the seeds' claims first
    "sft": {"method": "sft"},
    "kd-fkl": {"method": "kd", "divergence": "fkl"},
    "kd-rkl": {"method": "kd", "divergence": "rkl"},
    "seqkd": {"method": "seqkd", "train_data": "augmented"},
    "kd-jsd": {"method": "kd", "divergence": "jsd", "divergence_args": {"beta": 0.5}},
    "gkd": {"method": "gkd", "method_args": {"max_new_tokens": 8}},
    "okd": {"method": "okd"},
    "atkd": {"method": "atkd", "divergence": "fkl"},
    "imitkd": {"method": "imitkd", "method_args": {"max_new_tokens": 8}},
    "minillm": {"method": "minillm", "method_args": {"max_new_tokens": 8}},
    "distillm": {"method": "distillm", "method_args": {"max_new_tokens": 8}},
    "kd-tvd": {"method": "kd", "divergence": "tvd"},
    "kd-skl": {"method": "kd", "divergence": "skl"},
    "kd-srkl": {"method": "kd", "divergence": "srkl"},
    "kd-akl": {"method": "kd", "divergence": "akl"},
    "intermediate": {"method": "intermediate"},
    "progressive": {"method": "progressive"},
    "kd-abkd": {"method": "kd", "divergence": "abkd"},
    "sampled_rkl": {"method": "sampled_rkl", "method_args": {"max_new_tokens": 8}},
    "entropy_aware_opd": {"method": "entropy_aware_opd", "method_args": {"max_new_tokens": 8}},
    "speculative_kd": {"method": "speculative_kd", "method_args": {"max_new_tokens": 8}},
    "uld": {"method": "uld"},  # cross-tokenizer methods, here with the shared tokenizer
    "gold": {"method": "gold"},
}


def student(base, label: str, seed: int, steps: int) -> dict:
    template = base.students["sft"].model_dump(mode="json", include={"model", "training"})
    body = {"teacher": base.teacher.name, "train_data": "train", **template, **METHODS[label]}
    body["training"] = {**template["training"], "seed": seed, "max_steps": steps}
    return body


# a teacher-assistant chain at a large capacity gap: a student of 1 layer x 64 (0.15M against the teacher's 3.58M)
# distilled directly, and through the method table's kd-fkl student of the same seed (2 x 128) as the assistant
SMALL_MODEL = {"config": {"arch": "gpt2", "n_layer": 1, "hidden": 64, "n_head": 2}}
CHAIN = {"small-sft": ("sft", None), "small-direct": ("kd-fkl", None), "small-via-ta": ("kd-fkl", "kd-fkl")}


def chain_students(base, seeds: list[int], steps: int) -> dict:
    out = {}
    for label, (method, assistant) in CHAIN.items():
        for seed in seeds:
            body = student(base, method, seed, steps) | {"model": SMALL_MODEL}
            if assistant:
                body["teacher"] = f"{assistant}-s{seed}"
            out[f"{label}-s{seed}"] = body
    return out


def config(args, students: dict, exaccerr: bool = True):
    overrides = {"run_dir": args.run_dir, "students": students, "evaluation.eval_sets": [EVAL_SET]}
    if not exaccerr:  # the convergence sweep reads validation loss only
        overrides["evaluation.exaccerr_prompts"] = 0
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


GAIN = 0.05  # convergence: the next (larger) budget lowers the validation loss by less than this share


def converged_budget(val_loss: dict[int, float]) -> int:
    """The smallest budget b whose next budget in the sweep lowers the validation loss by less than `GAIN`
    (relative); the largest budget when every step still gains more (then the sweep should be extended)."""
    budgets = sorted(val_loss)
    for b, nxt in zip(budgets, budgets[1:]):
        if val_loss[b] - val_loss[nxt] < GAIN * val_loss[b]:
            return b
    return budgets[-1]


def converge(args) -> None:
    base = load_config(args.params)
    students = {f"sft-steps{b}": student(base, "sft", 0, b) for b in args.converge}
    cfg = config(args, students, exaccerr=False)
    paths = RunPaths.of(cfg)
    train_and_evaluate(cfg, paths, list(students))
    losses = {b: json.loads(paths.metrics(f"sft-steps{b}").read_text())["val/loss"] for b in args.converge}
    rouge = {b: json.loads(paths.metrics(f"sft-steps{b}").read_text())[f"{EVAL_SET}/rougeL_sampled_mean"]
             for b in args.converge}
    chosen = converged_budget(losses)
    for b in args.converge:
        print(f"SFT {b:>5} steps: val loss {losses[b]:.4f}  {EVAL_SET} ROUGE-L (T=1) {rouge[b]:.2f}"
              f"{'  <- converged' if b == chosen else ''}")
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
    ap.add_argument("--no-chain", dest="chain", action="store_false", help="skip the teacher-assistant chain")
    ap.add_argument("--run-dir", default="runs/bench-methods")
    ap.add_argument("--out", default="docs/benchmarks_methods.md")
    ap.add_argument("--no-sft", action="store_true", help="train no SFT student (another bench process does)")
    ap.add_argument("--table-only", action="store_true", help="write the table of the finished students, train nothing")
    ap.add_argument("--merge-from", type=Path, nargs="*", default=[],
                    help="run folders of other processes of this bench (another checkout, same params and "
                         "teacher): their finished students are copied in first")
    args = ap.parse_args()
    if args.converge:
        converge(args)
        return
    if args.steps is None:
        ap.error("--steps N (run --converge first to find N)")
    # SFT first (every paired test needs it), unless --no-sft: another process of the bench trains it (--merge-from)
    labels = ([] if args.no_sft else ["sft"]) + [m for m in args.methods if m != "sft"]
    base = load_config(args.params)
    students = {f"{label}-s{seed}": student(base, label, seed, args.steps) for label in labels for seed in args.seeds}
    chain = args.chain and "kd-fkl" in labels
    if chain:
        students |= chain_students(base, args.seeds, args.steps)
    cfg = config(args, students)
    paths = RunPaths.of(cfg)
    start = time.perf_counter()
    for other in args.merge_from:
        merge(RunPaths(other), paths, list(students))
    if args.table_only:
        done = [g for g in labels + (list(CHAIN) if chain else [])
                if all(paths.metrics(f"{g}-s{s}").is_file() for s in args.seeds)]
        write_table(args, cfg, paths, done, None)
        return
    first = labels.index("okd") + 1 if "okd" in labels else len(labels)  # the chain after the claims' methods
    groups = labels[:first] + (list(CHAIN) if chain else []) + labels[first:]
    for k, label in enumerate(groups):  # one method (all seeds) at a time, the table rewritten after each
        train_and_evaluate(cfg, paths, [f"{label}-s{seed}" for seed in args.seeds])
        if all(paths.metrics(f"sft-s{s}").is_file() for s in args.seeds):  # every paired test needs SFT
            write_table(args, cfg, paths, groups[:k + 1], time.perf_counter() - start)


def merge(other: RunPaths, paths: RunPaths, names: list[str]) -> None:
    """Copy the students of `names` that `other` finished (model, training info, metrics, generations) and this
    run folder lacks: several processes of the bench, each in its own checkout, make one table."""
    import shutil

    for name in names:
        if paths.metrics(name).is_file() or not other.metrics(name).is_file():
            continue
        for src, dst in ((other.model(name), paths.model(name)), (other.generations(name), paths.generations(name))):
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
        for src, dst in ((other.train_info(name), paths.train_info(name)), (other.metrics(name), paths.metrics(name))):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)  # metrics last: its presence marks the student finished


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


def _delta(paths: RunPaths, args, cfg, base: str, other: str) -> str:
    """`other` against `base` (labels), paired over prompts on seed-averaged scores: Δ [95% CI], p."""
    res = _paired(_mean_scores(paths, [f"{base}-s{s}" for s in args.seeds]),
                  _mean_scores(paths, [f"{other}-s{s}" for s in args.seeds]), cfg.seed)
    p = "< 0.001" if res["p_value"] < 0.001 else f"{res['p_value']:.3f}"
    return f"{res['mean_diff']:+.2f} [{res['ci_low']:+.2f}, {res['ci_high']:+.2f}], p {p} (MDE {res['mde']:.2f})"


def _runs(paths: RunPaths, args, label: str) -> list[dict]:
    names = [f"{label}-s{s}" for s in args.seeds]
    return [json.loads(paths.metrics(n).read_text()) | json.loads(paths.train_info(n).read_text()) for n in names]


def _col(runs: list[dict], k: str, fmt: str = "{:.2f}") -> str:
    values = [r[k] for r in runs if k in r]
    return _ms(values, fmt) if values else "–"


def claims(args, cfg, paths: RunPaths, done: list[str]) -> list[str]:
    """The seeds' claims measured on the same students (each where its students are done)."""
    key = f"{EVAL_SET}/rougeL_sampled_mean"
    out = ["", "## The seeds' claims on these students", ""]
    if {"kd-fkl", "kd-rkl"} <= set(done):
        out += ["### Mode-seeking (RKL) against mean-seeking (FKL)", "",
                f"Diversity of the first sampling seed's answers on the {EVAL_SET} set (distinct-n: share of distinct "
                "n-grams; self-BLEU over 200 answers: higher = more alike) and the teacher-forced KL(teacher ‖ student) "
                "on the test split; mean ± std over training seeds.", "",
                "| method | ROUGE-L (T=1) | distinct-1 | distinct-2 | self-BLEU | KL(t‖s) | val ppl |", "|---|---|---|---|---|---|---|"]
        for label in [m for m in ("sft", "kd-fkl", "kd-rkl", "kd-jsd", "kd-tvd") if m in done]:
            r = _runs(paths, args, label)
            out.append(f"| {label} | {_col(r, key)} | {_col(r, f'{EVAL_SET}/distinct_1', '{:.3f}')} | "
                       f"{_col(r, f'{EVAL_SET}/distinct_2', '{:.3f}')} | {_col(r, f'{EVAL_SET}/self_bleu')} | "
                       f"{_col(r, 'test/kl_teacher_student')} | {_col(r, 'val/ppl')} |")
        out += ["", f"RKL against FKL, paired: {_delta(paths, args, cfg, 'kd-fkl', 'kd-rkl')}.", ""]
    exposure = [m for m in ("sft", "kd-fkl", "kd-jsd", "imitkd", "gkd", "minillm", "distillm") if m in done]
    if any(m in done for m in ("imitkd", "gkd", "minillm", "distillm")):
        lengths = cfg.evaluation.exaccerr_lengths
        out += ["### Exposure bias: ExAccErr, off-policy against on-policy students", "",
                f"ExAccErr(l) (OKD paper eqs. 5–7, %) on {cfg.evaluation.exaccerr_prompts} test prompts × "
                f"{cfg.evaluation.exaccerr_samples} sampled prefixes, mean ± std over training seeds (lower = less "
                "error accumulated from the student's own prefixes). The built-in answers are short (p95 7 tokens), "
                "so the long-answer regime of the claim is not reached here.", "",
                "| method | policy | " + " | ".join(f"ExAccErr({n}) %" for n in lengths) + " |",
                "|---|---|" + "---|" * len(lengths)]
        for label in exposure:
            r = _runs(paths, args, label)
            policy = "on" if label in ("imitkd", "gkd", "minillm", "distillm") else "off"
            out.append(f"| {label} | {policy} | " + " | ".join(_col(r, f"test/exaccerr_l{n}") for n in lengths) + " |")
        out.append("")
    unc = [m for m in ("sft", "kd-fkl", "atkd", "okd") if m in done]
    if len(unc) > 1:
        n = cfg.evaluation.unc_buckets
        out += ["### Teacher-uncertainty buckets (OKD paper Figs. 2 and 5)", "",
                f"Top-1 agreement with the teacher on the test split's response tokens, in {n} buckets of the "
                "teacher's UNC (bucket 0: the most certain tokens), mean ± std over training seeds.", "",
                "| method | " + " | ".join(f"bucket {i}" for i in range(n)) + " |", "|---|" + "---|" * n]
        for label in unc:
            r = _runs(paths, args, label)
            out.append(f"| {label} | " + " | ".join(_col(r, f"test/unc_bucket{i}_top1_agreement", "{:.3f}")
                                                  for i in range(n)) + " |")
        out.append("")
    if {"kd-fkl", "okd"} <= set(done):
        out += ["### OKD against FKD (forward-KL KD)", "",
                f"OKD against `kd-fkl`, paired on the {EVAL_SET} set: {_delta(paths, args, cfg, 'kd-fkl', 'okd')}.", ""]
    if set(CHAIN) <= set(done):
        out += ["### A teacher-assistant chain at a large capacity gap", "",
                f"A {SMALL_MODEL['config']['n_layer']}-layer × {SMALL_MODEL['config']['hidden']} student "
                f"({_runs(paths, args, 'small-sft')[0]['parameters']:,} parameters) trained by forward KL directly from "
                "the teacher, or from the `kd-fkl` student of the same seed (the assistant), same steps.", "",
                "| student | ROUGE-L (T=1) | ROUGE-L greedy | val ppl |", "|---|---|---|---|"]
        for label in CHAIN:
            r = _runs(paths, args, label)
            out.append(f"| {label} | {_col(r, key)} | {_col(r, f'{EVAL_SET}/rougeL_greedy')} | {_col(r, 'val/ppl')} |")
        out += ["", f"Via the assistant against direct, paired: {_delta(paths, args, cfg, 'small-direct', 'small-via-ta')}; "
                f"direct against SFT of the same size: {_delta(paths, args, cfg, 'small-sft', 'small-direct')}.", ""]
    return out


def write_table(args, cfg, paths: RunPaths, done: list[str], wall: float | None) -> None:
    teacher = json.loads(paths.metrics(cfg.teacher.name).read_text())
    key = f"{EVAL_SET}/rougeL_sampled_mean"
    sft_mean = _mean_scores(paths, [f"sft-s{s}" for s in args.seeds])
    conv = Path(args.run_dir) / "convergence.json"
    conv_line = ""
    if conv.is_file():
        c = json.loads(conv.read_text())
        conv_line = ("Convergence budget (`--converge`): SFT (seed 0) validation loss " + ", ".join(
            f"{v:.4f} at {b} steps" for b, v in c["val_loss"].items()) + "; ROUGE-L (T=1) " + ", ".join(
            f"{v:.2f}" for v in c["rougeL"].values()) + f"; the criterion (the smallest budget whose doubling lowers the "
            f"validation loss by less than {GAIN:.0%}) gives {c['chosen']} steps.")
    sft = cfg.students[f"sft-s{args.seeds[0]}"]  # the template every student shares (model, batch)
    load = os.getloadavg()
    lines = [
        "# Every method at the SFT baseline's convergence budget, 3 training seeds, paired against SFT", "",
        f"Generated by `python bench/methods.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}` "
        f"on {platform.machine()}, 2 cores, fp32, one torch thread; "
        + (f"wall time {wall / 60:.1f} min" if wall is not None else "students trained by several processes of the "
           "bench (`--merge-from`), the table assembled from them (`--table-only`)") + ", load average at the "
        f"end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs shared the machine: `train s` is an upper bound "
        "and comparable only within this table).", "",
        f"Scenario: params.yaml's default (teacher {teacher['parameters']:,} parameters, {cfg.teacher.training.max_steps} "
        f"steps); every student is its `sft` student ({sft.model.config}), batch "
        f"{sft.training.batch_size}, **{args.steps} steps**, one method's defaults, untuned, on the "
        "labeled rows (SeqKD: labeled rows + the teacher's answers to the unlabeled prompts). " + conv_line, "",
        f"Evaluation: the pinned set ({cfg.data.eval_sets[EVAL_SET].limit} fixed prompts), ROUGE-L sampled at T = 1, "
        f"top-p 1, seeds {cfg.evaluation.sample_seeds} (mean per prompt), and greedy; ± = std over training seeds "
        f"{args.seeds}. Δ vs SFT: paired bootstrap over prompts of the per-prompt ROUGE-L averaged over sampling and "
        "training seeds (bold: p < 0.05); MDE = the difference this test detects with 80 % power at α = 0.05; "
        "seeds > = training seeds whose own paired difference (seed s vs SFT seed s) is positive.", "",
        f"Teacher: ROUGE-L (T=1) {teacher[key]:.2f}, greedy {teacher[f'{EVAL_SET}/rougeL_greedy']:.2f}.", "",
        "| method | ROUGE-L (T=1) | ROUGE-L greedy | EM % (T=1) | val ppl | top-1 agree | Δ vs SFT [95% CI] | p | MDE "
        "| seeds > | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in [d for d in done if d in METHODS]:
        runs = _runs(paths, args, label)
        if label == "sft":
            delta, p, mde, better = "–", "–", "–", "–"
        else:
            res = _paired(sft_mean, _mean_scores(paths, [f"{label}-s{s}" for s in args.seeds]), cfg.seed)
            delta = f"{res['mean_diff']:+.2f} [{res['ci_low']:+.2f}, {res['ci_high']:+.2f}]"
            p = "< 0.001" if res["p_value"] < 0.001 else f"{res['p_value']:.3f}"
            mde = f"{res['mde']:.2f}"
            per_seed = [_paired(_mean_scores(paths, [f"sft-s{s}"]), _mean_scores(paths, [f"{label}-s{s}"]), cfg.seed)
                        for s in args.seeds]
            better = f"{sum(r['mean_diff'] > 0 for r in per_seed)}/{len(per_seed)}"
            if res["p_value"] < 0.05:
                delta, p = f"**{delta}**", f"**{p}**"
        lines.append(f"| {label} | {_col(runs, key)} | {_col(runs, f'{EVAL_SET}/rougeL_greedy')} | "
                     f"{_col(runs, f'{EVAL_SET}/exact_match_sampled_mean', '{:.1f}')} | {_col(runs, 'val/ppl')} | "
                     f"{_col(runs, 'test/top1_agreement', '{:.3f}')} | {delta} | {p} | {mde} | {better} | "
                     f"{_col(runs, 'train_time_s', '{:.0f}')} |")
    lines += claims(args, cfg, paths, done)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
