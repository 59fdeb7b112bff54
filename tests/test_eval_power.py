"""The evaluation's power and protocol (issue 15): bootstrap intervals over prompts, the minimal detectable
difference of a paired comparison, the paired test's power fields, top-1 agreement as OKD eq. 3 against the
token-pooled one, and exact match with several references. Each against a closed form or an independent
computation (scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kd_core.evaluation.stats import bootstrap_mean, min_detectable_difference, paired_bootstrap
from kd_core.evaluation.teacher_forcing import TokenStats, top1_agreement, top1_agreement_tokens
from kd_core.evaluation.text_metrics import exact_match, references


# ----------------------------------------------------------------------------------------------- bootstrap_mean
def _rouge_like(n: int, seed: int) -> np.ndarray:
    """Per-prompt scores shaped like ROUGE-L: a third exactly 0, the rest skewed over (0, 100]."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 1 / 3, 0.0, 100 * rng.beta(2, 5, size=n))


def test_bootstrap_mean_matches_scipy_percentile_bootstrap():
    """Skewed scores, n = 300: the interval's ends agree with scipy.stats.bootstrap (percentile method, its own
    RNG and resampling) within 5 % of the width (Monte-Carlo error of 10 000 resamples at the 2.5 % quantile is
    ~1 % of the width on each side)."""
    x = _rouge_like(300, 0)
    got = bootstrap_mean(x, seed=0)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=10_000, rng=np.random.default_rng(7))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert got["mean"] == pytest.approx(float(x.mean())) and got["n"] == 300
    assert abs(got["ci_low"] - ref.confidence_interval.low) < 0.05 * width
    assert abs(got["ci_high"] - ref.confidence_interval.high) < 0.05 * width
    assert got["ci_low"] < got["mean"] < got["ci_high"]


def test_bootstrap_mean_is_close_to_the_t_interval_for_normal_scores_and_deterministic():
    x = np.random.default_rng(3).normal(20.0, 8.0, size=500)
    got = bootstrap_mean(x, seed=5)
    t = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    width = t.high - t.low
    assert abs(got["ci_low"] - t.low) < 0.05 * width and abs(got["ci_high"] - t.high) < 0.05 * width
    assert bootstrap_mean(x, seed=5) == got  # a fixed seed: the same interval
    assert bootstrap_mean(x, seed=6) != got
    assert bootstrap_mean([4.0]) == {"mean": 4.0, "ci_low": 4.0, "ci_high": 4.0, "n": 1}
    with pytest.raises(ValueError):
        bootstrap_mean([1.0, float("nan")])


# ----------------------------------------------------------------------------------------------- power
def test_min_detectable_difference_closed_form_and_its_power():
    """MDE = (z_0.975 + z_0.8) * sd / sqrt(n); at that true difference a paired t-test (noncentral t, scipy)
    rejects with probability 0.80 (within 0.005 at n = 500)."""
    sd, n = 12.0, 500
    mde = min_detectable_difference(sd, n)
    assert mde == pytest.approx((1.959963984540054 + 0.8416212335729143) * sd / math.sqrt(n))
    df, nc = n - 1, mde * math.sqrt(n) / sd
    crit = stats.t.ppf(0.975, df)
    power = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
    assert power == pytest.approx(0.80, abs=0.005)
    assert min_detectable_difference(sd, 4 * n) == pytest.approx(mde / 2)  # 4x the prompts: half the MDE
    assert math.isnan(min_detectable_difference(sd, 1))


def test_paired_bootstrap_reports_the_sd_of_the_differences_and_their_mde():
    rng = np.random.default_rng(2)
    a = _rouge_like(400, 1)
    b = np.clip(a + rng.normal(1.0, 10.0, size=400), 0, 100)
    got = paired_bootstrap(a, b, n_resamples=2000)
    d = b - a
    assert got["sd_diff"] == pytest.approx(float(np.std(d, ddof=1)))
    assert got["mde"] == pytest.approx(2.8015852 * np.std(d, ddof=1) / math.sqrt(400), rel=1e-6)
    assert got["n"] == 400


# ----------------------------------------------------------------------------------------------- top-1 agreement
def _stats(agree: list[float], sentence: list[int]) -> TokenStats:
    n = len(agree)
    z = torch.zeros(n)
    return TokenStats(unc=z, kl=z, agree=torch.tensor(agree), student_logit_std=z, teacher_logit_std=z,
                      student_nll=z, sentence=torch.tensor(sentence, dtype=torch.long))


