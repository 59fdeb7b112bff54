"""The evaluate stage's work for one model: generation metrics over eval sets and seeds, validation
loss, and (for students) teacher-forced agreement with the teacher. Returns a flat dict of numbers (the
DVC metrics file); per-prompt generations and scores go to `generations/<model>/<set>.jsonl`.
"""

from __future__ import annotations

import math

import torch

from kd_core.data.tokenize import batches, encode_prompt, encode_rows, load_tokenizer
from kd_core.evaluation.stats import summarize
from kd_core.evaluation.text_metrics import distinct_n, exact_match, rouge_l, self_bleu
from kd_core.generation import generate
from kd_core.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from kd_core.lm import response_logprobs
from kd_core.models import count_parameters, load_checkpoint


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


def _generation_metrics(cfg, model, tokenizer, set_name: str, rows: list[dict], out_file) -> dict:
    ev, g = cfg.evaluation, cfg.evaluation.generation
    prompts = [encode_prompt(r, tokenizer, cfg.data.template, cfg.tokenizer.max_length) for r in rows]
    refs = [r["response"] for r in rows]
    metrics: dict[str, float] = {}
    per_prompt = [{"id": r["id"], "instruction": r["instruction"], "context": r.get("context", ""),
                   "reference": r["response"], "samples": []} for r in rows]
    if ev.greedy:
        gen = generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, do_sample=False,
                       batch_size=g.batch_size)
        scores = rouge_l(gen.texts, refs)
        ems = [exact_match(p, r) for p, r in zip(gen.texts, refs)]
        metrics[f"{set_name}/rougeL_greedy"] = sum(scores) / len(scores)
        metrics[f"{set_name}/exact_match_greedy"] = 100 * sum(ems) / len(ems)
        metrics[f"{set_name}/gen_tokens_per_s"] = gen.tokens_per_second
        for item, text, score in zip(per_prompt, gen.texts, scores):
            item.update(greedy=text, rougeL_greedy=score)
    seed_rouge, seed_em, first_seed_texts = [], [], None
    prompt_rouge = [[] for _ in rows]
    for seed in ev.sample_seeds:
        gen = generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, do_sample=True,
                       temperature=g.temperature, top_p=g.top_p, seed=seed, batch_size=g.batch_size)
        scores = rouge_l(gen.texts, refs)
        seed_rouge.append(sum(scores) / len(scores))
        seed_em.append(100 * sum(exact_match(p, r) for p, r in zip(gen.texts, refs)) / len(refs))
        first_seed_texts = first_seed_texts or gen.texts
        for i, (text, score) in enumerate(zip(gen.texts, scores)):
            per_prompt[i]["samples"].append(text)
            prompt_rouge[i].append(score)
    if seed_rouge:
        for key, values in (("rougeL_sampled", seed_rouge), ("exact_match_sampled", seed_em)):
            s = summarize(values)
            metrics.update({f"{set_name}/{key}_mean": s["mean"], f"{set_name}/{key}_std": s["std"],
                            f"{set_name}/{key}_ci_low": s["ci_low"], f"{set_name}/{key}_ci_high": s["ci_high"]})
        metrics[f"{set_name}/distinct_1"] = distinct_n(first_seed_texts, 1)
        metrics[f"{set_name}/distinct_2"] = distinct_n(first_seed_texts, 2)
        metrics[f"{set_name}/self_bleu"] = self_bleu(first_seed_texts[:200])
        for item, scores in zip(per_prompt, prompt_rouge):
            item["rougeL_sampled_mean"] = sum(scores) / len(scores)
    write_jsonl_atomic(out_file, per_prompt)
    return metrics


def evaluate_model(cfg, paths, model_name: str, model_dir) -> dict:
    tokenizer = load_tokenizer(paths.tokenizer)
    model = load_checkpoint(model_dir)
    metrics: dict[str, float] = {"parameters": count_parameters(model)}
    for split in ("val", "test"):
        ds = _encoded_split(cfg, paths, tokenizer, split)
        if len(ds):
            loss = validation_loss(model, ds, tokenizer.pad_token_id)
            metrics[f"{split}/loss"], metrics[f"{split}/ppl"] = loss, math.exp(min(loss, 50.0))
    for set_name in cfg.evaluation.eval_sets:
        rows = read_jsonl(paths.eval_set(set_name))
        rows = rows[: cfg.evaluation.limit] if cfg.evaluation.limit else rows
        if rows:
            metrics |= _generation_metrics(cfg, model, tokenizer, set_name, rows,
                                           paths.generations(model_name) / f"{set_name}.jsonl")
    if model_name != cfg.teacher.name:
        metrics |= _agreement_with_teacher(cfg, paths, model, tokenizer, model_name)
    return metrics


def _encoded_split(cfg, paths, tokenizer, split: str):
    ds, _ = encode_rows(read_jsonl(paths.split(split)), tokenizer, cfg.data.template, cfg.tokenizer.max_length,
                        cfg.tokenizer.overlong)
    return ds


def _agreement_with_teacher(cfg, paths, student, tokenizer, model_name: str) -> dict:
    """Teacher-relative metrics on the test split (the teacher p is the oracle):
    top-1 agreement (OKD eq. 3), KL(p || q), UNC-bucketed STD / KL / agreement (eq. 4, Figs. 2 and 5),
    and ExAccErr(l) (eqs. 5-7) on sampled prefixes."""
    from kd_core.evaluation.exposure_bias import exaccerr
    from kd_core.evaluation.teacher_forcing import collect_token_stats, top1_agreement, unc_buckets

    ev = cfg.evaluation
    teacher = load_checkpoint(paths.model(cfg.teacher.name))
    test_rows = read_jsonl(paths.split("test"))
    test_ds = _encoded_split(cfg, paths, tokenizer, "test")
    if not len(test_ds):
        return {}
    stats = collect_token_stats(student, teacher, list(batches(test_ds, tokenizer.pad_token_id, 32)))
    out = {"test/top1_agreement": top1_agreement(stats), "test/kl_teacher_student": float(stats.kl.mean())}
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
