"""Stage `transfer`: a transfer set (SeqKD data) made with a model from the train prompts, the unlabeled prompts or
both, by the set's strategy (which rows: kd_core/data/transfer_strategies.py; exact definitions: docs/methods.md,
`seqkd`); the model at work (answers, paraphrases, scores) is this stage's `Writer`."""

from __future__ import annotations

from functools import partial

import torch

from kd_core.config import PipelineConfig
from kd_core.data.tokenize import EncodedDataset, batches, encode_example, encode_prompt
from kd_core.data.transfer_strategies import strategy_rows
from kd_core.errors import DataError
from kd_core.generation import generate
from kd_core.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from kd_core.models.lm import response_logprobs
from kd_core.run import RunPaths, load_model, load_model_tokenizer, require
from kd_core.teachers.factory import generator_of
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
    model = generator_of(cfg, paths, ts.source, tokenizer)  # the model, or its endpoint (served by another process)
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


@torch.inference_mode()
def _mean_logprobs(model, dataset, pad_id: int, batch_size: int = 32) -> list[float]:
    """Mean log-probability of each example's response tokens under `model` (teacher forcing)."""
    out: list[float] = []
    for batch in batches(dataset, pad_id, batch_size):
        logprobs, mask = response_logprobs(model, batch)
        out += (logprobs.sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return out


def response_scores(rows: list[dict], model, tokenizer, cfg: PipelineConfig) -> dict[int, float]:
    """Row index -> the mean log-probability under `model` of the row's response tokens and EOS, the prompt
    given (teacher forcing, the data template, responses cut at tokenizer.max_length). Rows whose prompt
    leaves no room for a response token have no score."""
    encoded = [encode_example(r, tokenizer, cfg.data.template, cfg.tokenizer.max_length) for r in rows]
    usable = [i for i, e in enumerate(encoded) if e is not None]
    return dict(zip(usable, _mean_logprobs(model, EncodedDataset([encoded[i] for i in usable]),
                                            tokenizer.pad_token_id)))


class Writer:
    """Runs the set's model (here, or a teacher served by another process: `generator_of`): answers prompts and
    paraphrases instructions with the set's decoding settings, counting empty outputs and generated tokens; scores
    rows with a model here."""

    def __init__(self, cfg: PipelineConfig, set_name: str, model, tokenizer):
        self.cfg, self.set_name, self.model, self.tokenizer = cfg, set_name, model, tokenizer
        self.ts = cfg.transfer_sets[set_name]
        self.stats = {"answered_prompts": 0, "empty_generations": 0, "paraphrases": 0, "empty_paraphrases": 0,
                      "generated_tokens": 0, "generation_seconds": 0.0}

    def _texts(self, rows: list[dict], seed: int) -> list[str]:
        ts, cfg = self.ts, self.cfg
        prompts = [encode_prompt(r, self.tokenizer, cfg.data.template, cfg.tokenizer.max_length) for r in rows]
        gen = generate(self.model, self.tokenizer, prompts, max_new_tokens=ts.max_new_tokens, do_sample=not ts.greedy,
                       temperature=ts.temperature, top_p=ts.top_p, seed=seed,
                       batch_size=cfg.evaluation.generation.batch_size)
        self.stats["generated_tokens"] += gen.new_tokens
        self.stats["generation_seconds"] += gen.seconds
        return gen.texts

    def scores(self, rows: list[dict]) -> dict[int, float]:
        return response_scores(rows, self.model, self.tokenizer, self.cfg)

    def answers(self, rows: list[dict]) -> list[dict]:
        """`n_samples` answers per row (seed + k for the k-th): the row with `response` = the answer, id
        `<row id>~<set name><k>`, `generated_by`; empty answers dropped."""
        out: list[dict] = []
        self.stats["answered_prompts"] += len(rows)
        for k in range(self.ts.n_samples if rows else 0):
            for row, text in zip(rows, self._texts(rows, self.ts.seed + k)):
                if not text:
                    self.stats["empty_generations"] += 1
                    continue
                out.append(dict(row, response=text, id=f"{row['id']}~{self.set_name}{k}", generated_by=self.ts.source))
        return out

    def paraphrases(self, rows: list[dict]) -> list[dict]:
        """`n_paraphrases` paraphrases per row (seed + j for the j-th): the model answers `paraphrase_instruction`
        with the row's instruction in it; the row with that answer as instruction (context and category kept,
        no response), id `<row id>~p<j>`, `paraphrase_of` = the row's id; empty paraphrases dropped."""
        template = self.ts.paraphrase_instruction
        queries = [{"instruction": template.replace("{instruction}", r["instruction"].strip()), "context": ""}
                   for r in rows]
        out: list[dict] = []
        for j in range(self.ts.n_paraphrases if rows else 0):
            for row, text in zip(rows, self._texts(queries, self.ts.seed + j)):
                if not text:
                    self.stats["empty_paraphrases"] += 1
                    continue
                out.append(dict(row, instruction=text, response="", id=f"{row['id']}~p{j}", paraphrase_of=row["id"]))
        self.stats["paraphrases"] += len(out)
        return out
