"""The headline metrics against independent computations (issue 14, "What to build" 2):

- validation loss / perplexity against a hand loop over token log-probs;
- ROUGE-L and exact match, per pair and as aggregated by evaluation, against `rouge_score` called directly;
- the paired bootstrap against `scipy.stats` at a moderate effect, and calibrated under the null;
- both samplers (on-policy `rollouts.sample`, evaluation `generation.generate`) by a chi-square
  goodness-of-fit test, with wrong-temperature negative controls.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from kd_core.data.tokenize import IGNORE_INDEX, EncodedDataset, EncodedExample

V = 8  # vocabulary of the tiny models
EOS, PAD = V - 1, 0


def tiny_gpt2(seed: int = 0, fixed_logits: torch.Tensor | None = None):
    """A 1-layer GPT-2 built from a config. With `fixed_logits`, every position's next-token logits are exactly
    that vector (final layer norm weight 0, bias = e_0; column 0 of the tied embedding = the logits)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=EOS,
                     eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        if fixed_logits is None:
            model.transformer.wte.weight.mul_(40.0)  # logits far from uniform
        else:
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.zero_()
            model.transformer.ln_f.bias[0] = 1.0
            model.lm_head.weight[:, 0] = fixed_logits
    return model


# ----------------------------------------------------------------------------------------------- validation loss
def test_validation_loss_equals_a_hand_loop_over_token_logprobs():
    from kd_core.evaluation.run import validation_loss

    model = tiny_gpt2(seed=1)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n_prompt, n_resp in [(3, 2), (1, 5), (4, 1), (2, 6), (5, 3)]:  # uneven lengths: padding in every batch
        ids = torch.randint(1, V, (n_prompt + n_resp,), generator=g).tolist()
        examples.append(EncodedExample(ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]))
    got = validation_loss(model, EncodedDataset(examples), pad_id=PAD, batch_size=2)

    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one unpadded row at a time, float64 log-softmax, explicit loops
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].double()
            for t in range(1, len(ex.input_ids)):
                if ex.labels[t] == IGNORE_INDEX:
                    continue
                row = [float(x) for x in logits[t - 1]]
                log_z = math.log(sum(math.exp(x - max(row)) for x in row)) + max(row)
                total -= row[ex.input_ids[t]] - log_z
                count += 1
    want = total / count
    assert count == 17
    assert got == pytest.approx(want, abs=1e-6, rel=1e-6)
    assert math.exp(got) == pytest.approx(math.exp(want), rel=1e-6)  # ppl = exp(loss) (evaluate_model)
    assert want > 0.5  # the model is far from predicting the data: a non-trivial comparison


# ----------------------------------------------------------------------------------------------- ROUGE-L / EM
PAIRS = [  # (prediction, reference, exact match by hand)
    ("The cat sat on the mat.", "the cat sat on the mat", 1.0),
    ("Paris", "Paris is the capital of France.", 0.0),
    ("", "a reference", 0.0),
    ("a prediction", "", 0.0),
    ("", "", 1.0),
    ("Running runners ran. They run again! Then they stopped running.",
     "The runner runs. Later, they ran again and stopped.", 0.0),
    ("  Answer:   42 !", "answer: 42", 1.0),
    ("Jumped over the lazy dogs", "the quick brown fox jumps over the lazy dog", 0.0),
]


