"""Stage `prepare`: load and validate the data, split it, write the unlabeled prompt pool and the named eval sets,
build the run's tokenizer."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from kd_core.config import PipelineConfig
from kd_core.data.builtin import generate_builtin, generate_unlabeled
from kd_core.data.sources import RawRow, check_report, normalize_rows, read_file, read_hub
from kd_core.data.split import split_rows
from kd_core.data.template import chat_template, format_prompt, prompt_key
from kd_core.data.tokenize import encode_rows, load_tokenizer, train_bpe_tokenizer
from kd_core.errors import DataError, ModelError
from kd_core.evaluation.answers import check_references
from kd_core.io import atomic_dir, file_hash, write_json_atomic, write_jsonl_atomic
from kd_core.run import RunPaths, n_positions
from kd_core.tracking import runs

log = logging.getLogger("kd")


def load_main_rows(cfg: PipelineConfig):
    """The main data's valid rows (normalised, first `data.max_rows`) and its validation report."""
    d = cfg.data
    if d.source == "builtin":
        raw = (RawRow(r, f"builtin row {i}") for i, r in enumerate(generate_builtin(d.builtin_examples, d.builtin_seed)))
        what = "builtin data"
    elif d.source == "file":
        raw, what = read_file(d.path), str(d.path)
    else:
        raw, what = read_hub(d.hub_name, d.hub_split), f"{d.hub_name}[{d.hub_split}]"
    rows, report = normalize_rows(raw, field_map=d.field_map, max_chars=d.max_chars, template=d.template, id_prefix="row")
    check_report(report, d.max_bad_fraction, what)
    counts = Counter(r["id"] for r in rows)
    if repeated := sorted(i for i, n in counts.items() if n > 1):
        raise DataError(f"{what}: column 'id' (the row id) repeats {len(repeated)} "
                        f"value(s), e.g. {repeated[:3]}: give each row its own id, or drop the column (rows are "
                        f"then numbered)")
    return (rows[: d.max_rows] if d.max_rows else rows), report


