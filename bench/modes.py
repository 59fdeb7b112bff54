"""Mode-seeking against mean-seeking on the several-answer task: which valid answers each student samples.

    python bench/modes.py --run-dirs runs/bench-methods [more run folders] [--labels sft kd-fkl kd-rkl kd-jsd]
                          [--seeds 0 1 2] [--samples 40] [--out docs/benchmarks_modes.md]

The built-in generator's brainstorming family (`kd_core.data.builtin.families`) asks for one item of a list
("name a color.", "give a fruit and an instrument.", ...: 32 instructions); every item of the list is a valid
answer, and the training references are drawn with weights 1/(rank + 1), so the answer distribution is known
exactly and has a clear mode (37 % for a list of 8). The students of `bench/methods.py` (found by name in the
given run folders: `<label>-s<seed>`, and the teacher) sample `--samples` answers per instruction at T = 1,
top-p 1 (the evaluation's sampler, `kd_core.generation.generate`). Per model, averaged over the instructions:

- valid: share of the samples that are valid answers (lower-cased, a final period dropped);
- coverage: distinct valid answers sampled / valid answers of the instruction;
- mode share: share of the samples equal to the instruction's mode (the reference distribution's: p = 0.37 for
  single items, 0.14 for combinations);
- TV: total-variation distance between the sampled answers and the reference distribution (invalid answers count
  as mass outside it).

Mean ± std over training seeds; FKL against RKL paired over instructions (seed-averaged, paired bootstrap). The
forward KL (mean-seeking) is expected to spread over the valid answers as the references do, the reverse KL
(mode-seeking) to put more mass on the mode and cover fewer answers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kd_core  # noqa: E402,F401  (offline defaults)
from kd_core.config import load_config  # noqa: E402
from kd_core.data.builtin.families import brainstorm_distributions  # noqa: E402
from kd_core.data.tokenize import encode_prompt, load_tokenizer  # noqa: E402
from kd_core.evaluation.stats import paired_bootstrap  # noqa: E402
from kd_core.generation import generate  # noqa: E402
from kd_core.models.build import load_checkpoint  # noqa: E402


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def scores(samples: list[str], reference: dict[str, float]) -> dict[str, float]:
    """valid, coverage, mode share and TV distance of one instruction's samples (see the module doc)."""
    answers = [normalise(s) for s in samples]
    counts = Counter(answers)
    mode = max(reference, key=reference.get)
    n = len(answers)
    inside = sum(abs(counts.get(a, 0) / n - p) for a, p in reference.items())
    outside = sum(c for a, c in counts.items() if a not in reference) / n
    return {"valid": sum(counts[a] for a in counts if a in reference) / n,
            "coverage": len([a for a in counts if a in reference]) / len(reference),
            "mode": counts.get(mode, 0) / n,
            "tv": 0.5 * (inside + outside)}


def reference_draws(reference: dict[str, float], k: int, repeats: int = 200, seed: int = 0) -> dict[str, float]:
    """The scores of `k` draws from the reference distribution itself, averaged over `repeats` draws: what a
    model that matched the references exactly would score with `k` samples (TV and coverage are not 0 and 1 at
    finite k)."""
    import random

    rng = random.Random(seed)
    answers, weights = list(reference), list(reference.values())
    runs = [scores(rng.choices(answers, weights=weights, k=k), reference) for _ in range(repeats)]
    return {key: statistics.mean(r[key] for r in runs) for key in runs[0]}


def find_model(run_dirs: list[Path], name: str) -> Path:
    for run in run_dirs:
        if (run / "models" / name / "config.json").is_file():
            return run / "models" / name
    raise SystemExit(f"model {name!r} not found under {', '.join(map(str, run_dirs))}")