def _reference_rouge_l(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer  # built here, not through kd_core's cache

    return 100.0 * rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure


def test_rouge_l_and_exact_match_per_pair_match_rouge_score():
    from kd_core.evaluation.text_metrics import exact_match, rouge_l

    preds, refs, ems = zip(*PAIRS)
    got = rouge_l(list(preds), list(refs))
    want = [_reference_rouge_l(p, r) for p, r in zip(preds, refs)]
    assert got == pytest.approx(want, abs=1e-9)
    assert got[2] == got[3] == got[4] == 0.0 and got[0] == 100.0 and 0 < got[5] < 100
    assert [exact_match(p, r) for p, r in zip(preds, refs)] == list(ems)
    # several references: the best one
    assert rouge_l(["the cat"], [["a dog", "the cat sat"]]) == pytest.approx([_reference_rouge_l("the cat", "the cat sat")])


def test_generation_metrics_aggregate_rouge_and_em_like_rouge_score(tmp_path, monkeypatch):
    """`_generation_metrics` with a scripted generator: the set's ROUGE-L / EM are the means over prompts (and,
    sampled, the mean over seeds of those means) of rouge_score's per-pair F-measure x 100."""
    import kd_core.evaluation.run as run
    from kd_core.config import parse_config
    from kd_core.generation import Generations
    from kd_core.io import read_jsonl
    from tests.conftest import tiny_params

    preds, refs, ems = (list(x) for x in zip(*PAIRS))
    rows = [{"id": f"r{i}", "instruction": f"q{i}", "context": "", "response": r} for i, r in enumerate(refs)]
    outputs = {None: preds, 0: preds[1:] + preds[:1], 1: preds[::-1]}  # greedy, seed 0, seed 1

    def fake_generate(model, tokenizer, prompts, *, do_sample, seed=0, **kw):
        assert len(prompts) == len(rows)
        texts = outputs[seed if do_sample else None]
        return Generations([[1]] * len(texts), texts, len(texts), 1.0)

    monkeypatch.setattr(run, "generate", fake_generate)
    params = tiny_params()
    params["evaluation"].update(greedy=True, sample_seeds=[0, 1])
    cfg = parse_config(params)
    tok = lambda text, add_special_tokens=True: {"input_ids": [1, 2, 3]}  # noqa: E731
    metrics = run._generation_metrics(cfg, None, tok, "test", rows, tmp_path / "gen.jsonl")

    ref_rouge = {k: [_reference_rouge_l(p, r) for p, r in zip(v, refs)] for k, v in outputs.items()}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert metrics["test/rougeL_greedy"] == pytest.approx(mean(ref_rouge[None]), abs=1e-9)
    assert metrics["test/exact_match_greedy"] == pytest.approx(100 * mean(ems))
    assert metrics["test/rougeL_sampled_mean"] == pytest.approx(mean([mean(ref_rouge[0]), mean(ref_rouge[1])]))
    per_seed_em = [100 * mean([float(p.strip().lower().rstrip("!. ") == r.lower().rstrip(".")) for p, r in
                                zip(outputs[s], refs)]) for s in (0, 1)]
    assert metrics["test/exact_match_sampled_mean"] == pytest.approx(mean(per_seed_em))
    sampled_std = float(np.std([mean(ref_rouge[0]), mean(ref_rouge[1])], ddof=1))
    assert metrics["test/rougeL_sampled_std"] == pytest.approx(sampled_std)
    per_prompt = read_jsonl(tmp_path / "gen.jsonl")
    assert [p["rougeL_sampled_mean"] for p in per_prompt] == pytest.approx(
        [(a + b) / 2 for a, b in zip(ref_rouge[0], ref_rouge[1])])
    assert [p["rougeL_greedy"] for p in per_prompt] == pytest.approx(ref_rouge[None])
    # 95 % intervals: percentile bootstrap over prompts of the per-prompt (seed-averaged) scores, seed = cfg.seed
    from kd_core.evaluation.stats import bootstrap_mean

    for key, per in (("rougeL_sampled_mean", [p["rougeL_sampled_mean"] for p in per_prompt]),
                     ("rougeL_greedy", ref_rouge[None])):
        b = bootstrap_mean(per, seed=cfg.seed)
        base = key.removesuffix("_mean")
        assert (metrics[f"test/{base}_ci_low"], metrics[f"test/{base}_ci_high"]) == (b["ci_low"], b["ci_high"])
        assert b["ci_low"] < metrics[f"test/{key}"] < b["ci_high"]


def test_several_references_score_the_best_one_and_set_the_budget(tmp_path, monkeypatch):
    """A multi-reference eval set: per prompt, ROUGE-L is rouge_score's best over the references and EM is
    'any'; the references' token-length percentiles are numpy's over per-prompt longest references; with
    generation.reference_percentile = 90 the new-token budget is ceil(p90) + 1, capped at max_new_tokens."""
    import kd_core.evaluation.run as run
    from kd_core.config import parse_config
    from kd_core.generation import Generations
    from tests.conftest import tiny_params

    refs = [["the cat sat on the mat", "a cat sat"], ["yes"], "one two three four five six seven", ["no", "nope"]]
    preds = ["a cat sat", "Yes.", "one two three", "maybe"]
    rows = [{"id": f"r{i}", "instruction": f"q{i}", "response": r} for i, r in enumerate(refs)]
    budgets = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, **kw):
        budgets.append(max_new_tokens)
        return Generations([[1]] * len(preds), preds, len(preds), 1.0)

    monkeypatch.setattr(run, "generate", fake_generate)
    tok = lambda text, add_special_tokens=True: {"input_ids": text.split()}  # noqa: E731  (a word per token)
    params = tiny_params()
    params["evaluation"].update(greedy=True, sample_seeds=[0])
    params["evaluation"]["generation"].update(max_new_tokens=6, reference_percentile=90)
    metrics = run._generation_metrics(parse_config(params), None, tok, "s", rows, tmp_path / "gen.jsonl")

    best = [max(_reference_rouge_l(p, r) for r in ([ref] if isinstance(ref, str) else ref))
            for p, ref in zip(preds, refs)]
    assert best[0] == 100.0 and best[2] < 100.0  # the second reference is the one that matches
    assert metrics["s/rougeL_greedy"] == pytest.approx(sum(best) / 4)
    assert metrics["s/exact_match_greedy"] == pytest.approx(100 * 2 / 4)  # "a cat sat", "Yes." match one reference
    lengths = [6, 1, 7, 1]  # per prompt, its longest reference in words
    for q in (50, 90, 95):
        assert metrics[f"s/ref_tokens_p{q}"] == pytest.approx(float(np.percentile(lengths, q)))
    assert metrics["s/ref_tokens_max"] == 7 and metrics["s/n_prompts"] == 4
    assert math.ceil(np.percentile(lengths, 90)) + 1 == 8  # over the cap: the cap
    assert metrics["s/max_new_tokens"] == 6 and budgets == [6, 6]
    params["evaluation"]["generation"].update(max_new_tokens=32, reference_percentile=50)
    budgets.clear()
    metrics = run._generation_metrics(parse_config(params), None, tok, "s", rows, tmp_path / "gen.jsonl")
    assert metrics["s/max_new_tokens"] == math.ceil(np.percentile(lengths, 50)) + 1 == 5 and budgets == [5, 5]


