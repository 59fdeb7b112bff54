"""Comparison across the MLflow registry: a table of registered versions (teacher and students; a teacher served by
another process, never registered, has its row from its metrics), each KD student against the SFT student of the
same run and size (`sft_baseline`), a section per evaluated set (its metrics, and the paired comparison with the SFT
student on its prompts), a size-versus-quality plot, as markdown, JSON and PNG.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from kd_core.evaluation.plots import plot_unc_buckets, size_quality_plot
from kd_core.evaluation.stats import paired_on_common_ids
from kd_core.io import atomic_dir, read_jsonl, write_json_atomic, write_text_atomic

SET_COLUMNS = [  # (metric key within an eval set, header, format): one eval set's generation metrics
    ("rougeL_sampled_mean", "ROUGE-L (T=1)", "{:.2f}"),
    ("rougeL_greedy", "ROUGE-L greedy", "{:.2f}"),
    ("exact_match_sampled_mean", "EM % (T=1)", "{:.1f}"),
    ("exact_match_greedy", "EM % greedy", "{:.1f}"),
]
RUN_COLUMNS = [  # (metric key, header, format): not tied to an eval set
    ("val/ppl", "val ppl", "{:.2f}"),
    ("test/top1_agreement", "top-1 agree", "{:.3f}"),
    ("train_time_s", "train s", "{:.0f}"),
]


def columns(eval_set: str = "test") -> list[tuple[str, str, str]]:
    """The metric columns of the versions table: `eval_set`'s generation metrics, then the run-wide ones."""
    return [(f"{eval_set}/{key}", header, fmt) for key, header, fmt in SET_COLUMNS] + RUN_COLUMNS


COLUMNS = columns("test")


def format_metric(metrics: dict, key: str, fmt: str, ci: bool = True) -> str:
    """A metric formatted with `fmt`, with its 95% CI when it has one and `ci` (`<base>_ci_low` / `<base>_ci_high`,
    base = the key without a trailing `_mean`: `test/rougeL_sampled_mean`, `test/rougeL_greedy`); "–" when absent."""
    if key not in metrics:
        return "–"
    text = fmt.format(metrics[key])
    if not ci:
        return text
    base = key.removesuffix("_mean")
    lo, hi = f"{base}_ci_low", f"{base}_ci_high"
    if lo in metrics and hi in metrics:
        text += f" [{metrics[lo]:.2f}, {metrics[hi]:.2f}]"
    return text


def labelled(versions: list[dict]) -> list[dict]:
    """The rows of the table, each with its label: `<model> (<registered name> v<version>)` for a registered version,
    `<model> (served)` for a teacher served by another process (`served_teacher_row`)."""
    return [r | {"label": _label(r)} for r in versions]


def _label(row: dict) -> str:
    model = row["tags"].get("kd.model", "?")
    return f"{model} (served)" if row.get("served") else f"{model} ({row['name']} v{row['version']})"


def served_teacher_row(cfg, paths) -> dict | None:
    """The comparison row of the run's teacher when another process serves it (teacher.model.endpoint): never
    registered (its weights are not here), so its row comes from the run folder, `metrics/<teacher>.json` (its
    generation metrics through the endpoint, the evaluate stage's), in the shape of a registered version's row
    (`kd_core.tracking.registry.version_rows`) with no registered name, version or aliases and `served`: the
    endpoint's URL. None for a teacher whose weights are here (its registered version is its row)."""
    name = cfg.teacher.name
    if not cfg.is_served(name):
        return None
    metrics = json.loads(paths.metrics(name).read_text(encoding="utf-8"))
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tags = {"kd.role": "teacher", "kd.model": name, "kd.method": "served", "kd.served_model": metrics["model"]}
    return {"name": None, "version": None, "run_id": None, "tags": tags, "metrics": numbers, "aliases": [],
            "served": metrics["endpoint"]}


