"""Reading params files: duplicate YAML keys, dotted overrides, and the metric names `kd validate` expects
the evaluation to write."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from kd_core.config import ConfigError, load_config, parse_config
from kd_core.config.load import set_dotted
from kd_core.config.metrics import metric_problem
from tests.conftest import tiny_params, write_params


# ------------------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("raw, dotted, expected", [
    ({"m": [[5, 5], [6, 6]]}, "m.0.0", {"m": [[1, 5], [6, 6]]}),  # list of lists: '0' twice
    ({"m": [[5, 5], [6, 6]]}, "m.1.1", {"m": [[5, 5], [6, 1]]}),
    ({"x": {"x": {"x": 0}}}, "x.x.x", {"x": {"x": {"x": 1}}}),  # the same part three times
    ({"a": {"b": {"a": 0}}}, "a.b.a", {"a": {"b": {"a": 1}}}),  # a mapping key equal to a later one
    ({"a": {}}, "a.b.c", {"a": {"b": {"c": 1}}}),  # missing mappings are created
])
def test_set_dotted_sets_the_last_part_whatever_repeats(raw, dotted, expected):
    set_dotted(raw, dotted, 1)
    assert raw == expected


def test_set_dotted_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"override 'm\.2': '2' is not an index of a list of 2"):
        set_dotted({"m": [0, 1]}, "m.2", 1)
    with pytest.raises(ConfigError, match=r"override 'm\.0\.x': cannot descend into a int at 'x'"):
        set_dotted({"m": [0, 1]}, "m.0.x", 1)


def test_override_inside_a_list_of_lists(tmp_path):
    params = tiny_params()
    params["students"]["fkl"].update(method="intermediate", method_args={"layer_map": [[5, 5]]})
    path = write_params(tmp_path, params)
    cfg = load_config(path, {"students.fkl.method_args.layer_map.0.0": 0})
    assert cfg.student("fkl").method_args["layer_map"] == [[0, 5]]


# ------------------------------------------------------------------------------------------- duplicate keys
def test_a_second_students_block_is_refused_with_both_lines(tmp_path):
    text = yaml.safe_dump(tiny_params(), sort_keys=False)
    lines = text.splitlines()
    first = lines.index("students:") + 1
    text += "students:\n  other: {model: {config: {n_layer: 1}}}\n"
    second = len(lines) + 1
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "params.yaml")
    assert str(err.value) == f"{tmp_path / 'params.yaml'}: students: duplicate key (lines {first} and {second})"


def test_duplicate_keys_at_any_depth_one_line_each(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "seed: 0\n"
        "teacher: {model: {config: {n_layer: 1}}}\n"
        "students:\n"
        "  a:\n"
        "    method: kd\n"
        "    model: {config: {n_layer: 1}}\n"
        "    method: sft\n"
        "seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "p.yaml")
    assert str(err.value).splitlines() == [f"{tmp_path / 'p.yaml'}: students.a.method: duplicate key (lines 5 and 7)",
                                           f"{tmp_path / 'p.yaml'}: seed: duplicate key (lines 1 and 8)"]


def test_anchors_aliases_and_merge_keys_still_load(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "teacher: {model: {config: {n_layer: 1}}}\n"
        "students:\n"
        "  a:\n"
        "    model: &m {config: {n_layer: 1}}\n"
        "    training: &t {learning_rate: 0.1, batch_size: 4}\n"
        "  b:\n"
        "    model: *m\n"
        "    training:\n"
        "      <<: *t\n"
        "      learning_rate: 0.2\n"  # an explicit key overrides the merged one: not a duplicate
        "  c:\n"
        "    model: *m\n"
        "    training: {<<: *t}\n")
    cfg = load_config(tmp_path / "p.yaml")
    assert [cfg.student(n).training.learning_rate for n in "abc"] == [0.1, 0.2, 0.1]
    assert {cfg.student(n).training.batch_size for n in "abc"} == {4}


def test_kd_validate_reports_a_duplicate_key_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from kd_core.cli import app

    path = write_params(tmp_path, tiny_params())
    path.write_text(path.read_text() + "seed: 3\n")
    result = CliRunner().invoke(app, ["validate", "--params", str(path)])
    assert result.exit_code == 2
    assert f"{path}: seed: duplicate key (lines 2 and " in result.stderr


# ------------------------------------------------------------------------------------------- metric names
@pytest.mark.parametrize("greedy, seeds", [(True, [0, 1]), (True, []), (False, [0])])
def test_generation_metrics_the_evaluation_writes_are_the_ones_validate_expects(tmp_path, monkeypatch, greedy, seeds):
    """Run the evaluation's generation metrics (generation stubbed): every key it writes is accepted as a
    champion metric, and the greedy / sampled names it does not write are refused."""
    from kd_core.evaluation import run

    texts = SimpleNamespace(texts=["a b", "c"], tokens_per_second=1.0)
    monkeypatch.setattr(run, "generate", lambda *a, **k: texts)
    params = tiny_params()
    params["evaluation"].update(greedy=greedy, sample_seeds=seeds)
    params["tracking"]["champion"]["metric"] = "val/loss"
    cfg = parse_config(params)
    tokenizer = lambda text, add_special_tokens=True: {"input_ids": [1, 2, 3]}  # noqa: E731
    rows = [{"id": i, "instruction": f"q {i}", "response": "a b"} for i in range(2)]
    written = run._generation_metrics(cfg, None, tokenizer, "test", rows, tmp_path / "test.jsonl")
    assert written and all(metric_problem(cfg, key) is None for key in written)
    for name in ("rougeL_greedy", "exact_match_greedy", "gen_tokens_per_s", "rougeL_sampled_mean",
                 "exact_match_sampled_ci_high", "distinct_2", "self_bleu", "function_words", "rougeL_greedy_ci_low",
                 "exact_match_greedy_ci_high", "n_prompts", "max_new_tokens", "ref_tokens_p95", "ref_tokens_max"):
        assert (metric_problem(cfg, f"test/{name}") is None) == (f"test/{name}" in written)


def test_teacher_agreement_and_split_metric_names():
    cfg = parse_config(tiny_params())  # unc_buckets 3, exaccerr_lengths [8, 16], exaccerr_prompts 32
    for ok in ("parameters", "train_time_s", "val/loss", "test/ppl", "test/top1_agreement",
               "test/kl_teacher_student", "test/unc_bucket2_logit_std", "test/exaccerr_l16_ci_low"):
        assert metric_problem(cfg, ok) is None, ok
    assert "unc_buckets is 3" in metric_problem(cfg, "test/unc_bucket3_kl")
    assert "(allowed: 8, 16)" in metric_problem(cfg, "test/exaccerr_l4")
    assert "unknown metric 'val/rougeL'" in metric_problem(cfg, "val/rougeL")
    assert "unknown metric 'rougeL'" in metric_problem(cfg, "rougeL")