# ----------------------------------------------------------------------------------------------- paired bootstrap
@pytest.fixture
def draw_sizes(monkeypatch):
    """The shapes of the index draws `paired_bootstrap` makes (one per chunk)."""
    sizes: list[tuple[int, int]] = []
    real = np.random.default_rng

    class Spy:
        def __init__(self, seed):
            self._rng = real(seed)

        def integers(self, low, high, size):
            sizes.append(tuple(size))
            return self._rng.integers(low, high, size=size)

        def __getattr__(self, name):  # the test's own data draws
            return getattr(self._rng, name)

    import kd_core.evaluation.stats as st

    monkeypatch.setattr(st.np.random, "default_rng", Spy)
    return sizes


def test_paired_bootstrap_agrees_with_paired_t_test_at_a_moderate_effect(draw_sizes):
    """n = 200 pairs, true shift 0.2 sd of the differences (t ~ 2.8), the production resample count (10 000,
    two chunks at n = 200). Tolerance: the two-sided p-values agree within 0.2 on the normal-quantile scale
    (|z_boot - z_t| < 0.2: Monte-Carlo error of 10 000 resamples at p ~ 0.01 is ~0.04 there, the bootstrap's
    normal vs Student-t tails and ddof=0 spread add ~0.05), and the 95 % percentile interval's ends are within
    5 % of the t interval's width of the t interval's ends."""
    from kd_core.evaluation.stats import paired_bootstrap

    z = lambda p: stats.norm.isf(p / 2)  # noqa: E731
    for k in range(5):
        rng = np.random.default_rng(100 + k)
        a = rng.normal(size=200)
        b = a + rng.normal(size=200) + 0.2
        draw_sizes.clear()
        got = paired_bootstrap(a, b, seed=k)
        assert len(draw_sizes) >= 2 and sum(s[0] for s in draw_sizes) == 10_000  # the chunked path
        t = stats.ttest_rel(b, a)
        ci = t.confidence_interval(0.95)
        assert got["mean_diff"] == pytest.approx(float(np.mean(b - a)))
        assert 0.001 < t.pvalue < 0.3  # moderate: neither the p = 1 nor the 18-sigma extreme
        assert abs(z(got["p_value"]) - z(t.pvalue)) < 0.2, (got["p_value"], t.pvalue)
        width = ci.high - ci.low
        assert abs(got["ci_low"] - ci.low) < 0.05 * width and abs(got["ci_high"] - ci.high) < 0.05 * width


