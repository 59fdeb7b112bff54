"""Transfer-set strategies (issues 14 and 17): `augment` and `confidence` do what they claim; confidence over the
labeled rows (`rank`); hard-example mining; input augmentation by paraphrase. Selections are checked against
log-probabilities computed here by hand, one row at a time, from the template, the tokenizer and the model."""

from __future__ import annotations

import pytest
import torch

from kd_core.config import ConfigError, load_config, parse_config
from kd_core.data.template import format_prompt
from kd_core.io import read_jsonl
from kd_core.run import RunPaths, load_model, load_run_tokenizer
from tests.conftest import tiny_params, write_params

GEN = {"source": "teacher", "n_samples": 2, "max_new_tokens": 6}  # sampled: the generations differ per seed
SETS = {
    "gen": dict(GEN),
    "conf": dict(GEN, strategy="confidence", keep_fraction=0.5),
    "conf_orig": {"strategy": "confidence", "rank": "original", "keep_fraction": 0.25},
    "conf_both": dict(GEN, strategy="confidence", rank="both", keep_fraction=0.3),
    "aug": dict(GEN, strategy="augment"),
    "hard": {"strategy": "hard_examples", "keep_fraction": 0.2},
    "hard_both": {"strategy": "hard_examples", "keep_fraction": 0.2, "answers": "both", "max_new_tokens": 6},
    "hard_gap": {"source": "sft", "strategy": "hard_examples", "hardness": "gap", "keep_fraction": 0.2},
    "para": {"strategy": "paraphrase", "prompts": "both", "n_paraphrases": 2, "max_new_tokens": 6},
    "para_fake": {"strategy": "paraphrase", "prompts": "both", "n_paraphrases": 2,
                  "paraphrase_instruction": "Say differently: {instruction}"},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, empty_stores):
    """A prepared run with a trained tiny teacher and the `sft` student (240 built-in rows, 30 unlabeled prompts) and
    the sets above."""
    import mlflow

    from kd_core.stages.distill import distill
    from kd_core.stages.finetune import finetune
    from kd_core.stages.prepare import prepare
    from kd_core.stages.train_teacher import train_teacher

    folder = tmp_path_factory.mktemp("transfer")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        uri = f"sqlite:///{empty_stores.seed_mlflow(folder / 'mlflow.db')}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        params = tiny_params(transfer_sets=SETS)
        params["data"]["builtin_unlabeled"] = 30
        cfg = load_config(write_params(folder, params))
        paths = RunPaths.of(cfg)
        prepare(cfg, paths)
        train_teacher(cfg, paths)
        distill(cfg, paths, "sft")
        finetune(cfg, paths, "sft")
        yield cfg, paths
        mlflow.set_tracking_uri(None)


def _make(run, name: str) -> tuple[list[dict], dict]:
    from kd_core.stages.transfer import transfer

    cfg, paths = run
    info = transfer(cfg, paths, name)
    return read_jsonl(paths.split(name)), info


def _split(run, name: str) -> list[dict]:
    return read_jsonl(run[1].split(name))


@pytest.fixture(scope="module")
def hand_score(run):
    """Mean log-probability of a row's response tokens and EOS under the teacher, computed for the row alone."""
    return _hand_scorer(run, "teacher")


def _hand_scorer(run, name: str):
    """Row -> the mean log-probability of its response tokens and EOS under model `name`, the row alone."""
    cfg, paths = run
    model, tokenizer = load_model(paths, name).eval(), load_run_tokenizer(paths)

    @torch.no_grad()
    def score(row: dict) -> float | None:
        prompt = tokenizer(format_prompt(row, cfg.data.template))["input_ids"]
        ids = prompt + tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[:cfg.tokenizer.max_length]
        if len(prompt) >= len(ids):
            return None
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        return sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))) / (len(ids) - len(prompt))
    return score


def _ranked(rows: list[dict], score, fraction: float, *, lowest: bool) -> list[str]:
    """Ids of the round(fraction * n) rows with the highest (lowest) hand score, in their original order."""
    scored = [(s, i) for i, r in enumerate(rows) if (s := score(r)) is not None]
    scored.sort(key=lambda si: (si[0] if lowest else -si[0], si[1]))
    return [rows[i]["id"] for _, i in sorted(scored[:max(1, round(fraction * len(rows)))], key=lambda si: si[1])]