def test_top1_agreement_is_eq3_per_sentence_and_differs_from_the_pooled_one():
    """Sentence 0: 3 tokens, all agree (TA = 1); sentence 1: 1 token, no agreement (TA = 0). Eq. 3 averaged over
    sentences: (1 + 0) / 2 = 0.5; pooled over tokens: 3 / 4 = 0.75."""
    s = _stats([1, 1, 1, 0], [0, 0, 0, 1])
    assert top1_agreement(s) == pytest.approx(0.5)
    assert top1_agreement_tokens(s) == pytest.approx(0.75)
    # sentence indices need not be dense (a row without response tokens has none)
    assert top1_agreement(_stats([1, 1, 1, 0], [0, 0, 0, 3])) == pytest.approx(0.5)
    # three sentences of 1, 2 and 5 tokens with 1/1, 1/2, 1/5 agreeing: (1 + 0.5 + 0.2) / 3 vs 3 / 8
    s = _stats([1, 1, 0, 1, 0, 0, 0, 0], [0, 1, 1, 2, 2, 2, 2, 2])
    assert top1_agreement(s) == pytest.approx(1.7 / 3) and top1_agreement_tokens(s) == pytest.approx(3 / 8)
    assert math.isnan(top1_agreement(TokenStats.empty()))


def test_cat_renumbers_sentences_of_each_part():
    parts = [_stats([1, 1, 1], [0, 0, 0]), _stats([0], [0]), _stats([1, 0], [0, 1])]
    joined = TokenStats.cat(parts)
    assert joined.sentence.tolist() == [0, 0, 0, 1, 2, 3]
    assert top1_agreement(joined) == pytest.approx((1 + 0 + 1 + 0) / 4)


