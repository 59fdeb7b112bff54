"""Answer-checking metrics: the extraction rules on hand-checked texts (negative numbers, decimals, thousands
separators, units, several numbers), numbers compared as numbers, pass@k against its combinatorial definition, a
GSM8K file in its published schema, the evaluation's metrics on stubbed generations against hand computation, and
`kd validate`'s one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from kd_core.config import ConfigError, parse_config
from kd_core.config.metrics import metric_problem
from kd_core.errors import DataError
from kd_core.evaluation.answers import RULES, answer_match, check_references, extract_answer, pass_at_k
from tests.conftest import REPO, tiny_params, write_params

GSM8K_SLICE = REPO / "data/eval/gsm8k_train20.jsonl"
# the final answers of data/eval/gsm8k_train20.jsonl, read by hand off each row's `#### ...` line
GSM8K_ANSWERS = ["72", "10", "5", "42", "624", "35", "48", "16", "41", "990", "121", "5", "85", "35", "5", "448000",
                 "800", "1080", "850000", "109200000"]

HAND_CHECKED = [  # (text, rule, answer)
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "gsm8k", "72"),
    ("30 * 36 = $<<36*30=1080>>1080.\n#### 1,080", "gsm8k", "1080"),
    ("#### 109,200,000", "gsm8k", "109200000"),
    ("She is 5 dollars short.\n#### -5", "gsm8k", "-5"),
    ("#### −5", "gsm8k", "-5"),  # a Unicode minus sign
    ("#### 3.50", "gsm8k", "3.5"),
    ("#### $1,000.00", "gsm8k", "1000"),
    ("#### 18 apples, not 20", "gsm8k", "18"),  # several numbers after the marker: the first
    ("#### 7\nwait, recheck\n#### 8", "gsm8k", "8"),  # several markers: the last
    ("The answer is 18.", "gsm8k", None),  # no marker
    ("#### eighteen", "gsm8k", None),
    ("I have 3 cats and 4 dogs, so 7 pets.", "last_number", "7"),
    ("It costs $1,234.5 in total.", "last_number", "1234.5"),
    ("The temperature fell to -12 degrees.", "last_number", "-12"),
    ("Grades 3-5 take part.", "last_number", "5"),  # a range's dash is no minus sign
    ("A rate of 50%.", "last_number", "50"),
    ("It weighs 2.5kg", "last_number", "2.5"),
    ("The list 1,2,3", "last_number", "3"),  # commas not in groups of three separate numbers
    ("1,2345", "last_number", "2345"),
    ("the value is .5", "last_number", "0.5"),
    ("1000.0", "last_number", "1000"),
    ("x2 is a name, 9 is a number", "last_number", "9"),
    ("no numbers here", "last_number", None),
    (r"so the answer is $\boxed{\frac{3}{4}}$", "boxed", "0.75"),
    (r"\boxed{0.75}", "boxed", "0.75"),
    (r"\boxed{\dfrac{1}{3}}", "boxed", "1/3"),
    (r"\boxed{\frac{-1}{2}}", "boxed", "-0.5"),
    (r"\boxed{1,000}", "boxed", "1000"),
    (r"\boxed{18 \text{ dollars}}", "boxed", "18"),
    (r"\boxed{\$18.00}", "boxed", "18"),
    (r"\boxed{90^\circ}", "boxed", "90"),
    (r"\boxed{-2.50}", "boxed", "-2.5"),
    (r"first \boxed{1}, then \boxed{2}", "boxed", "2"),
    (r"\boxed 5", "boxed", "5"),
    (r"\boxed{x + 1}", "boxed", "x+1"),
    (r"\boxed{\{1, 2\}}", "boxed", r"\{1,2\}"),  # nested braces kept
    ("the answer is 5", "boxed", None),
    ("B", "choice", "B"),
    ("(C)", "choice", "C"),
    ("B) Paris", "choice", "B"),
    ("D. It is the largest.", "choice", "D"),
    ("The answer is (D).", "choice", "D"),
    ("Answer: E", "choice", "E"),
    ("the answer is a number", "choice", None),  # "a" is an article, not a choice
    ("A train is faster, so (C)", "choice", "C"),
    (r"\boxed{C}", "choice", "C"),
    ("B Paris", "choice", None),
    ("I do not know", "choice", None),
]


@pytest.mark.parametrize("text, rule, answer", HAND_CHECKED)
def test_extraction_rules_on_hand_checked_texts(text, rule, answer):
    assert extract_answer(text, rule) == answer


def test_numbers_are_compared_as_numbers():
    same = ["#### 1,000", "#### 1000", "#### 1000.0", "#### $1,000.00", "#### 1000 dollars"]
    for a, b in itertools.product(same, same):
        assert answer_match(a, b, "gsm8k") == 1.0
    assert answer_match("#### 100", "#### 1,000", "gsm8k") == 0.0
    assert answer_match("#### -3", "#### 3", "gsm8k") == 0.0
    assert answer_match("the result is 0.50", "0.5", "last_number") == 1.0
    assert answer_match(r"\boxed{\frac{1}{2}}", r"\boxed{0.5}", "boxed") == 1.0
    assert answer_match("no answer", "#### 0", "gsm8k") == 0.0  # an unanswered prediction never matches
    assert answer_match("#### 4", ["#### 3", "#### 4"], "gsm8k") == 1.0  # any of several references
    with pytest.raises(ValueError, match="unknown answer rule 'regex'"):
        extract_answer("1", "regex")


def _pass_at_k_by_subsets(n: int, c: int, k: int) -> float:
    """The fraction of the k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_hold_a_correct_one():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_subsets(n, c, k), abs=1e-12)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2) and pass_at_k(5, 1, 5) == 1.0 and pass_at_k(5, 0, 5) == 0.0
    for bad in ((3, 1, 4), (3, 4, 1), (3, 1, 0)):
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(*bad)


