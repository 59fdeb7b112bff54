"""The transfer-set strategies (SeqKD data, the `transfer` stage): which rows a set holds, a model's answers to the
train prompts, the unlabeled prompts or both; a selection of them or of the labeled rows (confidence, hard
examples); answers to model-made paraphrases of the prompts. The strategies' exact definitions: docs/methods.md,
`seqkd`. The model that answers and scores (the stage's `Writer`) is handed in: nothing here imports torch."""

from __future__ import annotations

from typing import Callable


def select(rows: list[dict], scores: dict[int, float], keep_fraction: float, *, lowest: bool = False) -> list[dict]:
    """The k = max(1, round(keep_fraction * len(rows))) scored rows with the highest score (`lowest`: the
    lowest), ties to the earlier row, in their original order (fewer when fewer rows have a score)."""
    keep = max(1, round(keep_fraction * len(rows)))
    ranked = sorted(scores, key=lambda i: (scores[i] if lowest else -scores[i], i))
    return [rows[i] for i in sorted(ranked[:keep])]


def hardness_scores(source: dict[int, float], teacher: dict[int, float] | None) -> dict[int, float]:
    """Row index -> its score for hard-example mining, lowest = hardest: the source's mean log-prob of the reference
    (`hardness: loss`), or that minus the teacher's (`gap`: log p_source - log p_teacher = teacher loss - source loss,
    most negative where the source does worst relative to its teacher); rows without both scores are left out."""
    if teacher is None:
        return dict(source)
    return {i: source[i] - teacher[i] for i in source if i in teacher}


def strategy_rows(ts, writer, labeled: list[dict], pool: list[dict], scope: list[dict],
          teacher_scores: Callable[[list[dict]], dict[int, float]] | None = None) -> list[dict]:
    """The set's rows by its strategy (docs/methods.md): `labeled` the train split's rows, `pool` the unlabeled
    prompts, `scope` the prompts to answer; `writer`: the set's model (`answers`, `paraphrases`, `scores` of rows:
    `kd_core.stages.transfer.Writer`); `teacher_scores`: the scores under the source's teacher (`hardness: gap`)."""
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
