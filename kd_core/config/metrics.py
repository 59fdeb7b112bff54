"""Which metrics a configured evaluation produces, by name pattern, so that `kd validate` refuses a champion
metric that no model will ever have (the register stage would compare nothing, at the end of the run).

The names are those of `kd_core/evaluation/run.py` (`evaluate_model`: keys of its metrics dict) plus the two
the register stage logs with every version; tests/test_config_load.py runs the evaluation's generation metrics
against these patterns.
"""

from __future__ import annotations

import re
from typing import Literal

from kd_core.config.base import PipelineConfigLike

# how a final answer is extracted from a text (evaluation.answers; the rules: kd_core/evaluation/answers.py)
AnswerRule = Literal["gsm8k", "last_number", "boxed", "choice"]
REGISTER_METRICS = ("parameters", "train_time_s")
SPLIT_METRIC = re.compile(r"loss|ppl")  # val/ and test/: teacher-forced on the splits, whatever eval_sets says
GREEDY_METRIC = re.compile(r"(rougeL|exact_match)_greedy(_ci_low|_ci_high)?|gen_tokens_per_s")
SAMPLED_METRIC = re.compile(r"(rougeL|exact_match)_sampled_(mean|std|ci_low|ci_high)|distinct_[12]|self_bleu|function_words")
SET_METRIC = re.compile(r"n_prompts|max_new_tokens|ref_tokens_(p50|p90|p95|max)")  # every evaluated set
AGREEMENT_METRIC = re.compile(r"top1_agreement(_tokens)?|kl_teacher_student(_topk)?")  # test/, students only
SERVED_METRIC = re.compile(r"top1_agreement(_tokens)?|kl_teacher_student_topk")  # those of a served teacher's students
UNC_METRIC = re.compile(r"unc_bucket(\d+)_(top1_agreement|kl|logit_std)")  # test/, students only
EXACCERR_METRIC = re.compile(r"exaccerr_l(\d+)(_ci_low|_ci_high)?")  # test/, students only
# eval sets with an answer rule (evaluation.answers)
ANSWER_GREEDY_METRIC = re.compile(r"answer_match_greedy(_ci_low|_ci_high)?")
ANSWER_SAMPLED_METRIC = re.compile(r"answer_match_sampled_(mean|std|ci_low|ci_high)|pass_at_(\d+)(_ci_low|_ci_high)?")
ALLOWED = ("parameters, train_time_s, {val,test}/{loss,ppl}, <eval set>/{rougeL,exact_match}_greedy[_ci_low|"
           "_ci_high], <eval set>/gen_tokens_per_s, <eval set>/{rougeL,exact_match}_sampled_{mean,std,ci_low,ci_high}, "
           "<eval set>/{distinct_1,distinct_2,self_bleu,function_words,n_prompts,max_new_tokens,ref_tokens_{p50,p90,p95,max}}, "
           "test/{top1_agreement,top1_agreement_tokens,kl_teacher_student}, test/kl_teacher_student_topk (a served "
           "teacher), "
           "test/unc_bucket<i>_{top1_agreement,kl,logit_std}, test/exaccerr_l<l>[_ci_low|_ci_high], "
           "<answer set>/answer_match_greedy[_ci_low|_ci_high], <answer set>/answer_match_sampled_{mean,std,ci_low,"
           "ci_high}, <answer set>/pass_at_<k>[_ci_low|_ci_high] (sets of evaluation.answers)")


def check_evaluation(cfg: PipelineConfigLike) -> None:
    """The eval sets exist, the champion metric is produced (`metric_problem`), and a champion significance
    test has its input: per-prompt sampled ROUGE-L on the 'test' eval set. Raises ValueError naming the key."""
    ev, rule = cfg.evaluation, cfg.tracking.champion
    known = {"test", *cfg.data.eval_sets}
    for i, name in enumerate(ev.eval_sets):
        if name not in known:
            raise ValueError(f"evaluation.eval_sets[{i}]: unknown eval set {name!r} "
                             f"(allowed: {', '.join(sorted(known))})")
    for name in ev.answers:
        if name not in ev.eval_sets:
            raise ValueError(f"evaluation.answers.{name}: not an evaluated set (evaluation.eval_sets; allowed: "
                             f"{', '.join(ev.eval_sets) or 'none, evaluation.eval_sets is empty'})")
    for i, k in enumerate(ev.pass_at_k or ()):
        if k > len(ev.sample_seeds):
            raise ValueError(f"evaluation.pass_at_k[{i}]: pass@{k} needs at least {k} samples per prompt and "
                             f"evaluation.sample_seeds has {len(ev.sample_seeds)} (allowed: 1 to "
                             f"{len(ev.sample_seeds)})")
    if problem := metric_problem(cfg, rule.metric):
        raise ValueError(f"tracking.champion.metric: {problem}")
    if rule.significance is not None and ("test" not in ev.eval_sets or not ev.sample_seeds):
        raise ValueError("tracking.champion.significance: the paired test reads per-prompt sampled ROUGE-L of the "
                         "'test' eval set: needs 'test' in evaluation.eval_sets and evaluation.sample_seeds")


