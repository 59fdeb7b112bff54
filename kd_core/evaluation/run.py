"""The evaluate stage's work for one model: generation metrics over eval sets and seeds, validation
loss, and (for students) teacher-forced agreement with the teacher. Returns a flat dict of numbers (the
DVC metrics file); per-prompt generations and scores go to `generations/<model>/<set>.jsonl`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from kd_core.data.tokenize import batches, encode_prompt, encode_rows
from kd_core.evaluation.answers import answer_match, check_references, extract_answer, pass_at_k
from kd_core.evaluation.stats import bootstrap_mean, summarize
from kd_core.evaluation.text_metrics import (distinct_n, exact_match, function_word_share, references, rouge_l,
                                             self_bleu)
from kd_core.generation import generate
from kd_core.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from kd_core.models.lm import response_logprobs
from kd_core.models.build import count_parameters

log = logging.getLogger("kd")


@torch.inference_mode()
def validation_loss(model, dataset, pad_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy per response token over the data set (teacher forcing):
    −Σ log q(y_t | y_<t, x) / #response tokens."""
    total, count = 0.0, 0
    model.eval()
    for batch in batches(dataset, pad_id, batch_size):
        logprobs, mask = response_logprobs(model, batch)
        total += float(-logprobs.sum())
        count += int(mask.sum())
    return total / max(count, 1)


REF_PERCENTILES = (50, 90, 95)  # reported per eval set, with the max, in tokens


def reference_tokens(tokenizer, refs: list) -> list[int]:
    """Per prompt, the token count of its reference (of the longest, for several), without special tokens."""
    return [max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references(ref)) for ref in refs]


def generation_budget(g, ref_tokens: list[int]) -> int:
    """New tokens per prompt: `g.max_new_tokens`, or with `g.reference_percentile` = P set,
    min(max_new_tokens, ceil(P-th percentile of the reference token counts) + 1) (+1: the EOS)."""
    if g.reference_percentile is None or not ref_tokens:
        return g.max_new_tokens
    return max(1, min(g.max_new_tokens, math.ceil(float(np.percentile(ref_tokens, g.reference_percentile))) + 1))


def _mean_with_ci(metrics: dict, key: str, per_prompt, seed: int) -> None:
    """metrics[key] = the mean over prompts; <base>_ci_low / <base>_ci_high (base: key without a trailing `_mean`)
    its 95 % bootstrap interval over prompts (`bootstrap_mean`)."""
    b, base = bootstrap_mean(per_prompt, seed=seed), key.removesuffix("_mean")
    metrics |= {key: b["mean"], f"{base}_ci_low": b["ci_low"], f"{base}_ci_high": b["ci_high"]}