def test_a_gsm8k_file_in_its_published_schema_loads_through_field_map(tmp_path):
    from kd_core.stages.prepare import _eval_sets

    params = tiny_params()
    params["data"]["eval_sets"] = {"gsm8k": {"path": str(GSM8K_SLICE),
                                             "field_map": {"instruction": "question", "response": "answer"}}}
    params["evaluation"].update(eval_sets=["test", "gsm8k"], answers={"gsm8k": "gsm8k"})
    rows = _eval_sets(parse_config(params))[0]["gsm8k"]
    assert len(rows) == 20 and rows[0]["instruction"].startswith("Natalia sold clips")
    assert [extract_answer(r["response"], "gsm8k") for r in rows] == GSM8K_ANSWERS
    assert [extract_answer(r["response"], "last_number") for r in rows] == GSM8K_ANSWERS
    check_references(rows, "gsm8k", "evaluation.answers.gsm8k")
    broken = rows[:3] + [dict(rows[3], response="She read 42 pages.")]
    with pytest.raises(DataError, match=r"evaluation.answers.gsm8k: 1 of 4 rows have a reference without an answer "
                                        r"by rule 'gsm8k', e.g. row 'gsm8k-000003'"):
        check_references(broken, "gsm8k", "evaluation.answers.gsm8k")


def _answer_params(**evaluation) -> dict:
    params = tiny_params()
    params["data"]["eval_sets"] = {"gsm8k": {"path": str(GSM8K_SLICE),
                                             "field_map": {"instruction": "question", "response": "answer"}}}
    params["evaluation"].update(eval_sets=["test", "gsm8k"], answers={"gsm8k": "gsm8k"}, **evaluation)
    return params