def _vs_sft(cfg, rows: list[dict], key: str) -> list[dict]:
    """Each KD student of this run (its params hash) against its SFT baseline (`sft_baseline`; the run's last SFT
    version when the baseline has none with `key`)."""
    params_hash = cfg.fingerprint()
    same = [r for r in rows if r["tags"].get("kd.params_hash") == params_hash and r["tags"].get("kd.role") != "teacher"]
    sfts = [r for r in same if r["tags"].get("kd.method") == "sft" and key in r["metrics"]]
    if not sfts:
        return []
    out = []
    for r in same:
        if r in sfts or key not in r["metrics"]:
            continue
        baseline = sft_baseline(cfg, r["tags"].get("kd.model", ""))
        sft = next((b for b in reversed(sfts) if b["tags"].get("kd.model") == baseline), sfts[-1])
        out.append({"model": r["tags"].get("kd.model"), "method": r["tags"].get("kd.method"),
                    "divergence": r["tags"].get("kd.divergence"), "value": r["metrics"][key],
                    "sft": sft["metrics"][key], "delta": r["metrics"][key] - sft["metrics"][key]})
    return out


# the console's table after `kd run` / `kd compare` (within 120 columns): the champion set's sampled ROUGE-L with its
# CI, its greedy ROUGE-L and sampled exact match, perplexity and agreement; the report has every column
CONSOLE_SET_COLUMNS = [("rougeL_sampled_mean", "ROUGE-L T=1 [95% CI]", "{:.2f}"), ("rougeL_greedy", "greedy", "{:.2f}"),
                       ("exact_match_sampled_mean", "EM % T=1", "{:.1f}")]
CONSOLE_RUN_COLUMNS = [("val/ppl", "val ppl", "{:.1f}"), ("test/top1_agreement", "top-1", "{:.2f}")]


def _parameters(tags: dict) -> str:
    """`3.6M`, `612k` from the `kd.parameters` tag (as it is when not a number)."""
    text = tags.get("kd.parameters", "")
    if not text.isdigit():
        return text
    for scale, suffix, fmt in ((1e9, "B", "{:.1f}"), (1e6, "M", "{:.1f}"), (1e3, "k", "{:.0f}")):
        if int(text) >= scale:
            return fmt.format(int(text) / scale) + suffix
    return text


def table(rows: list[dict], *, console: bool = False, eval_set: str = "test") -> tuple[list[str], list[list[str]]]:
    """Header and cells of the registered-versions table, one row per version: model, role, method (divergence),
    parameters, the metrics of `columns(eval_set)` (`format_metric`) and the aliases. `console`: the short form
    printed after a run (`<model> v<version>`, no role, parameters in k/M/B, the `CONSOLE_*` metrics only: the
    CI of the sampled ROUGE-L alone)."""
    if console:
        cols = [(f"{eval_set}/{key}", header, fmt) for key, header, fmt in CONSOLE_SET_COLUMNS] + CONSOLE_RUN_COLUMNS
    else:
        cols = columns(eval_set)
    header = ["model"] + ([] if console else ["role"]) + ["method", "params"] + [h for _, h, _ in cols] + ["aliases"]
    cells = []
    for r in rows:
        t = r["tags"]
        method = t.get("kd.method", "")
        if t.get("kd.divergence"):
            method += f" ({t['kd.divergence']})"
        if console:
            name = r["label"] if r.get("served") else f"{t.get('kd.model', '?')} v{r['version']}"
            row = [name, method, _parameters(t)]
            metrics = [format_metric(r["metrics"], k, f, ci=k.endswith("rougeL_sampled_mean")) for k, _, f in cols]
        else:
            row = [r["label"], t.get("kd.role", ""), method, t.get("kd.parameters", "")]
            metrics = [format_metric(r["metrics"], k, f) for k, _, f in cols]
        cells.append(row + metrics + [", ".join(r["aliases"])])
    return header, cells


def _markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def markdown_table(rows: list[dict], eval_set: str = "test") -> str:
    return _markdown(*table(rows, eval_set=eval_set))