def _generation_metrics(cfg, model, tokenizer, set_name: str, rows: list[dict], out_file) -> dict:
    """Generation metrics of one eval set: greedy and sampled (one pass per seed, T and top-p of
    evaluation.generation) ROUGE-L and exact match (max over the references of a multi-reference row). A
    sampled metric is per prompt the mean over seeds, then the mean over prompts; every mean has a 95 %
    percentile bootstrap interval over prompts (`bootstrap_mean`, seed = cfg.seed); `*_sampled_std` is the SD
    of the per-seed means (ddof 1). Also: prompts, the references' token-length percentiles, the new-token
    budget (`generation_budget`). Per prompt: generations and scores in `out_file` (the paired tests read it)."""
    ev, g, n = cfg.evaluation, cfg.evaluation.generation, len(rows)
    prompts = [encode_prompt(r, tokenizer, cfg.data.template, cfg.tokenizer.max_length) for r in rows]
    refs = [r["response"] for r in rows]
    ref_tokens = reference_tokens(tokenizer, refs)
    budget = generation_budget(g, ref_tokens)
    metrics: dict[str, float] = {f"{set_name}/n_prompts": n, f"{set_name}/max_new_tokens": budget,
                                 f"{set_name}/ref_tokens_max": max(ref_tokens)}
    metrics |= {f"{set_name}/ref_tokens_p{q}": float(np.percentile(ref_tokens, q)) for q in REF_PERCENTILES}
    per_prompt = [{"id": r["id"], "instruction": r["instruction"], "context": r.get("context", ""),
                   "reference": r["response"], "ref_tokens": k, "samples": []} for r, k in zip(rows, ref_tokens)]
    gen_args = dict(max_new_tokens=budget, batch_size=g.batch_size)
    if ev.greedy:
        gen = generate(model, tokenizer, prompts, do_sample=False, **gen_args)
        rouge, em = rouge_l(gen.texts, refs), [100 * exact_match(p, r) for p, r in zip(gen.texts, refs)]
        _mean_with_ci(metrics, f"{set_name}/rougeL_greedy", rouge, cfg.seed)
        _mean_with_ci(metrics, f"{set_name}/exact_match_greedy", em, cfg.seed)
        metrics[f"{set_name}/gen_tokens_per_s"] = gen.tokens_per_second
        for item, text, r, e in zip(per_prompt, gen.texts, rouge, em):
            item.update(greedy=text, rougeL_greedy=r, exact_match_greedy=e)
    rouge = np.zeros((len(ev.sample_seeds), n))  # [seed, prompt]
    em = np.zeros((len(ev.sample_seeds), n))
    first_seed_texts = None
    for k, seed in enumerate(ev.sample_seeds):
        gen = generate(model, tokenizer, prompts, do_sample=True, temperature=g.temperature, top_p=g.top_p,
                       seed=seed, **gen_args)
        rouge[k] = rouge_l(gen.texts, refs)
        em[k] = [100 * exact_match(p, r) for p, r in zip(gen.texts, refs)]
        first_seed_texts = first_seed_texts or gen.texts
        for item, text in zip(per_prompt, gen.texts):
            item["samples"].append(text)
    if ev.sample_seeds:
        for key, scores in (("rougeL_sampled", rouge), ("exact_match_sampled", em)):
            _mean_with_ci(metrics, f"{set_name}/{key}_mean", scores.mean(axis=0), cfg.seed)
            metrics[f"{set_name}/{key}_std"] = summarize(scores.mean(axis=1))["std"]
        metrics[f"{set_name}/distinct_1"] = distinct_n(first_seed_texts, 1)
        metrics[f"{set_name}/distinct_2"] = distinct_n(first_seed_texts, 2)
        metrics[f"{set_name}/self_bleu"] = self_bleu(first_seed_texts[:200])
        metrics[f"{set_name}/function_words"] = function_word_share(first_seed_texts)
        for i, item in enumerate(per_prompt):
            item.update(rougeL_samples=rouge[:, i].tolist(), rougeL_sampled_mean=float(rouge[:, i].mean()),
                        exact_match_sampled_mean=float(em[:, i].mean()))
    if set_name in ev.answers:
        metrics |= _answer_metrics(cfg, set_name, per_prompt)
    write_jsonl_atomic(out_file, per_prompt)
    return metrics