def sample_model(folder: Path, cfg, instructions: list[str], k: int, seed: int) -> dict[str, list[str]]:
    model, tokenizer = load_checkpoint(folder), load_tokenizer(folder)
    prompts = [encode_prompt({"instruction": i, "context": ""}, tokenizer, cfg.data.template,
                             cfg.tokenizer.max_length) for i in instructions]
    gen = generate(model, tokenizer, [p for p in prompts for _ in range(k)], max_new_tokens=8, do_sample=True,
                   temperature=1.0, top_p=1.0, seed=seed, batch_size=64)
    return {ins: gen.texts[j * k:(j + 1) * k] for j, ins in enumerate(instructions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--run-dirs", type=Path, nargs="+", default=[Path("runs/bench-methods")])
    ap.add_argument("--labels", nargs="+", default=["sft", "kd-fkl", "kd-rkl", "kd-jsd"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=40, help="samples per instruction and model")
    ap.add_argument("--out", default="docs/benchmarks_modes.md")
    args = ap.parse_args()
    cfg = load_config(args.params)
    references = brainstorm_distributions()
    instructions = sorted(references)
    floor = {i: reference_draws(references[i], args.samples, seed=cfg.seed) for i in instructions}

    per_model: dict[str, dict[str, dict[str, float]]] = {}  # model -> instruction -> scores
    models = ["teacher"] + [f"{label}-s{s}" for label in args.labels for s in args.seeds]
    for name in models:
        samples = sample_model(find_model(args.run_dirs, name), cfg, instructions, args.samples, seed=cfg.seed)
        per_model[name] = {i: scores(samples[i], references[i]) for i in instructions}
        print(f"{name}: " + ", ".join(f"{k} {statistics.mean(s[k] for s in per_model[name].values()):.3f}"
                                      for k in ("valid", "coverage", "mode", "tv")), flush=True)

    def model_mean(name: str, key: str) -> float:
        return statistics.mean(per_model[name][i][key] for i in instructions)

    def seed_avg(label: str, key: str) -> list[float]:
        return [statistics.mean(per_model[f"{label}-s{s}"][i][key] for s in args.seeds) for i in instructions]

    def cell(label: str, key: str) -> str:
        values = [model_mean(f"{label}-s{s}", key) for s in args.seeds]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    load = os.getloadavg()
    lines = ["# Mode-seeking against mean-seeking: the several-answer task", "",
             f"Generated by `python bench/modes.py --samples {args.samples} --seeds {' '.join(map(str, args.seeds))}` "
             f"(load average at the end {load[0]:.1f}). {len(instructions)} brainstorming instructions of the "
             f"built-in generator, {args.samples} samples each at T = 1, top-p 1, per model; the students of "
             "docs/benchmarks_methods.md (1200 steps, training seeds as below). Reference distribution: the "
             "generator's, weights 1/(rank + 1) (the mode: p = 0.37 for one item of 8, 0.14 for a combination). "
             "Mean ± std over training seeds. The second row is what a model matching the references exactly "
             f"scores with {args.samples} samples (finite-sample coverage and TV).", "",
             "| model | valid | coverage | mode share | TV to the references |", "|---|---|---|---|---|",
             f"| references (exact) | 1.000 | 1.000 | {statistics.mean(max(references[i].values()) for i in instructions):.3f} "
             "| 0 |",
             f"| {args.samples} draws from the references | " + " | ".join(
                 f"{statistics.mean(floor[i][k] for i in instructions):.3f}" for k in ("valid", "coverage", "mode", "tv"))
             + " |",
             f"| teacher | {model_mean('teacher', 'valid'):.3f} | {model_mean('teacher', 'coverage'):.3f} | "
             f"{model_mean('teacher', 'mode'):.3f} | {model_mean('teacher', 'tv'):.3f} |"]
    for label in args.labels:
        lines.append(f"| {label} | " + " | ".join(cell(label, k) for k in ("valid", "coverage", "mode", "tv")) + " |")
    if {"kd-fkl", "kd-rkl"} <= set(args.labels):
        lines += ["", "RKL against FKL, paired over the instructions (seed-averaged; paired bootstrap, Δ = RKL − FKL):", ""]
        for key, what in (("valid", "valid"), ("coverage", "coverage"), ("mode", "mode share"), ("tv", "TV")):
            res = paired_bootstrap(seed_avg("kd-fkl", key), seed_avg("kd-rkl", key), seed=cfg.seed)
            p = "< 0.001" if res["p_value"] < 0.001 else f"{res['p_value']:.3f}"
            lines.append(f"- {what}: {res['mean_diff']:+.3f} [{res['ci_low']:+.3f}, {res['ci_high']:+.3f}], p {p}")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