def set_table(rows: list[dict], eval_set: str) -> str:
    """One eval set's generation metrics, one row per version evaluated on it (markdown)."""
    keys = [(f"{eval_set}/{k}", h, f) for k, h, f in SET_COLUMNS] + answer_columns(rows, eval_set)
    header = ["model"] + [h for _, h, _ in keys]
    cells = [[r["label"]] + [format_metric(r["metrics"], k, f) for k, _, f in keys]
             for r in rows if any(k in r["metrics"] for k, _, _ in keys)]
    return _markdown(header, cells) if cells else "(no registered version was evaluated on this set)"


def answer_columns(rows: list[dict], eval_set: str) -> list[tuple[str, str, str]]:
    """The answer-checking columns of an eval set with an answer rule (evaluation.answers), those some version
    has: answer match sampled and greedy, pass@k by k."""
    present = {k for r in rows for k in r["metrics"] if k.startswith(f"{eval_set}/")}
    ks = sorted(int(m[1]) for k in present if (m := re.fullmatch(rf"{re.escape(eval_set)}/pass_at_(\d+)", k)))
    cols = [("answer_match_sampled_mean", "answer % (T=1)", "{:.1f}"), ("answer_match_greedy", "answer % greedy",
                                                                       "{:.1f}")]
    cols += [(f"pass_at_{k}", f"pass@{k}", "{:.1f}") for k in ks]
    return [(f"{eval_set}/{k}", h, f) for k, h, f in cols if f"{eval_set}/{k}" in present]


def prompt_scores(path, key: str = "rougeL_sampled_mean") -> dict:
    """{prompt id: score} from an evaluation's per-prompt file (`generations/<model>/<set>.jsonl`); a
    prompt without the score maps to None."""
    return {r["id"]: r.get(key) for r in read_jsonl(path)}


def sft_baseline(cfg, name: str) -> str | None:
    """The SFT student that model `name` is compared with: the SFT student of the same model settings (the same
    architecture and size, e.g. the same `from_teacher_layers`) when there is one, else the first SFT student; None
    when the run has no SFT student."""
    sfts = [s for s in cfg.students.values() if s.method == "sft"]
    student = cfg.students.get(name)
    candidates = [s for s in sfts if student is not None and s.model == student.model] or sfts
    return candidates[0].name if candidates else None


def paired_vs_sft(cfg, paths, set_name: str = "test") -> list[dict]:
    """Each model of this run against its SFT baseline (`sft_baseline`) on the same prompts (paired bootstrap over
    prompts of the per-prompt ROUGE-L averaged over sampling seeds): mean difference, 95% CI, p-value."""
    out, baselines = [], {}  # (each baseline's per-prompt file read once)
    for name in [cfg.teacher.name, *cfg.students]:
        sft = sft_baseline(cfg, name)
        f, base = paths.generations(name) / f"{set_name}.jsonl", paths.generations(sft or "") / f"{set_name}.jsonl"
        if sft is None or name == sft or not f.is_file() or not base.is_file():
            continue
        if sft not in baselines:
            baselines[sft] = prompt_scores(base)
        res = paired_on_common_ids(baselines[sft], prompt_scores(f), seed=cfg.seed)
        if res is not None:
            out.append({"model": name, "vs": sft, "n_prompts": res["n"], **res})
    return out


def _unc_plot(cfg, paths, out_dir: Path) -> bool:
    """unc_buckets.png, and unc/<student>.json (one row per bucket) for the DVC plots in dvc.yaml (replaced as a
    whole, so a removed student leaves no stale file behind)."""
    buckets = {}
    for name in cfg.students:
        f = paths.generations(name) / "unc_buckets.json"
        if f.is_file() and (data := json.loads(f.read_text())):
            buckets[name] = data
    if buckets:
        plot_unc_buckets(buckets, out_dir / "unc_buckets.png")
    with atomic_dir(out_dir / "unc") as tmp:
        for name, data in buckets.items():
            write_json_atomic(tmp / f"{name}.json", [{k: b[k] for k in ("bucket", "top1_agreement", "kl", "logit_std")}
                                                     for b in data])
    return bool(buckets)