def _answer_metrics(cfg, set_name: str, per_prompt: list[dict]) -> dict:
    """Answer checking on a set of `evaluation.answers` (kd_core/evaluation/answers.py), 0-100: the greedy
    generation's extracted answer equal to the reference's (`answer_match_greedy`), the same per sample averaged
    over seeds then prompts (`answer_match_sampled_*`, as the other sampled metrics), and pass@k per prompt over
    the sample seeds (`pass_at_<k>`); each mean with its bootstrap interval over prompts. Per prompt: the extracted
    answers, matches and pass@k (added to `per_prompt`)."""
    ev, rule = cfg.evaluation, cfg.evaluation.answers[set_name]
    metrics: dict[str, float] = {}
    for item in per_prompt:
        item["answer_reference"] = [extract_answer(r, rule) for r in references(item["reference"])]
    if ev.greedy:
        for item in per_prompt:
            item.update(answer_greedy=extract_answer(item["greedy"], rule),
                        answer_match_greedy=100 * answer_match(item["greedy"], item["reference"], rule))
        _mean_with_ci(metrics, f"{set_name}/answer_match_greedy", [i["answer_match_greedy"] for i in per_prompt],
                      cfg.seed)
    if ev.sample_seeds:
        match = np.array([[answer_match(t, i["reference"], rule) for t in i["samples"]] for i in per_prompt])
        _mean_with_ci(metrics, f"{set_name}/answer_match_sampled_mean", 100 * match.mean(axis=1), cfg.seed)
        metrics[f"{set_name}/answer_match_sampled_std"] = summarize(100 * match.mean(axis=0))["std"]
        correct = match.sum(axis=1).astype(int)
        for k in ev.pass_ks:
            scores = [100 * pass_at_k(len(ev.sample_seeds), int(c), k) for c in correct]
            _mean_with_ci(metrics, f"{set_name}/pass_at_{k}", scores, cfg.seed)
            for item, score in zip(per_prompt, scores):
                item[f"pass_at_{k}"] = score
        for item, row in zip(per_prompt, match):
            item.update(answer_samples=[extract_answer(t, rule) for t in item["samples"]],
                        answer_match_samples=(100 * row).tolist())
    return metrics


