"""The transfer-set strategies (SeqKD data, the `transfer` stage): a model's answers to the train prompts, the
unlabeled prompts or both; a selection of them or of the labeled rows (confidence, hard examples); answers to
model-made paraphrases of the prompts. The strategies' exact definitions: docs/methods.md, `seqkd`."""

from __future__ import annotations

from typing import Callable

import torch

from kd_core.config import PipelineConfig
from kd_core.data.tokenize import EncodedDataset, batches, encode_example, encode_prompt
from kd_core.generation import generate
from kd_core.models.lm import response_logprobs


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


def select(rows: list[dict], scores: dict[int, float], keep_fraction: float, *, lowest: bool = False) -> list[dict]:
    """The k = max(1, round(keep_fraction * len(rows))) scored rows with the highest score (`lowest`: the
    lowest), ties to the earlier row, in their original order (fewer when fewer rows have a score)."""
    keep = max(1, round(keep_fraction * len(rows)))
    ranked = sorted(scores, key=lambda i: (scores[i] if lowest else -scores[i], i))
    return [rows[i] for i in sorted(ranked[:keep])]


class Writer:
    """Runs the set's model: answers prompts and paraphrases instructions with the set's decoding settings,
    counting empty outputs and generated tokens."""

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


def hardness_scores(source: dict[int, float], teacher: dict[int, float] | None) -> dict[int, float]:
    """Row index -> its score for hard-example mining, lowest = hardest: the source's mean log-prob of the reference
    (`hardness: loss`), or that minus the teacher's (`gap`: log p_source - log p_teacher = teacher loss - source loss,
    most negative where the source does worst relative to its teacher); rows without both scores are left out."""
    if teacher is None:
        return dict(source)
    return {i: source[i] - teacher[i] for i in source if i in teacher}


def strategy_rows(ts, writer: Writer, labeled: list[dict], pool: list[dict], scope: list[dict],
          teacher_scores: Callable[[list[dict]], dict[int, float]] | None = None) -> list[dict]:
    """The set's rows by its strategy (docs/methods.md): `labeled` the train split's rows, `pool` the unlabeled
    prompts, `scope` the prompts to answer; `teacher_scores`: `response_scores` under the source's
    teacher (`hardness: gap`)."""
    score = writer.scores
    if ts.strategy == "hard_examples":  # the labeled rows whose references the model finds least likely
        scores = hardness_scores(score(labeled), teacher_scores(labeled) if teacher_scores else None)
        hard = select(labeled, scores, ts.keep_fraction, lowest=True)
        return (hard if ts.answers != "generated" else []) + (writer.answers(hard) if ts.answers != "reference" else [])
    if ts.strategy == "confidence":
        candidates = ([] if ts.rank == "generated" else labeled) + (writer.answers(scope) if ts.rank != "original" else [])
        return select(candidates, score(candidates), ts.keep_fraction) if candidates else []
    if ts.strategy == "paraphrase":  # labeled rows kept as they are: only new prompts are answered
        unlabeled = pool if ts.prompts != "train" else []
        return labeled + writer.answers(unlabeled) + writer.answers(writer.paraphrases(scope))
    return (labeled if ts.strategy == "augment" else []) + writer.answers(scope)