def detectable(paired: list[dict]) -> float | None:
    """The difference each of these paired comparisons detects at 80 % power, alpha = 0.05: the largest of their
    minimal detectable differences (`stats.min_detectable_difference`); None without comparisons."""
    mdes = [p["mde"] for p in paired if p.get("mde") is not None and math.isfinite(p["mde"])]
    return max(mdes) if mdes else None


def _paired_section(set_name: str, paired: list[dict], mde: float | None) -> list[str]:
    """The paired comparisons of one set as markdown; `mde`: the students' detectable difference (`detectable`)."""
    md = ["", f"## Paired comparison with the SFT student ({set_name} prompts, bootstrap over prompts)", "",
          "Per-prompt ROUGE-L averaged over sampling seeds; Δ = model − SFT; MDE = the difference this many "
          "prompts detect with 80 % power at α = 0.05 (two-sided): (z₀.₉₇₅ + z₀.₈) · SD(paired differences) / "
          "√prompts.", ""]
    if mde is not None:
        md += [f"This run can detect differences of ≥ {mde:.2f} ROUGE-L points against SFT on `{set_name}` "
               f"(the largest MDE of the students below); a smaller true difference is found significant in "
               f"fewer than 80 % of runs.", ""]
    md += ["| model | prompts | Δ ROUGE-L | 95% CI | p-value | MDE |", "|---|---|---|---|---|---|"]
    return md + [f"| {p['model']} | {p['n_prompts']} | {p['mean_diff']:+.2f} | [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}] | "
                 f"{p['p_value']:.3f} | {p['mde']:.2f} |" for p in paired]


def _n_prompts(cfg, paths, set_name: str) -> int | None:
    """How many prompts of the eval set the run's models were evaluated on (the teacher's per-prompt file; a served
    teacher's first student's)."""
    files = [paths.generations(name) / f"{set_name}.jsonl" for name in [cfg.teacher.name, *cfg.students]]
    return next((len(read_jsonl(f)) for f in files if f.is_file()), None)


REFERENCE_KEYS = ("ref_tokens_p50", "ref_tokens_p90", "ref_tokens_p95", "ref_tokens_max", "max_new_tokens")


def reference_lengths(cfg, paths, set_name: str) -> dict:
    """The references' token-length percentiles of an eval set and the new-token budget it was generated with
    ({key: value} of `REFERENCE_KEYS`, from the teacher's metrics, a served teacher's first student's: the same for
    every model of the run)."""
    for name in [cfg.teacher.name, *cfg.students]:
        f = paths.metrics(name)
        metrics = json.loads(f.read_text()) if f.is_file() else {}
        if found := {k: metrics[f"{set_name}/{k}"] for k in REFERENCE_KEYS if f"{set_name}/{k}" in metrics}:
            return found
    return {}


def _reference_line(refs: dict) -> list[str]:
    if len(refs) < len(REFERENCE_KEYS):
        return []
    return ["", f"References: p50 {refs['ref_tokens_p50']:.0f}, p90 {refs['ref_tokens_p90']:.0f}, "
                f"p95 {refs['ref_tokens_p95']:.0f}, max {refs['ref_tokens_max']:.0f} tokens; generated with up to "
                f"{refs['max_new_tokens']:.0f} new tokens."]