# ----------------------------------------------------------------------------------------------- selection
def test_select_keeps_the_k_best_or_hardest_rows():
    from kd_core.data.transfer_strategies import select

    rows = [{"id": c} for c in "abcde"]
    scores = {0: -1.0, 1: -0.5, 2: -3.0, 3: -0.5, 4: -2.0}
    # k = round(0.5 * 5) = 2 (half to even); ties go to the earlier row; the kept rows keep their order
    assert [r["id"] for r in select(rows, scores, 0.5)] == ["b", "d"]
    assert [r["id"] for r in select(rows, scores, 0.5, lowest=True)] == ["c", "e"]
    assert [r["id"] for r in select(rows, scores, 0.7)] == ["a", "b", "d", "e"]  # k = round(3.5) = 4
    assert [r["id"] for r in select(rows, {0: -1.0, 2: -3.0}, 0.8, lowest=True)] == ["a", "c"]  # unscored: out
    assert [r["id"] for r in select(rows, scores, 0.01)] == ["b"]  # at least one row


# ----------------------------------------------------------------------------------------------- config
def _error(params: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    return str(err.value)


@pytest.mark.parametrize("ts, message", [
    ({"strategy": "hard"}, "transfer_sets.t.strategy: Input should be 'generated', 'confidence', 'augment', "
                           "'hard_examples' or 'paraphrase' (got 'hard')"),
    ({"strategy": "confidence", "rank": "labeled"},
     "transfer_sets.t.rank: Input should be 'generated', 'original' or 'both' (got 'labeled')"),
    ({"rank": "original"}, "transfer_sets.t.rank: only with strategy 'confidence' (strategy is 'generated')"),
    ({"strategy": "augment", "keep_fraction": 0.5},
     "transfer_sets.t.keep_fraction: only with strategy 'confidence' or 'hard_examples' (strategy is 'augment')"),
    ({"strategy": "confidence", "answers": "both"},
     "transfer_sets.t.answers: only with strategy 'hard_examples' (strategy is 'confidence')"),
    ({"strategy": "hard_examples", "answers": "teacher"},
     "transfer_sets.t.answers: Input should be 'reference', 'generated' or 'both' (got 'teacher')"),
    ({"strategy": "hard_examples", "prompts": "unlabeled"},
     "transfer_sets.t.prompts: strategy 'hard_examples' ranks the labeled train rows by their references "
     "(allowed: train; got 'unlabeled')"),
    ({"strategy": "confidence", "rank": "original", "prompts": "both"},
     "transfer_sets.t.prompts: rank 'original' ranks the labeled train rows"),
    ({"strategy": "hard_examples", "keep_fraction": 0}, "transfer_sets.t.keep_fraction: Input should be greater than 0"),
    ({"strategy": "hard_examples", "keep_fraction": "0.5"}, "transfer_sets.t.keep_fraction: Input should be a valid number"),
    ({"strategy": "paraphrase", "n_paraphrases": 2.0}, "transfer_sets.t.n_paraphrases: Input should be a valid integer"),
    ({"strategy": "paraphrase", "n_paraphrases": 0}, "transfer_sets.t.n_paraphrases: Input should be greater than or equal to 1"),
    ({"strategy": "paraphrase", "n_paraphrases": 3, "greedy": True},
     "transfer_sets.t.n_paraphrases: 3 with greedy: true would repeat one paraphrase"),
    ({"strategy": "paraphrase", "paraphrase_instruction": "Rephrase."},
     "transfer_sets.t.paraphrase_instruction: must contain '{instruction}' exactly once"),
    ({"strategy": "paraphrase", "paraphrase_instruction": 7}, "transfer_sets.t.paraphrase_instruction: Input should be a valid string"),
    ({"strategy": "generated", "n_paraphrases": 2}, "transfer_sets.t.n_paraphrases: only with strategy 'paraphrase'"),
])
def test_strategy_keys_are_validated_without_coercion(ts, message):
    params = tiny_params(transfer_sets={"t": ts})
    params["data"]["builtin_unlabeled"] = 10
    msg = _error(params)
    assert message in msg and "\n" not in msg.strip()


def test_valid_strategy_settings_parse():
    params = tiny_params(transfer_sets=SETS)
    params["data"]["builtin_unlabeled"] = 10
    sets = parse_config(params).transfer_sets
    assert sets["hard_both"].answers == "both" and sets["conf_orig"].rank == "original"
    assert sets["para"].n_paraphrases == 2 and "{instruction}" in sets["para"].paraphrase_instruction
    assert sets["hard"].keep_fraction == 0.2 and sets["gen"].rank == "generated"


# ----------------------------------------------------------------------------------------------- issue 14
def test_augment_is_the_labeled_rows_then_n_samples_answers_per_train_prompt(run):
    rows, info = _make(run, "aug")
    train = _split(run, "train")
    by_id = {r["id"]: r for r in train}
    assert rows[:len(train)] == train  # the labeled rows, references untouched, first
    answers = rows[len(train):]
    assert len(answers) == 2 * len(train) - info["empty_generations"] > len(train)
    for k in range(2):  # sample k of every prompt, in train order
        ids = [r["id"] for r in answers if r["id"].endswith(f"~aug{k}")]
        assert ids == [f"{r['id']}~aug{k}" for r in train if f"{r['id']}~aug{k}" in ids]
    for row in answers:
        source = by_id[row["id"].rpartition("~")[0]]
        assert {k: v for k, v in row.items() if k not in ("id", "response", "generated_by")} == \
            {k: v for k, v in source.items() if k not in ("id", "response")}  # the same prompt
        assert row["response"] and row["generated_by"] == "teacher"
    assert info["rows"] == len(rows) and info["labeled_rows"] == len(train) and info["prompts"] == len(train)


def test_confidence_keeps_exactly_the_most_confident_generations(run, hand_score):
    generated, _ = _make(run, "gen")  # the same settings and seeds as `conf`: the same generations
    kept, info = _make(run, "conf")
    as_conf = [dict(r, id=r["id"].replace("~gen", "~conf")) for r in generated]
    best = _ranked(as_conf, hand_score, 0.5, lowest=False)
    assert [r["id"] for r in kept] == best and len(best) == round(0.5 * len(generated))
    assert best != _ranked(as_conf, hand_score, 0.5, lowest=True)[: len(best)]
    by_id = {r["id"]: r for r in as_conf}
    assert kept == [by_id[i] for i in best] and info["labeled_rows"] == 0


def test_confidence_over_the_original_rows(run, hand_score):
    train = _split(run, "train")
    kept, info = _make(run, "conf_orig")
    best = _ranked(train, hand_score, 0.25, lowest=False)
    assert kept == [r for r in train if r["id"] in best] and len(kept) == round(0.25 * len(train))
    assert info["labeled_rows"] == len(kept) and info["generated_tokens"] == 0  # nothing generated

    _make(run, "gen")
    both, info = _make(run, "conf_both")  # the labeled rows and the generations, ranked together
    candidates = train + [dict(r, id=r["id"].replace("~gen", "~conf_both")) for r in _split(run, "gen")]
    best = _ranked(candidates, hand_score, 0.3, lowest=False)
    assert [r["id"] for r in both] == best
    assert 0 < info["labeled_rows"] < len(both)  # both kinds made the cut at this seed


# ----------------------------------------------------------------------------------------------- hard examples
def test_hard_examples_are_exactly_the_rows_the_teacher_finds_least_likely(run, hand_score, monkeypatch):
    from kd_core.stages import transfer as transfer_stage

    train = _split(run, "train")
    hard, info = _make(run, "hard")
    hardest = _ranked(train, hand_score, 0.2, lowest=True)
    assert [r["id"] for r in hard] == hardest and hard == [r for r in train if r["id"] in hardest]
    assert len(hard) == round(0.2 * len(train)) and info["answered_prompts"] == 0
    scores = [hand_score(r) for r in hard]
    others = [s for r in train if r["id"] not in hardest and (s := hand_score(r)) is not None]
    assert max(scores) <= min(others)

    # answers: both: the hard rows, then the model's answers to those prompts (here a stand-in model)
    monkeypatch.setattr(transfer_stage.Writer, "_texts",
                        lambda self, rows, seed: [f"R{seed} {r['instruction']}" for r in rows])
    rows, info = _make(run, "hard_both")
    assert rows == hard + [dict(r, response=f"R0 {r['instruction']}", id=f"{r['id']}~hard_both0", generated_by="teacher")
                           for r in hard]
    assert info["labeled_rows"] == len(hard) and info["answered_prompts"] == len(hard)


def test_hard_examples_by_gap_are_the_rows_where_the_student_trails_its_teacher_most(run, hand_score):
    """`hardness: gap` (the source: the sft student): the rows with the lowest log p_sft(y|x) - log p_teacher(y|x)
    (mean over the response tokens), i.e. the largest student loss minus teacher loss; not the rows the student
    alone finds least likely."""
    train = _split(run, "train")
    student = _hand_scorer(run, "sft")

    def gap(row: dict) -> float | None:
        s, t = student(row), hand_score(row)
        return None if s is None or t is None else s - t

    hard, info = _make(run, "hard_gap")
    expected = _ranked(train, gap, 0.2, lowest=True)
    assert [r["id"] for r in hard] == expected and info["answered_prompts"] == 0
    assert expected != _ranked(train, student, 0.2, lowest=True)  # the teacher's term changes the selection


def test_hard_examples_by_gap_need_a_student_source():
    params = tiny_params(transfer_sets={"t": {"source": "teacher", "strategy": "hard_examples", "hardness": "gap"}})
    with pytest.raises(ConfigError, match="transfer_sets.t.hardness: 'gap' is the source's loss minus its teacher's"):
        parse_config(params)
    params = tiny_params(transfer_sets={"t": {"source": "sft", "strategy": "augment", "hardness": "gap"}})
    with pytest.raises(ConfigError, match="transfer_sets.t.hardness: only with strategy 'hard_examples'"):
        parse_config(params)


# ----------------------------------------------------------------------------------------------- paraphrase
def test_paraphrase_answers_model_made_paraphrases_and_keeps_the_originals(run, monkeypatch):
    """A stand-in model: a paraphrase request gets `P<seed> <instruction>` (empty for the first prompt's
    second paraphrase), any other prompt `R<seed> <instruction>`."""
    from kd_core.stages import transfer as transfer_stage

    request = "Say differently: "

    def texts(self, rows, seed):
        out = [f"P{seed} {r['instruction'][len(request):]}" if r["instruction"].startswith(request)
               else f"R{seed} {r['instruction']}" for r in rows]
        if rows[0]["instruction"].startswith(request) and seed == 1:
            out[0] = ""
        return out

    monkeypatch.setattr(transfer_stage.Writer, "_texts", texts)
    rows, info = _make(run, "para_fake")
    train, pool = _split(run, "train"), _split(run, "unlabeled")
    paraphrased = [dict(r, instruction=f"P{j} {r['instruction'].strip()}", response="", id=f"{r['id']}~p{j}",
                        paraphrase_of=r["id"]) for j in range(2) for r in [*train, *pool]]
    del paraphrased[len(train) + len(pool)]  # the empty one
    answered = [dict(r, response=f"R0 {r['instruction']}", id=f"{r['id']}~para_fake0", generated_by="teacher")
                for r in [*pool, *paraphrased]]
    assert rows == train + answered
    assert info["paraphrases"] == len(paraphrased) and info["empty_paraphrases"] == 1
    assert info["labeled_rows"] == len(train) and info["answered_prompts"] == len(pool) + len(paraphrased)


def test_paraphrase_with_the_tiny_teacher(run):
    """The real path: the teacher writes the paraphrases (noise at this size) and answers them."""
    from kd_core.data.tokenize import encode_prompt
    from kd_core.generation import generate

    cfg, paths = run
    rows, info = _make(run, "para")
    train, pool = _split(run, "train"), _split(run, "unlabeled")
    scope = {r["id"]: r for r in [*train, *pool]}
    assert rows[:len(train)] == train
    new = rows[len(train):]
    plain = [r for r in new if "paraphrase_of" not in r]  # the answers to the unlabeled prompts, first
    assert plain and new[:len(plain)] == plain and {r["id"].rpartition("~")[0] for r in plain} <= {p["id"] for p in pool}
    para = [r for r in new if "paraphrase_of" in r]
    assert para and info["paraphrases"] + info["empty_paraphrases"] == 2 * len(scope)
    # the paraphrases are the teacher's answers to the paraphrase request, sample j with seed + j
    ts = cfg.transfer_sets["para"]
    model, tokenizer = load_model(paths, "teacher"), load_run_tokenizer(paths)
    requests = [encode_prompt({"instruction": ts.paraphrase_instruction.replace("{instruction}", r["instruction"].strip()),
                               "context": ""}, tokenizer, cfg.data.template, cfg.tokenizer.max_length)
                for r in scope.values()]
    made = {j: generate(model, tokenizer, requests, max_new_tokens=6, do_sample=True, seed=j,
                        batch_size=cfg.evaluation.generation.batch_size).texts for j in range(2)}
    expected = {f"{i}~p{j}": text for j in range(2) for i, text in zip(scope, made[j]) if text}
    for row in para:
        pid = row["id"].rpartition("~")[0]
        original = scope[row["paraphrase_of"]]
        assert row["instruction"] == expected[pid] and row["response"] and row["generated_by"] == "teacher"
        assert row["context"] == original["context"] and row["category"] == original["category"]