# ----------------------------------------------------------------------------------------------- references
def test_exact_match_with_several_references_is_any():
    assert exact_match("Paris.", ["London", "paris"]) == 1.0
    assert exact_match("Rome", ["London", "paris"]) == 0.0
    assert exact_match("paris", "Paris!") == 1.0  # one reference as a string
    assert references("a") == ["a"] and references(("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError):
        exact_match("a", [])


# ----------------------------------------------------------------------------------------------- the report
def test_compare_report_states_references_and_the_detectable_difference(tmp_path):
    """Per-prompt scores of three models on 500 prompts: each non-SFT model's paired test carries the MDE of
    its paired differences, the report's sentence names the largest, and the references' percentiles come
    from the teacher's metrics."""
    from kd_core.config import parse_config
    from kd_core.evaluation import compare
    from kd_core.io import write_json_atomic, write_jsonl_atomic
    from kd_core.run import RunPaths
    from tests.conftest import tiny_params

    params = tiny_params(run_dir=str(tmp_path / "run"))
    cfg = parse_config(params)
    paths = RunPaths.of(cfg)
    rng = np.random.default_rng(0)
    base = _rouge_like(500, 0)
    scores = {name: np.clip(base + shift + rng.normal(0, noise, 500), 0, 100)
              for name, shift, noise in (("sft", 0.0, 5.0), ("fkl", 3.0, 10.0), ("teacher", 8.0, 20.0))}
    for name, s in scores.items():
        write_jsonl_atomic(paths.generations(name) / "test.jsonl",
                           [{"id": f"p{i}", "rougeL_sampled_mean": float(v)} for i, v in enumerate(s)])
    refs = {"test/ref_tokens_p50": 2.0, "test/ref_tokens_p90": 5.0, "test/ref_tokens_p95": 7.4,
            "test/ref_tokens_max": 14, "test/max_new_tokens": 9}
    write_json_atomic(paths.metrics("teacher"), refs | {"val/loss": 1.0})

    paired = {p["model"]: p for p in compare.paired_vs_sft(cfg, paths, "test")}
    assert set(paired) == {"teacher", "fkl"}
    for name, p in paired.items():
        d = scores[name] - scores["sft"]
        assert p["mde"] == pytest.approx(min_detectable_difference(float(np.std(d, ddof=1)), 500))
    assert paired["teacher"]["mde"] > paired["fkl"]["mde"]  # noisier differences: a larger MDE
    # the sentence is about the students: the teacher's (larger) MDE is in its row, not in the sentence
    mde = compare.detectable([p for p in paired.values() if p["model"] in cfg.students])
    assert mde == paired["fkl"]["mde"]
    md = "\n".join(compare._paired_section("test", list(paired.values()), mde))
    assert f"This run can detect differences of ≥ {paired['fkl']['mde']:.2f} ROUGE-L points" in md
    assert f"| teacher | 500 | {paired['teacher']['mean_diff']:+.2f} |" in md
    assert compare.reference_lengths(cfg, paths, "test") == {k.split("/")[1]: v for k, v in refs.items()}
    assert compare._reference_line(compare.reference_lengths(cfg, paths, "test")) == [
        "", "References: p50 2, p90 5, p95 7, max 14 tokens; generated with up to 9 new tokens."]


def test_format_metric_shows_the_interval_of_means_and_of_greedy_metrics():
    from kd_core.evaluation.compare import format_metric

    m = {"t/rougeL_sampled_mean": 10.0, "t/rougeL_sampled_ci_low": 9.0, "t/rougeL_sampled_ci_high": 11.5,
         "t/rougeL_greedy": 8.0, "t/rougeL_greedy_ci_low": 7.25, "t/rougeL_greedy_ci_high": 9.0, "val/ppl": 3.0}
    assert format_metric(m, "t/rougeL_sampled_mean", "{:.2f}") == "10.00 [9.00, 11.50]"
    assert format_metric(m, "t/rougeL_greedy", "{:.2f}") == "8.00 [7.25, 9.00]"
    assert format_metric(m, "val/ppl", "{:.2f}") == "3.00" and format_metric(m, "x", "{}") == "–"


def test_each_student_is_paired_with_the_sft_student_of_its_size(tmp_path):
    """With SFT students of two sizes, a KD student is compared with the SFT student of the same model settings;
    the teacher and a student of a size without its own SFT student with the first SFT student."""
    from kd_core.config import parse_config
    from kd_core.evaluation import compare
    from kd_core.io import write_jsonl_atomic
    from kd_core.run import RunPaths
    from tests.conftest import TINY_MODEL, TINY_TRAINING, tiny_params

    big = {"config": dict(TINY_MODEL["config"], n_layer=TINY_MODEL["config"]["n_layer"] + 1)}
    params = tiny_params(run_dir=str(tmp_path / "run"))
    params["students"].update(
        sft_big={"method": "sft", "teacher": "teacher", "train_data": "train", "model": big, "training": TINY_TRAINING},
        fkl_big={"method": "kd", "teacher": "teacher", "train_data": "train", "model": big, "training": TINY_TRAINING},
        fkl_big2={"method": "kd", "teacher": "fkl", "train_data": "train", "model": big, "training": TINY_TRAINING})
    cfg = parse_config(params)
    assert {n: compare.sft_baseline(cfg, n) for n in ["teacher", *cfg.students]} == {
        "teacher": "sft", "sft": "sft", "fkl": "sft", "sft_big": "sft_big", "fkl_big": "sft_big", "fkl_big2": "sft_big"}

    paths = RunPaths.of(cfg)
    shift = {"sft": 0.0, "fkl": 1.0, "sft_big": 10.0, "fkl_big": 12.0, "fkl_big2": 9.0, "teacher": 20.0}
    for name, s in shift.items():
        write_jsonl_atomic(paths.generations(name) / "test.jsonl",
                           [{"id": f"p{i}", "rougeL_sampled_mean": float(i % 7 + s)} for i in range(40)])
    paired = {p["model"]: p for p in compare.paired_vs_sft(cfg, paths, "test")}
    assert {m: (p["vs"], round(p["mean_diff"], 6)) for m, p in paired.items()} == {
        "teacher": ("sft", 20.0), "fkl": ("sft", 1.0), "fkl_big": ("sft_big", 2.0), "fkl_big2": ("sft_big", -1.0)}
    assert compare.sft_baseline(parse_config(tiny_params(students={"fkl": params["students"]["fkl"]})), "fkl") is None

    # the registry rows of the run (the table's "vs SFT" column) follow the same rule
    key, fp = "pinned/rougeL_sampled_mean", cfg.fingerprint()
    rows = [{"tags": {"kd.params_hash": fp, "kd.role": "student", "kd.model": name, "kd.method": cfg.students[name].method},
             "metrics": {key: shift[name]}} for name in cfg.students]
    assert {v["model"]: v["delta"] for v in compare._vs_sft(cfg, rows, key)} == {
        "fkl": 1.0, "fkl_big": 2.0, "fkl_big2": -1.0}