def test_answer_metrics_of_stubbed_generations_against_hand_computation(tmp_path, monkeypatch):
    """3 prompts, greedy + 3 seeds. Correct samples per prompt: 2, 1, 2 of 3; pass@2 = 1, 1 - C(2,2)/C(3,2) = 2/3,
    1; the per-seed means 2/3, 1/3, 2/3 (SD 19.245 in points)."""
    from kd_core.evaluation import run

    outputs = {None: ["#### 5", "#### 1000.0", "#### 2"],
               0: ["#### 5", "#### 7", "#### -2"], 1: ["#### 4", "#### 1,000", "no idea"],
               2: ["so 5 #### 5", "#### 9", "#### -2.0"]}
    monkeypatch.setattr(run, "generate", lambda *a, seed=None, **k: SimpleNamespace(
        texts=outputs[seed], tokens_per_second=1.0))
    params = _answer_params(sample_seeds=[0, 1, 2], pass_at_k=[1, 2, 3])
    params["tracking"]["champion"]["metric"] = "gsm8k/pass_at_2"
    cfg = parse_config(params)
    tokenizer = lambda text, add_special_tokens=True: {"input_ids": [1, 2, 3]}  # noqa: E731
    rows = [{"id": f"r{i}", "instruction": f"q {i}", "response": ref}
            for i, ref in enumerate(["#### 5", "#### 1,000", "#### -2"])]
    out = tmp_path / "gsm8k.jsonl"
    m = run._generation_metrics(cfg, None, tokenizer, "gsm8k", rows, out)
    assert m["gsm8k/answer_match_greedy"] == pytest.approx(200 / 3)
    assert m["gsm8k/answer_match_sampled_mean"] == pytest.approx(100 * 5 / 9)
    assert m["gsm8k/pass_at_1"] == pytest.approx(100 * 5 / 9)
    assert m["gsm8k/pass_at_2"] == pytest.approx(100 * 8 / 9)
    assert m["gsm8k/pass_at_3"] == pytest.approx(100.0)
    assert m["gsm8k/answer_match_sampled_std"] == pytest.approx(100 / 3 / math.sqrt(3), rel=1e-9)
    assert m["gsm8k/pass_at_2_ci_low"] <= m["gsm8k/pass_at_2"] <= m["gsm8k/pass_at_2_ci_high"]
    assert all(metric_problem(cfg, key) is None for key in m)  # each one a valid champion metric
    per_prompt = [json.loads(line) for line in out.read_text().splitlines()]
    assert per_prompt[1]["answer_reference"] == ["1000"] and per_prompt[1]["answer_greedy"] == "1000"
    assert per_prompt[1]["answer_samples"] == ["7", "1000", "9"]
    assert per_prompt[1]["answer_match_samples"] == [0.0, 100.0, 0.0]
    assert per_prompt[2]["answer_samples"][1] is None and per_prompt[1]["pass_at_2"] == pytest.approx(200 / 3)
    # a set without an answer rule gets no answer metric
    assert not any("answer" in k or "pass_at" in k
                   for k in run._generation_metrics(cfg, None, tokenizer, "test", rows, tmp_path / "t.jsonl"))


@pytest.mark.parametrize("evaluation, champion, message", [
    ({"answers": {"gsm8k": "regex"}}, None,
     "evaluation.answers.gsm8k: Input should be 'gsm8k', 'last_number', 'boxed' or 'choice'"),
    ({"answers": {"pinned": "gsm8k"}}, None,
     "evaluation.answers.pinned: not an evaluated set (evaluation.eval_sets; allowed: test, gsm8k)"),
    ({"pass_at_k": [1, 3]}, None, "evaluation.pass_at_k[1]: pass@3 needs at least 3 samples per prompt and "
                                  "evaluation.sample_seeds has 2 (allowed: 1 to 2)"),
    ({}, "test/pass_at_1", "'test/pass_at_1' is an answer-checking metric and eval set 'test' has no answer rule"),
    ({}, "gsm8k/pass_at_5", "'gsm8k/pass_at_5': pass@5 is not computed (allowed k: 1, 2)"),
    ({"sample_seeds": []}, "gsm8k/answer_match_sampled_mean", "is a sampled metric and evaluation.sample_seeds"),
    ({"greedy": False}, "gsm8k/answer_match_greedy", "is a greedy metric and evaluation.greedy is false"),
])
def test_bad_answer_settings_are_one_line_errors(evaluation, champion, message):
    params = _answer_params()
    params["evaluation"].update(evaluation)
    if champion:
        params["tracking"]["champion"]["metric"] = champion
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_answer_metrics_accepted_as_champion_and_kd_validate_exits_2_on_a_bad_rule(tmp_path):
    from typer.testing import CliRunner

    from kd_core.cli import app

    params = _answer_params()
    for metric in ("gsm8k/pass_at_1", "gsm8k/pass_at_2_ci_low", "gsm8k/answer_match_greedy",
                   "gsm8k/answer_match_sampled_mean"):
        params["tracking"]["champion"]["metric"] = metric
        assert parse_config(params).evaluation.pass_ks == [1, 2]
    params["evaluation"]["answers"] = {"gsm8k": "last_word"}
    result = CliRunner().invoke(app, ["validate", "--params", str(write_params(tmp_path, params))])
    assert result.exit_code == 2
    assert "evaluation.answers.gsm8k: Input should be" in result.stderr and len(result.stderr.splitlines()) == 1
    assert set(RULES) == {"gsm8k", "last_number", "boxed", "choice"}