def build_report(cfg, paths, versions: list[dict], tracking_uri: str) -> dict:
    """The comparison report (`reports/compare.md` and `.json`, plots): the registered versions on the champion
    metric's eval set, the KD students against the SFT student, then a section per evaluated set (its metrics per
    version and the paired comparison with the SFT student on its prompts). `versions`: the teacher's and the
    students' registered versions (`kd_core.tracking.registry.version_rows`), in the store at `tracking_uri`, and a
    served teacher's row (`served_teacher_row`)."""
    out_dir: Path = paths.reports
    rows = labelled(versions)
    if not any(r["name"] == cfg.tracking.registered_model for r in rows):  # (the teacher's alone: no comparison)
        raise LookupError(f"no registered versions of {cfg.tracking.registered_model!r} at {tracking_uri}")
    key = cfg.tracking.champion.metric
    vs_sft = _vs_sft(cfg, rows, key)
    champion_set = key.split("/", 1)[0]  # the eval set of the champion metric
    main_set = champion_set if champion_set in cfg.evaluation.eval_sets else "test"
    g = cfg.evaluation.generation
    md = ["# Registered models", "", f"Tracking store: `{tracking_uri}`; CI = 95% bootstrap over "
          f"prompts (sampled metrics: per prompt the mean over {len(cfg.evaluation.sample_seeds)} sampling seeds at "
          f"T = {g.temperature:g}, top-p {g.top_p:g}); generation metrics on the `{main_set}` eval set "
          f"(champion metric `{key}`; every evaluated set has its section below).", "",
          markdown_table(rows, main_set), ""]
    if vs_sft:
        md += [f"## KD students vs the SFT student (this run, `{key}`)", "", "| model | method | value | SFT | Δ |",
               "|---|---|---|---|---|"]
        md += [f"| {v['model']} | {v['method']} ({v['divergence']}) | {v['value']:.2f} | {v['sft']:.2f} | {v['delta']:+.2f} |"
               for v in vs_sft]
    by_set: dict[str, dict] = {}
    for set_name in cfg.evaluation.eval_sets:
        n = _n_prompts(cfg, paths, set_name)
        paired = [p | {"set": set_name} for p in paired_vs_sft(cfg, paths, set_name)]
        refs = reference_lengths(cfg, paths, set_name)
        mde = detectable([p for p in paired if p["model"] in cfg.students])
        by_set[set_name] = {"n_prompts": n, "references": refs, "detectable_difference": mde, "paired_vs_sft": paired}
        md += ["", f"## Eval set `{set_name}`" + (f" ({n} prompts)" if n is not None else ""), *_reference_line(refs),
               "", set_table(rows, set_name)]
        if paired:
            md += _paired_section(set_name, paired, mde)
    paired_champion = by_set.get(champion_set, {}).get("paired_vs_sft") or \
        [p | {"set": champion_set} for p in paired_vs_sft(cfg, paths, champion_set)]
    out_dir.mkdir(parents=True, exist_ok=True)
    if _unc_plot(cfg, paths, out_dir):
        md += ["", "## Teacher-uncertainty buckets", "", "![UNC buckets](unc_buckets.png)"]
    md += ["", "![size vs quality](size_vs_quality.png)"]
    write_text_atomic(out_dir / "compare.md", "\n".join(md) + "\n")
    write_json_atomic(out_dir / "compare.json", {"rows": rows, "vs_sft": vs_sft, "paired_vs_sft": paired_champion,
                                                 "metric": key, "paired_set": champion_set, "eval_sets": by_set})
    size_quality_plot(rows, key, out_dir / "size_vs_quality.png")
    # one field name whatever the metric, so dvc.yaml's plot definition does not depend on params
    points = [{"model": r["label"], "parameters": int(r["tags"].get("kd.parameters") or 0),
               "champion_metric": r["metrics"][key], "metric": key}
              for r in rows if key in r["metrics"] and r["tags"].get("kd.parameters")]  # (a served teacher: unknown)
    write_json_atomic(out_dir / "plot_points.json", points)  # DVC plots (dvc.yaml)
    return {"rows": rows, "vs_sft": vs_sft, "paired_vs_sft": paired_champion, "paired_set": champion_set,
            "eval_sets": by_set, "markdown": str(out_dir / "compare.md"), "json": str(out_dir / "compare.json"),
            "plot": str(out_dir / "size_vs_quality.png")}