def _eval_sets(cfg: PipelineConfig) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The named eval sets of `data.eval_sets`: rows and validation reports. Each set's columns are mapped by its
    own `field_map` (else `data.field_map`); a list-valued response is several references (kept as a list)."""
    eval_rows: dict[str, list[dict]] = {}
    reports: dict[str, dict] = {}
    for name, es in cfg.data.eval_sets.items():
        raw_rows = list(read_file(es.path))
        filtered_out = 0
        if es.filter_field:
            # Filter the raw rows (the flag is not one of the normalised fields), and validate only the rows kept.
            # A row without an `id` gets the id it would have had unfiltered (`<name>-<position in the file>`),
            # so ids do not depend on the filter.
            flagged = [RawRow(r.values if r.values.get("id") else r.values | {"id": f"{name}-{i:06d}"}, r.where)
                       for i, r in enumerate(raw_rows) if _flagged(r, es.filter_field, name)]
            filtered_out = len(raw_rows) - len(flagged)
            if not flagged:
                raise DataError(f"data.eval_sets.{name} ({es.path}): no row has filter_field {es.filter_field!r} "
                                f"true ({len(raw_rows)} rows read)")
            raw_rows = flagged
        erows, erep = normalize_rows(raw_rows, field_map=cfg.data.field_map if es.field_map is None else es.field_map,
                                     max_chars=cfg.data.max_chars, template=cfg.data.template, id_prefix=name,
                                     multi_reference=True)
        check_report(erep, cfg.data.max_bad_fraction, f"data.eval_sets.{name} ({es.path})")
        eval_rows[name] = erows[: es.limit] if es.limit else erows
        reports[name] = erep.to_dict() | {"filtered_out": filtered_out, "written": len(eval_rows[name])}
    return eval_rows, reports


def _check_answer_references(cfg: PipelineConfig, splits: dict, eval_rows: dict) -> None:
    """Every evaluated reference of a set of `evaluation.answers` has an answer by its rule (before any training;
    the evaluate stage checks again: DVC reruns it, not this stage, when only `evaluation` changes)."""
    for name, rule in cfg.evaluation.answers.items():
        rows = splits["test"] if name == "test" else eval_rows.get(name, [])
        check_references(rows[: cfg.evaluation.limit] if cfg.evaluation.limit else rows, rule,
                         f"evaluation.answers.{name}")


def _flagged(row: RawRow, field: str, set_name: str) -> bool:
    """The row's `filter_field`: true or false (absent or null: false); any other value is an error, not read
    as true or false (`"false"` is a non-empty string)."""
    value = row.values.get(field)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise DataError(f"{row.where}: field {field!r} (data.eval_sets.{set_name}.filter_field) must be true or false, "
                    f"got {type(value).__name__} {value!r}")


def repeats(rows: list[dict]) -> dict[str, int]:
    """Rows that repeat an earlier row's prompt (the split keeps each prompt's rows together) and rows that repeat
    a whole earlier row (prompt and response)."""
    prompts = {prompt_key(r) for r in rows}
    whole = {(prompt_key(r), json.dumps(r["response"])) for r in rows}
    return {"repeated_prompts": len(rows) - len(prompts), "duplicate_rows": len(rows) - len(whole)}


def decontaminate(rows: list[dict], eval_rows: list[dict]) -> tuple[list[dict], int]:
    """The data rows whose prompt is not in any eval set (train/val/test never share a prompt with a named
    eval set, so a fixed eval set stays a held-out one), and how many were dropped."""
    held_out = {prompt_key(r) for r in eval_rows}
    kept = [r for r in rows if prompt_key(r) not in held_out]
    return kept, len(rows) - len(kept)


def load_unlabeled_rows(cfg: PipelineConfig, exclude: set[tuple[str, str]]) -> tuple[list[dict], dict]:
    """The unlabeled pool (rows with response ""): `data.builtin_unlabeled` generated prompts, then the valid rows
    of the prompts-only source `data.unlabeled` (first `max_rows`); each prompt once, none whose `prompt_key` is in
    `exclude` (the labeled rows' and the eval sets' prompts: a transfer set must not answer a test prompt). Also
    a report: how many came from each source and how many were dropped as held out or repeated."""
    d = cfg.data
    rows: list[dict] = []
    report: dict = {}
    if d.builtin_unlabeled:
        try:
            rows = generate_unlabeled(d.builtin_unlabeled, d.builtin_seed, exclude)
        except ValueError as err:
            raise DataError(f"data.builtin_unlabeled: cannot generate {d.builtin_unlabeled} prompts disjoint from the "
                            f"labeled and eval prompts ({err}); lower it") from None
        report["builtin"] = len(rows)
    if d.unlabeled is not None:
        u = d.unlabeled
        what = f"data.unlabeled ({u.path or f'{u.hub_name}[{u.hub_split}]'})"
        raw = read_file(u.path) if u.path else read_hub(u.hub_name, u.hub_split)
        found, rep = normalize_rows(raw, field_map=d.field_map if u.field_map is None else u.field_map,
                                    max_chars=d.max_chars, template=d.template, id_prefix="unlabeled", prompts_only=True)
        check_report(rep, d.max_bad_fraction, what)
        found = found[: u.max_rows] if u.max_rows else found
        seen = set(exclude) | {prompt_key(r) for r in rows}
        kept = []
        for row in found:
            if (key := prompt_key(row)) not in seen:
                seen.add(key)
                kept.append(row)
        report["source"] = rep.to_dict() | {"held_out_or_repeated": len(found) - len(kept), "written": len(kept)}
        rows += kept
    return rows, report


def _tokenizer(cfg: PipelineConfig, train_rows: list[dict]):
    """The teacher checkpoint's tokenizer (its `model.tokenizer` if given, else its own), else a byte-level BPE trained
    on the train split (a teacher built from config with a `model.tokenizer` keeps that to itself)."""
    teacher_src = cfg.teacher.model
    if not teacher_src.checkpoint and teacher_src.endpoint is None:  # (a served teacher's `tokenizer` is required)
        texts = (format_prompt(r, cfg.data.template) + r["response"] for r in train_rows)
        return train_bpe_tokenizer(texts, cfg.tokenizer.vocab_size)
    try:
        if teacher_src.tokenizer:
            return load_tokenizer(teacher_src.tokenizer, teacher_src.trust_remote_code)
        return load_tokenizer(teacher_src.checkpoint, teacher_src.trust_remote_code, gguf_file=teacher_src.gguf_file)
    except (OSError, ValueError) as err:
        if teacher_src.tokenizer:
            raise ModelError(f"teacher.model.tokenizer: {teacher_src.tokenizer!r} does not load as a tokenizer "
                             f"({err})") from None
        path = teacher_src.checkpoint
        missing = path.startswith((".", "/", "~")) and not Path(path).expanduser().exists()
        raise ModelError(f"teacher.model.checkpoint: {path!r} " + ("does not exist" if missing else
                         f"has no tokenizer that loads ({err})")) from None


def prepare(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """Load, validate and split the data; write the unlabeled pool (`data/unlabeled.jsonl`, empty without one) and
    the named eval sets; build the run's tokenizer."""
    rows, report = load_main_rows(cfg)
    eval_rows, eval_reports = _eval_sets(cfg)
    rows, contaminated = decontaminate(rows, [r for part in eval_rows.values() for r in part])
    if contaminated:
        log.info("dropped %d data rows whose prompt is in an eval set", contaminated)
    splits = split_rows(rows, cfg.data.split.val_fraction, cfg.data.split.test_fraction, cfg.data.split.seed)
    for name, part in splits.items():
        if not part and (name == "train" or getattr(cfg.data.split, f"{name}_fraction", 1) > 0):
            raise DataError(f"split {name!r} is empty after validation ({len(rows)} valid rows): "
                            f"use more data or change data.split")
    _check_answer_references(cfg, splits, eval_rows)
    unlabeled, unlabeled_report = load_unlabeled_rows(
        cfg, {prompt_key(r) for r in [*rows, *(r for part in eval_rows.values() for r in part)]})
    if cfg.data.has_unlabeled and not unlabeled:
        raise DataError(f"data.unlabeled: no prompt left after dropping the labeled and eval prompts "
                        f"({unlabeled_report})")
    tok = _tokenizer(cfg, splits["train"])
    # rows over tokenizer.max_length stay in the splits; training truncates or drops them (tokenizer.overlong)
    overlong = {name: encode_rows(part, tok, cfg.data.template, cfg.tokenizer.max_length, "drop")[1]
                for name, part in splits.items()}
    if cfg.tokenizer.overlong == "drop" and overlong["train"] == len(splits["train"]):
        raise DataError(f"split 'train': all {overlong['train']} rows are longer than tokenizer.max_length="
                        f"{cfg.tokenizer.max_length} and tokenizer.overlong is 'drop'")
    if tok.chat_template is None:  # a checkpoint's own chat template wins
        tok.chat_template = chat_template(cfg.data.template)
    if not cfg.teacher.model.checkpoint:  # models built from a config have exactly this context
        tok.model_max_length = n_positions(cfg)
    with atomic_dir(paths.tokenizer) as tmp:
        tok.save_pretrained(str(tmp))

    for name, part in [*splits.items(), ("unlabeled", unlabeled)]:  # unlabeled.jsonl always (a DVC out), maybe empty
        write_jsonl_atomic(paths.split(name), part)
    with atomic_dir(paths.data / "eval") as tmp:
        for name, erows in eval_rows.items():
            write_jsonl_atomic(tmp / f"{name}.jsonl", erows)
    summary = {"main": report.to_dict() | {"in_eval_sets": contaminated} | repeats(rows), "eval_sets": eval_reports, "splits": {k: len(v) for k, v in splits.items()},
               "unlabeled": unlabeled_report | {"rows": len(unlabeled)},
               "overlong": {"max_length": cfg.tokenizer.max_length, "policy": cfg.tokenizer.overlong, "rows": overlong},
               "data_version": file_hash(*(paths.split(n) for n in ("train", "val", "test", "unlabeled")))}
    write_json_atomic(paths.data_report, summary)
    log.info("prepared data: %s, unlabeled prompts: %d", summary["splits"], len(unlabeled))
    with runs.stage_run(cfg, paths.root, "prepare"):
        runs.log_params({"data.source": cfg.data.source, "data.version": summary["data_version"]})
        runs.log_metrics({f"rows_{k}": v for k, v in summary["splits"].items()} | {"rows_bad": report.total - report.kept}
                             | {"rows_unlabeled": len(unlabeled)}
                             | {f"rows_overlong_{k}": v for k, v in overlong.items()})
        runs.log_dict(summary, "data_report.json")
    return summary