@pytest.mark.slow
def test_answer_metrics_through_the_flow_and_dvc(project, prepared_project, empty_stores):
    """The tiny pipeline (one student) with a GSM8K eval set in its own schema, checked by the `gsm8k` rule, and
    pass@2 as the champion metric: the flow evaluates and registers by it, and `dvc repro` then has nothing to do."""
    import os
    import subprocess
    import sys

    from flows.pipeline import kd_pipeline
    from tests.conftest import copy_prepared, registered_versions

    copy_prepared(prepared_project, project)
    shutil.copy(GSM8K_SLICE, project / "data" / GSM8K_SLICE.name)
    params = tiny_params()
    del params["students"]["fkl"]
    params["data"]["eval_sets"] = {"gsm8k": {"path": f"data/{GSM8K_SLICE.name}", "limit": 4,
                                             "field_map": {"instruction": "question", "response": "answer"}}}
    params["evaluation"].update(eval_sets=["test", "gsm8k"], answers={"gsm8k": "gsm8k"})
    params["tracking"]["champion"]["metric"] = "gsm8k/pass_at_2"
    path = write_params(project, params)
    with empty_stores.prefect_harness():
        kd_pipeline(params_path=str(path))
    for model in ("teacher", "sft"):
        metrics = json.loads((project / f"runs/tiny/metrics/{model}.json").read_text())
        assert 0 <= metrics["gsm8k/pass_at_1"] <= metrics["gsm8k/pass_at_2"] <= 100
        assert "gsm8k/answer_match_greedy" in metrics and "test/pass_at_1" not in metrics
        rows = [json.loads(x) for x in (project / f"runs/tiny/generations/{model}/gsm8k.jsonl").read_text().splitlines()]
        assert [r["answer_reference"] for r in rows] == [[a] for a in GSM8K_ANSWERS[:4]]
    from mlflow.tracking import MlflowClient

    champion = MlflowClient().get_model_version_by_alias("kd-student", "champion")
    assert champion.tags["kd.model"] == "sft" and len(registered_versions("kd-student")) == 1
    registry = json.loads((project / "runs/tiny/registry.json").read_text())
    assert "gsm8k/pass_at_2" in json.dumps(registry)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, check=True)
    assert "Running stage" not in out.stdout


def test_the_report_shows_the_answer_columns_of_a_set_that_has_them():
    from kd_core.evaluation.compare import set_table

    rows = [{"label": "sft (kd-student v1)", "metrics": {"gsm8k/rougeL_sampled_mean": 3.0, "gsm8k/pass_at_1": 20.0,
                                                         "gsm8k/pass_at_5": 60.0, "gsm8k/answer_match_greedy": 25.0,
                                                         "test/rougeL_sampled_mean": 9.0}}]
    table = set_table(rows, "gsm8k").splitlines()
    assert table[0].endswith("| answer % greedy | pass@1 | pass@5 |") and table[2].endswith("| 25.0 | 20.0 | 60.0 |")
    assert "pass@" not in set_table(rows, "test") and "answer %" not in set_table(rows, "test")