def metric_problem(cfg: PipelineConfigLike, metric: str) -> str | None:
    """None when a student's evaluation writes `metric`, else why not. The rule, per form:

    - `parameters`, `train_time_s`: always (the register stage logs them).
    - `val/{loss,ppl}`, `test/{loss,ppl}`: when that split is not empty (data.split.<split>_fraction > 0).
    - `<set>/<generation metric>`: `<set>` in evaluation.eval_sets; `*_greedy[_ci_*]` and `gen_tokens_per_s`
      need evaluation.greedy; `*_sampled_*`, `distinct_*`, `self_bleu`, `function_words` need evaluation.sample_seeds;
      `n_prompts`, `max_new_tokens`, `ref_tokens_*` need the set only; `answer_match_*` and `pass_at_<k>[_ci_*]`
      need `<set>` in evaluation.answers (and k in `EvaluationConfig.pass_ks`).
    - `test/top1_agreement[_tokens]`, `test/kl_teacher_student`, `test/unc_bucket<i>_*` (i < evaluation.unc_buckets),
      `test/exaccerr_l<l>[_ci_low|_ci_high]` (l in evaluation.exaccerr_lengths, exaccerr_prompts > 0):
      agreement with the teacher on the test split; with a teacher served by another process (teacher.model.endpoint)
      `test/top1_agreement[_tokens]` and `test/kl_teacher_student_topk` only (from its top-k log-probs).
    """
    ev = cfg.evaluation
    if metric in REGISTER_METRICS:
        return None
    set_name, _, name = metric.partition("/")
    if set_name in ("val", "test") and SPLIT_METRIC.fullmatch(name):
        return _split_problem(cfg, set_name, metric)
    if set_name == "test" and (AGREEMENT_METRIC.fullmatch(name) or UNC_METRIC.fullmatch(name)
                               or EXACCERR_METRIC.fullmatch(name)):
        return _split_problem(cfg, "test", metric) or _agreement_problem(cfg, name, metric)
    answer = ANSWER_GREEDY_METRIC.fullmatch(name) or ANSWER_SAMPLED_METRIC.fullmatch(name)
    greedy = GREEDY_METRIC.fullmatch(name) or ANSWER_GREEDY_METRIC.fullmatch(name)
    sampled = SAMPLED_METRIC.fullmatch(name) or ANSWER_SAMPLED_METRIC.fullmatch(name)
    if not (greedy or sampled or SET_METRIC.fullmatch(name)):
        return f"unknown metric {metric!r} (allowed: {ALLOWED})"
    if set_name not in ev.eval_sets:
        allowed = ", ".join(ev.eval_sets) or "none, evaluation.eval_sets is empty"
        return f"eval set {set_name!r} of {metric!r} is not evaluated (evaluation.eval_sets; allowed: {allowed})"
    if answer and set_name not in ev.answers:
        allowed = ", ".join(ev.answers) or "none, evaluation.answers is empty"
        return (f"{metric!r} is an answer-checking metric and eval set {set_name!r} has no answer rule "
                f"(evaluation.answers; sets with one: {allowed})")
    if greedy and not ev.greedy:
        return f"{metric!r} is a greedy metric and evaluation.greedy is false (allowed: true)"
    if sampled and not ev.sample_seeds:
        return f"{metric!r} is a sampled metric and evaluation.sample_seeds is empty (give seeds, e.g. [0])"
    if sampled and sampled.re is ANSWER_SAMPLED_METRIC and sampled.group(2) is not None \
            and int(sampled.group(2)) not in ev.pass_ks:
        return f"{metric!r}: pass@{sampled.group(2)} is not computed (allowed k: {', '.join(map(str, ev.pass_ks))})"
    return _split_problem(cfg, set_name, metric) if set_name == "test" else None


def _split_problem(cfg: PipelineConfigLike, split: str, metric: str) -> str | None:
    fraction = getattr(cfg.data.split, f"{split}_fraction")
    if fraction > 0:
        return None
    return f"{metric!r} needs a {split} split and data.split.{split}_fraction is 0 (allowed: > 0)"


def _agreement_problem(cfg: PipelineConfigLike, name: str, metric: str) -> str | None:
    ev = cfg.evaluation
    served = cfg.is_served(cfg.teacher.name)
    if served != bool(SERVED_METRIC.fullmatch(name)) and not name.startswith("top1_agreement"):
        return (f"{metric!r}: the teacher is served by another process (teacher.model.endpoint): its students get "
                f"test/top1_agreement[_tokens] and test/kl_teacher_student_topk only" if served else
                f"{metric!r}: only with a teacher served by another process (teacher.model.endpoint; allowed: "
                f"test/kl_teacher_student)")
    if bucket := UNC_METRIC.fullmatch(name):
        if int(bucket.group(1)) >= ev.unc_buckets:
            return (f"{metric!r}: evaluation.unc_buckets is {ev.unc_buckets} "
                    f"(allowed: unc_bucket0 to unc_bucket{ev.unc_buckets - 1})")
    if length := EXACCERR_METRIC.fullmatch(name):
        if not ev.exaccerr_prompts:
            return f"{metric!r}: evaluation.exaccerr_prompts is 0, ExAccErr is off (allowed: > 0)"
        if int(length.group(1)) not in ev.exaccerr_lengths:
            allowed = ", ".join(str(n) for n in ev.exaccerr_lengths) or "none, evaluation.exaccerr_lengths is empty"
            return f"{metric!r}: {length.group(1)} is not in evaluation.exaccerr_lengths (allowed: {allowed})"
    return None