def evaluate_model(cfg, paths, model_name: str, model_dir) -> dict:
    """The model reads its own tokenizer (saved with it: the run's, or its own across tokenizers); the
    teacher-relative metrics need the teacher's tokenizer (they compare token by token) and are left out for a
    student with another one."""
    from kd_core.run import load_model_tokenizer

    from kd_core.teachers.factory import generator_of

    tokenizer = load_model_tokenizer(paths, model_name, model_dir)
    model = generator_of(cfg, paths, model_name, tokenizer)  # the model, or its endpoint (served elsewhere)
    if isinstance(model, torch.nn.Module):
        metrics: dict = {"parameters": count_parameters(model)}
        for split in ("val", "test"):
            ds = _encoded_split(cfg, paths, tokenizer, split)
            if len(ds):
                loss = validation_loss(model, ds, tokenizer.pad_token_id)
                metrics[f"{split}/loss"], metrics[f"{split}/ppl"] = loss, math.exp(min(loss, 50.0))
    else:
        from kd_core.teachers.served import served_metrics

        metrics = served_metrics(cfg)
        log.info("%s: served by another process (%s): generation metrics through it; no val/test loss (they need "
                 "its log-prob of every reference token, which it is not asked for)", model_name, metrics["endpoint"])
        paths.generations(model_name).mkdir(parents=True, exist_ok=True)  # (the stage's output, with no eval set)
    for set_name in cfg.evaluation.eval_sets:
        rows = read_jsonl(paths.eval_set(set_name))
        rows = rows[: cfg.evaluation.limit] if cfg.evaluation.limit else rows
        if set_name in cfg.evaluation.answers:
            check_references(rows, cfg.evaluation.answers[set_name], f"evaluation.answers.{set_name}")
        if rows:
            metrics |= _generation_metrics(cfg, model, tokenizer, set_name, rows,
                                           paths.generations(model_name) / f"{set_name}.jsonl")
    if model_name != cfg.teacher.name:
        if same_vocabulary(tokenizer, load_model_tokenizer(paths, cfg.teacher.name)):
            metrics |= _agreement_with_teacher(cfg, paths, model, tokenizer, model_name)
        else:
            log.info("%s: another tokenizer than the teacher's: no teacher-forced agreement metrics", model_name)
    return metrics


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (`get_vocab()` equal)."""
    return a is b or a.get_vocab() == b.get_vocab()


def _encoded_split(cfg, paths, tokenizer, split: str):
    ds, _ = encode_rows(read_jsonl(paths.split(split)), tokenizer, cfg.data.template, cfg.tokenizer.max_length,
                        cfg.tokenizer.overlong)
    return ds


def _agreement_with_teacher(cfg, paths, student, tokenizer, model_name: str) -> dict:
    """Teacher-relative metrics on the test split (the teacher p is the oracle):
    top-1 agreement (OKD eq. 3, per sentence then averaged; `_tokens`: pooled over tokens), KL(p || q),
    UNC-bucketed STD / KL / agreement (eq. 4, Figs. 2 and 5), and ExAccErr(l) (eqs. 5-7) on sampled prefixes."""
    from kd_core.evaluation.exposure_bias import exaccerr
    from kd_core.evaluation.teacher_forcing import (collect_token_stats, top1_agreement, top1_agreement_tokens,
                                                    unc_buckets)

    ev = cfg.evaluation
    test_ds = _encoded_split(cfg, paths, tokenizer, "test")
    if not len(test_ds):
        return {}
    from kd_core.teachers.factory import teacher_of

    vocab = min(len(tokenizer), student.get_output_embeddings().weight.shape[0])
    source = teacher_of(cfg, paths, cfg.teacher.name, vocab)
    if source.model is None:  # served by another process: its top-k log-probs only
        return _agreement_with_served_teacher(cfg, student, tokenizer, test_ds, model_name, source)
    teacher = source.model
    test_rows = read_jsonl(paths.split("test"))
    stats = collect_token_stats(student, teacher, list(batches(test_ds, tokenizer.pad_token_id, 32)))
    out = {"test/top1_agreement": top1_agreement(stats), "test/top1_agreement_tokens": top1_agreement_tokens(stats),
           "test/kl_teacher_student": float(stats.kl.mean())}
    buckets = unc_buckets(stats, n_buckets=ev.unc_buckets) if len(stats) >= ev.unc_buckets else []
    write_json_atomic(paths.generations(model_name) / "unc_buckets.json", buckets)
    for i, b in enumerate(buckets):
        for key in ("top1_agreement", "kl", "logit_std"):
            out[f"test/unc_bucket{i}_{key}"] = b[key]
    if ev.exaccerr_prompts and ev.exaccerr_lengths:
        prompts = [encode_prompt(r, tokenizer, cfg.data.template, cfg.tokenizer.max_length)
                   for r in test_rows[: ev.exaccerr_prompts]]
        result = exaccerr(student, teacher, prompts, ev.exaccerr_lengths, n_samples=ev.exaccerr_samples, seed=cfg.seed,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        write_json_atomic(paths.generations(model_name) / "exaccerr.json", {str(k): v for k, v in result.items()})
        for length, r in result.items():
            out[f"test/exaccerr_l{length}"] = r["value"]
            out[f"test/exaccerr_l{length}_ci_low"] = r["ci_low"]
            out[f"test/exaccerr_l{length}_ci_high"] = r["ci_high"]
    return out


def _agreement_with_served_teacher(cfg, student, tokenizer, test_ds, model_name: str, teacher) -> dict:
    """`_agreement_with_teacher` against a teacher served by another process, from its top-k log-probs
    (`teacher.model.endpoint.top_k`): top-1 agreement (exact) and KL(p || q) over its top-k + a tail bucket
    (`test/kl_teacher_student_topk`, an approximation from below). The UNC buckets and ExAccErr need its full
    distribution and its samples: left out."""
    from kd_core.evaluation.teacher_forcing import collect_topk_token_stats, top1_agreement, top1_agreement_tokens

    stats = collect_topk_token_stats(student, teacher.signal, batches(test_ds, tokenizer.pad_token_id, 32))
    log.info("%s: the teacher is served by another process: agreement and top-%d KL from its log-probs; no UNC "
             "buckets, no ExAccErr (they need its full distribution / its samples)", model_name,
             teacher.endpoint.top_k)
    return {"test/top1_agreement": top1_agreement(stats), "test/top1_agreement_tokens": top1_agreement_tokens(stats),
            "test/kl_teacher_student_topk": float(stats.kl.mean())}
