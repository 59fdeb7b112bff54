"""Text-level metrics: exact match, ROUGE-L, distinct-n, self-BLEU, function-word share.

Conventions
-----------
- ROUGE-L is Google's ``rouge_score`` implementation (the one MiniLLM / DistiLLM / the OKD paper report),
  F-measure of the LCS between prediction and reference, scaled to 0..100. By default the Porter stemmer is
  on (``use_stemmer=True``), as in MiniLLM's ``rouge_metric.py``; its tokenizer lowercases and drops
  non-alphanumeric characters.
- ``distinct_n`` and ``self_bleu`` tokenise on whitespace (``str.split()``) with no lowercasing;
  ``function_word_share`` lowercases and strips punctuation from each whitespace token.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["normalize_answer", "references", "exact_match", "rouge_l", "distinct_n", "self_bleu", "function_word_share",
           "FUNCTION_WORDS"]

_PUNCT = string.punctuation


def normalize_answer(s: str) -> str:
    """Lowercase, strip, collapse runs of whitespace to one space, drop trailing punctuation.

    Only *trailing* punctuation is removed (repeatedly, with any whitespace between), so
    ``"  The  Answer is: Paris. !"`` -> ``"the answer is: paris"``.
    """
    text = " ".join(s.lower().split())
    return text.rstrip(_PUNCT + " \t\n\r\f\v")


def references(ref: str | Sequence[str]) -> list[str]:
    """A reference field as a list of references: a string is one reference, a list (a multi-reference eval
    set, e.g. Super-NaturalInstructions' ``output``) is several. An empty list is an error."""
    refs = [ref] if isinstance(ref, str) else list(ref)
    if not refs:
        raise ValueError("empty reference list")
    return refs


def exact_match(pred: str, ref: str | Sequence[str]) -> float:
    """1.0 if ``normalize_answer(pred) == normalize_answer(r)`` for the reference (or any of the references)
    ``r``, else 0.0 (max over references, as for ROUGE-L)."""
    answer = normalize_answer(pred)
    return float(any(answer == normalize_answer(r) for r in references(ref)))


@lru_cache(maxsize=4)
def _rouge_l_scorer(use_stemmer: bool):
    """Module-level cache: one ``RougeScorer(["rougeL"])`` per stemmer setting (building it is not free)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(
    preds: Sequence[str],
    refs: Sequence[str] | Sequence[Sequence[str]],
    *,
    use_stemmer: bool = True,
) -> list[float]:
    """ROUGE-L F-measure x 100 for each (prediction, reference) pair.

    Args:
        preds: N predictions.
        refs: N references; an element may also be a list of references, in which case the best
            (maximum) score over them is taken (``RougeScorer.score_multi``), as in MiniLLM /
            Super-NaturalInstructions evaluation.
        use_stemmer: Porter stemming in the ``rouge_score`` tokenizer (MiniLLM uses ``True``).

    Returns:
        N floats in [0, 100]. A pair where either side has no tokens scores 0.
    """
    if len(preds) != len(refs):
        raise ValueError(f"rouge_l: {len(preds)} predictions but {len(refs)} references")
    scorer = _rouge_l_scorer(bool(use_stemmer))
    out: list[float] = []
    for pred, ref in zip(preds, refs):
        # RougeScorer.score(target, prediction); score_multi(targets, prediction): the best F-measure's target
        score = scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(references(ref), pred)
        out.append(100.0 * score["rougeL"].fmeasure)
    return out


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: (number of unique n-grams) / (total number of n-grams), pooled over all texts.

    n-grams never cross text boundaries; tokens are ``text.split()``. Returns 0.0 when there is no n-gram.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = _ngrams(text.split(), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


# 30 of the most frequent English function words (articles, conjunctions, prepositions, auxiliaries, pronouns)
FUNCTION_WORDS = frozenset("the a an and or but of to in on for with at by from as is are was were be it this that "
                           "not i you he she they".split())


def function_word_share(texts: Sequence[str]) -> float:
    """The share of words that are among `FUNCTION_WORDS`, pooled over all texts: a fluency check, since text
    collapsed onto the most frequent tokens scores high here (the Dolly-test references: 0.32).

    Words are ``text.split()`` lowercased with punctuation stripped at both ends (empty ones dropped). Returns 0.0
    when there is no word.
    """
    words = [w for text in texts for w in (t.strip(_PUNCT).lower() for t in text.split()) if w]
    return sum(w in FUNCTION_WORDS for w in words) / len(words) if words else 0.0


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Self-BLEU x 100: mean over i of BLEU(texts[i] | references = all other texts).

    Uses ``nltk.translate.bleu_score.sentence_bleu`` with uniform weights ``(1/max_n,) * max_n`` and
    Chen & Cherry smoothing ``method1`` (add-epsilon to zero n-gram counts). Tokens are ``text.split()``.
    Higher means less diverse. Returns 0.0 for fewer than 2 texts. Cost is O(N^2) in the number of texts.
    """
    if max_n < 1:
        raise ValueError(f"self_bleu: max_n must be >= 1, got {max_n}")
    if len(texts) < 2:
        return 0.0
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    tokenized = [t.split() for t in texts]
    weights = tuple([1.0 / max_n] * max_n)
    smooth = SmoothingFunction().method1
    scores: list[float] = []
    with warnings.catch_warnings():
        # nltk warns when a hypothesis has no n-gram of some order; smoothing handles it.
        warnings.simplefilter("ignore")
        for i, hyp in enumerate(tokenized):
            refs = tokenized[:i] + tokenized[i + 1 :]
            if not hyp:
                scores.append(0.0)
                continue
            scores.append(float(sentence_bleu(refs, hyp, weights=weights, smoothing_function=smooth)))
    return 100.0 * sum(scores) / len(scores)
