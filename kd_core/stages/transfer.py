"""Stage `transfer`: a transfer set (SeqKD data) made with a model from the train prompts, the unlabeled prompts or
both, by the set's strategy (kd_core/data/transfer_strategies.py; exact definitions: docs/methods.md, `seqkd`)."""

from __future__ import annotations

from functools import partial

from kd_core.config import PipelineConfig
from kd_core.data.transfer_strategies import Writer, response_scores, strategy_rows
from kd_core.errors import DataError
from kd_core.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from kd_core.run import RunPaths, load_model, load_model_tokenizer, require
from kd_core.tracking import runs


def transfer(cfg: PipelineConfig, paths: RunPaths, set_name: str) -> dict:
    """Make a transfer set (SeqKD data) with a model: `data/<set_name>.jsonl`.

    `prompts` is the scope (train: the train split's rows, unlabeled: the unlabeled pool's, both: train then
    unlabeled); generated rows are the prompt's row with `response` = the generation (empty ones dropped),
    id `<row id>~<set name><k>` and `generated_by`. `generated`: `n_samples` answers per prompt of the scope;
    `augment`: the labeled train rows first, then those answers; `confidence`, `hard_examples`, `paraphrase`:
    `strategy_rows` and docs/methods.md."""
    if set_name not in cfg.transfer_sets:
        raise KeyError(f"no transfer set {set_name!r} (transfer_sets: {', '.join(cfg.transfer_sets) or 'none'})")
    ts = cfg.transfer_sets[set_name]
    tokenizer = load_model_tokenizer(paths, ts.source)  # the source model's own (the run's, unless it has another)
    model = load_model(paths, ts.source)
    labeled = read_jsonl(require(paths.split("train"), "data 'train'", "prepare"))
    pool = [] if ts.prompts == "train" else read_jsonl(require(paths.split("unlabeled"), "unlabeled prompts", "prepare"))
    scope = ([] if ts.prompts == "unlabeled" else labeled) + pool
    if not scope:
        raise DataError(f"transfer set {set_name!r}: no prompts to answer ({paths.split('unlabeled')} is empty; "
                        f"transfer_sets.{set_name}.prompts is {ts.prompts!r}: set data.builtin_unlabeled or "
                        f"data.unlabeled and rerun prepare)")
    writer = Writer(cfg, set_name, model, tokenizer)
    teacher_scores = None
    if ts.strategy == "hard_examples" and ts.hardness == "gap":  # (dvc.yaml: the source's model depends on it)
        name = cfg.students[ts.source].teacher
        teacher_scores = partial(response_scores, model=load_model(paths, name),
                                 tokenizer=load_model_tokenizer(paths, name), cfg=cfg)
    with runs.stage_run(cfg, paths.root, "transfer", set_name, params=ts.model_dump()):
        out_rows = strategy_rows(ts, writer, labeled, pool, scope, teacher_scores)
        if not out_rows:
            raise DataError(f"transfer set {set_name!r}: {ts.source!r} generated only empty responses")
        write_jsonl_atomic(paths.split(set_name), out_rows)
        stats = writer.stats
        info = {"rows": len(out_rows), "prompts": len(scope), "unlabeled_prompts": len(pool),
                "labeled_rows": sum("generated_by" not in r for r in out_rows),
                **stats, "tokens_per_s": stats["generated_tokens"] / stats["generation_seconds"]
                if stats["generation_seconds"] else 0.0}
        runs.log_metrics(info)
    write_json_atomic(paths.train_info(f"transfer.{set_name}"), info)
    return info