def test_paired_bootstrap_is_calibrated_under_the_null(draw_sizes):
    """200 null data sets of n = 50 pairs (b = a + noise): the p-values are roughly uniform. Bounds: the
    fraction below 0.05 in [0.01, 0.10] (a binomial(200, 0.05) lies there with probability > 0.99) and a KS
    test against U(0, 1) with p > 0.01. Each call resamples just over two chunks' worth (the chunk is
    1e6 // n rows of the index matrix), so the chunked path is the one tested."""
    from kd_core.evaluation.stats import paired_bootstrap

    n, resamples = 50, 1_000_000 // 50 + 500
    rng = np.random.default_rng(1)
    p_values = []
    for k in range(200):
        a = rng.normal(size=n)
        b = a + rng.normal(size=n)
        p_values.append(paired_bootstrap(a, b, n_resamples=resamples, seed=k)["p_value"])
    assert len(draw_sizes) >= 400 and {s[1] for s in draw_sizes} == {n}
    p_values = np.array(p_values)
    assert 0.01 <= float(np.mean(p_values < 0.05)) <= 0.10
    assert stats.kstest(p_values, "uniform").pvalue > 0.01


# ----------------------------------------------------------------------------------------------- samplers
LOGITS = torch.tensor([1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.8, -0.2])  # last one: EOS
PROMPT = [3, 1, 4, 1, 5]
N_DRAWS, T = 2000, 0.7


def _chi2_p(counts: np.ndarray, logits: torch.Tensor, temperature: float, masked: tuple[int, ...] = ()) -> float:
    """Goodness of fit of `counts` to softmax(logits / temperature), the `masked` ids removed and the rest
    renormalised (a sampler that masks them must never draw them)."""
    keep = np.array([i not in masked for i in range(len(counts))])
    assert counts[~keep].sum() == 0
    expected = torch.softmax(logits.double()[keep] / temperature, -1).numpy() * counts.sum()
    assert expected.min() >= 5  # the chi-square approximation holds
    return float(stats.chisquare(counts[keep], expected).pvalue)


def _model_and_its_logits():
    model = tiny_gpt2(fixed_logits=LOGITS)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT])).logits[0, -1].double()
    assert torch.allclose(logits, LOGITS.double(), atol=1e-5)  # the distribution is the one we built
    return model, logits


def _check_first_tokens(first: list[int], logits: torch.Tensor, temperature: float = T,
                        masked: tuple[int, ...] = ()) -> None:
    counts = np.bincount(first, minlength=V)
    assert counts.sum() == N_DRAWS
    assert _chi2_p(counts, logits, temperature, masked) > 0.001
    # negative controls: 25 % too hot, 20 % too cold
    assert _chi2_p(counts, logits, 1.25 * temperature, masked) < 0.001
    assert _chi2_p(counts, logits, 0.8 * temperature, masked) < 0.001


def test_on_policy_sampler_draws_from_softmax_at_its_temperature():
    from kd_core.methods.rollouts import sample

    model, logits = _model_and_its_logits()
    gen = sample([(model, 1.0)], [PROMPT] * N_DRAWS, max_new_tokens=1, eos_token_id=EOS, pad_token_id=PAD,
                 temperature=T, generator=torch.Generator().manual_seed(1), static_cache=False)
    first = [toks[0] if toks else EOS for toks in gen.tokens]
    assert all(ended == (not toks) for toks, ended in zip(gen.tokens, gen.ended))
    _check_first_tokens(first, logits)


def test_evaluation_sampler_draws_from_softmax_at_its_temperature():
    from kd_core.generation import generate

    model, logits = _model_and_its_logits()
    tok = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, batch_decode=lambda ids, **kw: [""] * len(ids))
    gen = generate(model, tok, [PROMPT] * N_DRAWS, max_new_tokens=1, do_sample=True, temperature=T, top_p=1.0,
                   seed=0, batch_size=500)
    first = [ids[0] if ids else EOS for ids in gen.token_ids]  # generate cuts the EOS off
    _check_first_tokens(first, logits)


def test_exposure_bias_sampler_draws_from_softmax_at_temperature_one_without_eos_or_masked_ids():
    """ExAccErr's prefixes (`sample_prefixes`): ancestral sampling at T = 1 with EOS and the ids >= vocab_limit
    masked and the rest renormalised; the first token of 2000 prefixes fits that distribution (chi-square) and
    not one 25 % hotter or 20 % colder."""
    from kd_core.evaluation.exposure_bias import sample_prefixes

    model, logits = _model_and_its_logits()
    prefixes = sample_prefixes(model, [PROMPT] * N_DRAWS, 2, seed=3, pad_token_id=PAD, eos_token_id=EOS,
                               batch_size=500, vocab_limit=V - 2)
    assert all(len(p) == 2 for p in prefixes)
    _check_first_tokens([p[0] for p in prefixes], logits, temperature=1.0, masked=(V - 2, EOS))
