"""params.yaml validation: every error names the key and the allowed values."""

from __future__ import annotations

import pytest
import yaml

from kd_core.config import ConfigError, load_config, parse_config
from tests.conftest import tiny_params, write_params


def _error(params: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    return str(err.value)


def test_repo_params_are_valid():
    from tests.conftest import REPO

    cfg = load_config(REPO / "params.yaml")
    assert len(cfg.students) >= 3  # an SFT baseline and distilled students of the same size and budget
    assert {"sft"} < {s.method for s in cfg.students.values()}
    assert len({(s.model.model_dump_json(), s.training.max_steps) for s in cfg.students.values()}) == 1


def test_student_names_come_from_keys():
    cfg = parse_config(tiny_params())
    assert [s.name for s in cfg.students.values()] == ["sft", "fkl"]
    assert cfg.student("fkl").divergence == "fkl"
    with pytest.raises(KeyError, match="students: sft, fkl"):
        cfg.student("nope")


def test_unknown_method_names_key_and_allowed_values():
    p = tiny_params()
    p["students"]["fkl"]["method"] = "fkd"
    msg = _error(p)
    assert "students.fkl.method" in msg and "'fkd'" in msg and "kd" in msg and "sft" in msg


def test_unknown_divergence():
    p = tiny_params()
    p["students"]["fkl"]["divergence"] = "kl"
    msg = _error(p)
    assert "students.fkl.divergence" in msg and "fkl" in msg and "rkl" in msg and "jsd" in msg


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_beta_out_of_range(beta):
    p = tiny_params()
    p["students"]["fkl"].update(divergence="jsd", divergence_args={"beta": beta})
    msg = _error(p)
    assert "students.fkl.divergence_args.beta" in msg and "[0.0, 1.0]" in msg


def test_unknown_divergence_arg():
    p = tiny_params()
    p["students"]["fkl"].update(divergence="jsd", divergence_args={"gamma": 0.3})
    assert "divergence_args.gamma: not a parameter of 'jsd' (allowed: beta)" in _error(p)


def test_unknown_key_and_literal():
    p = tiny_params()
    p["teacher"]["finetune"] = "qlora"
    p["bogus"] = 1
    msg = _error(p)
    assert "teacher.finetune" in msg and "'full' or 'lora'" in msg
    assert "bogus: unknown key" in msg


def test_file_source_needs_path_and_eval_set_names_checked():
    p = tiny_params()
    p["data"]["source"] = "file"
    assert "data.path: required when source is 'file'" in _error(p)
    p = tiny_params()
    p["evaluation"]["eval_sets"] = ["test", "dolly"]
    assert "evaluation.eval_sets[1]: unknown eval set 'dolly' (allowed: test)" in _error(p)


def test_model_source_needs_exactly_one():
    p = tiny_params()
    p["teacher"]["model"] = {"config": {"n_layer": 1}, "checkpoint": "x"}
    assert "teacher.model" in _error(p)


def test_overrides_with_list_and_mapping_paths(tmp_path):
    path = write_params(tmp_path, tiny_params())
    cfg = load_config(path, {"students.fkl.divergence": "rkl", "evaluation.sample_seeds": [3]})
    assert cfg.student("fkl").divergence == "rkl" and cfg.evaluation.sample_seeds == [3]
    with pytest.raises(ConfigError, match="not an index"):
        load_config(path, {"evaluation.sample_seeds.5": 1})


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [a, b\nseed: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == (f"{bad}: line 2, column 5: not valid YAML: expected ',' or ']', but got ':' "
                              "(while parsing a flow sequence)")  # one line, naming the file (not PyYAML's caret)
    bad.write_bytes(b"seed: 0\nrun_dir: caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == f"{bad}:2: not UTF-8 text (byte 0xe9)"


def test_fingerprint_tracks_content():
    a, b = parse_config(tiny_params()), parse_config(tiny_params(seed=1))
    assert a.fingerprint() == parse_config(yaml.safe_load(yaml.safe_dump(tiny_params()))).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_chains_and_transfer_sets_are_checked():
    p = tiny_params()
    p["students"]["sft"]["teacher"] = "fkl"
    p["students"]["fkl"]["teacher"] = "sft"
    assert "cycle" in _error(p)
    p = tiny_params()
    p["students"]["fkl"]["teacher"] = "nobody"
    assert "students.fkl.teacher: unknown model 'nobody' (allowed: teacher, sft)" in _error(p)
    p = tiny_params()
    p["students"]["sft"]["method"] = "seqkd"
    assert "students.sft.train_data: method 'seqkd' trains on a transfer set" in _error(p)
    p = tiny_params()
    p["transfer_sets"] = {"gen": {"source": "sft"}}
    p["students"]["sft"]["train_data"] = "gen"
    assert "cycle" in _error(p)  # sft would need its own generations
    p["students"]["sft"]["train_data"] = "train"
    p["students"]["fkl"].update(train_data="gen", teacher="teacher")
    cfg = parse_config(p)
    assert cfg.chain_order() == ["sft", "fkl"] and cfg.dependencies("fkl") == ["teacher", "sft"]


def test_override_of_one_student_does_not_leak_through_yaml_anchors(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "teacher: {model: {config: {n_layer: 1}}}\n"
        "students:\n"
        "  a: {model: {config: {n_layer: 1}}, training: &t {learning_rate: 0.1}}\n"
        "  b: {model: {config: {n_layer: 1}}, training: *t}\n")
    cfg = load_config(tmp_path / "params.yaml", {"students.a.training.learning_rate": 0.5})
    assert cfg.student("a").training.learning_rate == 0.5 and cfg.student("b").training.learning_rate == 0.1


# ------------------------------------------------------------------------------------------- known before training
def test_evaluation_must_generate_something():
    p = tiny_params()
    p["evaluation"].update(sample_seeds=[], greedy=False)
    assert "params.yaml: evaluation.sample_seeds: empty and greedy is false: the eval sets would get no generation " \
           "metric (give seeds, e.g. [0], or set greedy: true)" in _error(p)
    p["evaluation"]["eval_sets"] = []  # no eval set: nothing to generate on, nothing missing
    p["tracking"]["champion"]["metric"] = "val/ppl"
    parse_config(p)
    p = tiny_params()
    p["evaluation"]["exaccerr_lengths"] = [8, 0]
    assert "evaluation.exaccerr_lengths[1]: Input should be greater than or equal to 1" in _error(p)


@pytest.mark.parametrize("metric, evaluation, message", [
    ("dolly/rougeL_sampled_mean", {}, "tracking.champion.metric: eval set 'dolly' of 'dolly/rougeL_sampled_mean' is "
                                      "not evaluated (evaluation.eval_sets; allowed: test)"),
    ("test/rougeL_sampled_mean", {"sample_seeds": []}, "tracking.champion.metric: 'test/rougeL_sampled_mean' is a "
                                                       "sampled metric and evaluation.sample_seeds is empty"),
    ("test/rougeL_greedy", {"greedy": False}, "tracking.champion.metric: 'test/rougeL_greedy' is a greedy metric and "
                                              "evaluation.greedy is false (allowed: true)"),
    ("test/rouge", {}, "tracking.champion.metric: unknown metric 'test/rouge' (allowed: parameters, train_time_s, "),
    ("test/exaccerr_l8", {"exaccerr_prompts": 0}, "tracking.champion.metric: 'test/exaccerr_l8': "
                                                  "evaluation.exaccerr_prompts is 0"),
])
def test_champion_metric_must_be_produced_by_the_evaluation(metric, evaluation, message):
    p = tiny_params()
    p["evaluation"].update(evaluation)
    p["tracking"]["champion"]["metric"] = metric
    [line] = _error(p).splitlines()
    assert line.startswith(f"params.yaml: {message}")


def test_champion_metrics_that_are_produced():
    for metric in ("test/rougeL_sampled_mean", "test/exact_match_greedy", "val/ppl", "parameters",
                   "test/top1_agreement", "test/exaccerr_l8_ci_high"):
        p = tiny_params()
        p["tracking"]["champion"]["metric"] = metric
        parse_config(p)
    p = tiny_params()
    p["data"]["split"]["val_fraction"] = 0.0
    p["tracking"]["champion"]["metric"] = "val/ppl"
    assert "tracking.champion.metric: 'val/ppl' needs a val split and data.split.val_fraction is 0" in _error(p)
    p = tiny_params()
    p["tracking"]["champion"]["significance"] = 0.05
    parse_config(p)
    p["evaluation"]["sample_seeds"] = []
    p["tracking"]["champion"]["metric"] = "test/rougeL_greedy"
    assert "tracking.champion.significance: the paired test reads per-prompt sampled ROUGE-L" in _error(p)


def _cut(p: dict, student: str, layers: list[int], teacher: str = "teacher") -> dict:
    p["students"][student].update(model={"from_teacher_layers": layers}, teacher=teacher)
    return p


def test_from_teacher_layers_are_checked_against_config_built_teachers():
    p = tiny_params()
    p["teacher"]["model"]["config"]["n_layer"] = 3
    parse_config(_cut(p, "fkl", [0, 2]))
    assert "params.yaml: students.fkl.model.from_teacher_layers: indices [3, 5] beyond the 3 layers of 'teacher' " \
           "(allowed: 0 to 2)" in _error(_cut(p, "fkl", [0, 3, 5]))
    # a teacher-assistant chain: the student that teaches (config-built, or itself cut from the teacher)
    p = tiny_params()
    p["teacher"]["model"]["config"]["n_layer"] = 4
    p["students"]["sft"]["model"] = {"config": {"n_layer": 2, "hidden": 32, "n_head": 2}}
    assert "students.fkl.model.from_teacher_layers: indices [2] beyond the 2 layers of 'sft' (allowed: 0 to 1)" \
           in _error(_cut(p, "fkl", [0, 2], teacher="sft"))
    _cut(p, "sft", [0, 1, 3])
    parse_config(_cut(p, "fkl", [2], teacher="sft"))
    assert "beyond the 3 layers of 'sft'" in _error(_cut(p, "fkl", [3], teacher="sft"))
    # a checkpoint teacher: its layers are known only once loaded
    p = tiny_params()
    p["teacher"]["model"] = {"checkpoint": "some/model"}
    parse_config(_cut(p, "fkl", [0, 30]))


@pytest.mark.parametrize("layers, message", [
    ([0, -1], "from_teacher_layers: negative indices [-1] (allowed: 0 to the teacher's layers - 1)"),
    ([0, 1, 0], "from_teacher_layers: indices [0] given twice (each teacher layer is kept at most once)"),
    ([], "from_teacher_layers: empty (give the teacher layer indices to keep, e.g. [0, 2])"),
])
def test_from_teacher_layers_negative_repeated_or_empty(layers, message):
    assert f"params.yaml: students.fkl.model.{message}" in _error(_cut(tiny_params(), "fkl", layers))


def test_model_source_fields_that_do_not_fit():
    p = tiny_params()
    p["teacher"]["model"] = {"from_teacher_layers": [0]}
    assert "params.yaml: teacher.model.from_teacher_layers: students only" in _error(p)
    p = tiny_params()
    p["students"]["fkl"]["model"]["gguf_file"] = "m.gguf"
    assert "params.yaml: students.fkl.model.gguf_file: a file inside `checkpoint`" in _error(p)


@pytest.mark.parametrize("arch, message", [
    ({"arch": "llama", "hidden": 32, "n_head": 4, "n_kv_head": 3},
     "students.fkl.model.config.n_kv_head: 3 must divide n_head (4) (allowed: 1, 2, 4)"),
    ({"arch": "llama", "hidden": 12, "n_head": 4},
     "students.fkl.model.config.hidden: hidden / n_head = 12 / 4 = 3 must be even for llama"),
    ({"arch": "gpt2", "hidden": 32, "n_head": 4, "n_kv_head": 2},
     "students.fkl.model.config.n_kv_head: llama only"),
    ({"arch": "gpt2", "hidden": 30, "n_head": 4}, "students.fkl.model.config: hidden (30) must be divisible by n_head (4)"),
])
def test_architecture_rules_of_transformers(arch, message):
    p = tiny_params()
    p["students"]["fkl"]["model"] = {"config": {"n_layer": 1, **arch}}
    assert f"params.yaml: {message}" in _error(p)


def test_architectures_that_transformers_builds_are_accepted():
    for arch in ({"arch": "llama", "hidden": 32, "n_head": 4, "n_kv_head": 2}, {"arch": "gpt2", "hidden": 12, "n_head": 4}):
        p = tiny_params()
        p["students"]["fkl"]["model"] = {"config": {"n_layer": 1, **arch}}
        parse_config(p)


def _set(params: dict, dotted: str, value) -> dict:
    """`params` with the value at `dotted` set; the mappings on the way are copied (tiny_params' sections share
    one training mapping)."""
    node = params = dict(params)
    *parents, last = dotted.split(".")
    for key in parents:
        node[key] = dict(node.get(key, {}))
        node = node[key]
    node[last] = value
    return params


@pytest.mark.parametrize("key, value, got", [
    ("seed", "7", "valid integer (got string '7')"),
    ("seed", True, "valid integer (got boolean True)"),
    ("seed", 7.0, "valid integer (got number 7.0)"),
    ("tokenizer.vocab_size", 300.0, "valid integer (got number 300.0)"),
    ("students.fkl.training.learning_rate", "1e-3", "valid number (got string '1e-3')"),
    ("students.fkl.training.learning_rate", float("inf"), "finite number"),
    ("students.fkl.training.max_steps", 3.0, "valid integer (got number 3.0)"),
    ("students.fkl.training.batch_size", True, "valid integer (got boolean True)"),
    ("students.fkl.finetune.enabled", "yes", "valid boolean (got string 'yes')"),
    ("data.split.val_fraction", "0.15", "valid number (got string '0.15')"),
    ("evaluation.sample_seeds", ["0", "1"], "valid integer (got string '0')"),
    ("evaluation.generation.max_new_tokens", "6", "valid integer (got string '6')"),
    ("students.fkl.divergence_args", {"beta": "0.5"}, "valid number (got string '0.5')"),
])
def test_a_value_of_the_wrong_type_is_an_error_never_converted(key, value, got):
    """YAML gives every value its type; a string, boolean or float where an integer belongs (and so on) is refused
    with the key and what was given, not converted (`"7"` -> 7, `true` -> 1, `"yes"` -> True). An integer is a
    valid number."""
    params = _set(tiny_params(), key, value)
    if key.endswith("divergence_args"):
        params["students"]["fkl"]["divergence"] = "jsd"
    lines = _error(params).splitlines()
    shown = key + ("[0]" if isinstance(value, list) else ".beta" if isinstance(value, dict) else "")
    assert lines[0] == f"params.yaml: {shown}: Input should be a {got}", lines
    assert len(lines) == (2 if isinstance(value, list) else 1), lines  # a list: one line per wrong item


def test_integers_are_valid_numbers_and_layer_pairs_are_yaml_lists():
    params = _set(tiny_params(), "students.fkl.training.learning_rate", 1)
    params["students"]["fkl"].update(method="intermediate", method_args={"layer_map": [[0, 0], [1, 1]]})
    cfg = parse_config(params)
    assert cfg.students["fkl"].training.learning_rate == 1.0
    assert cfg.students["fkl"].method_args["layer_map"] == [[0, 0], [1, 1]]  # validated by IntermediateArgs
    params["students"]["fkl"]["method_args"]["layer_map"] = [["0", 0]]
    assert "layer_map" in _error(params)


def test_zero_steps_is_an_error_not_epochs():
    """`max_steps: 0` was accepted and trained `epochs` (the Trainer reads 0 as unset)."""
    params = _set(tiny_params(), "students.fkl.training.max_steps", 0)
    assert _error(params) == ("params.yaml: students.fkl.training.max_steps: 0 steps: give -1 (train `epochs`) or "
                              "a number of steps >= 1")


def write_params_text(folder, text: str):
    path = folder / "params.yaml"
    path.write_text(text)
    return path


def test_an_exponent_without_a_dot_is_a_number_as_in_yaml_1_2(tmp_path):
    """PyYAML reads `1e-3` as the string "1e-3" (YAML 1.1 wants a dot); the strict config would refuse a learning
    rate written the usual way. params.yaml and --set read it as a number; a quoted "1e-3" stays a string (refused)."""
    text = yaml.safe_dump(tiny_params()).replace("learning_rate: 0.003", "learning_rate: 1e-3", 1)
    assert "learning_rate: 1e-3" in text
    cfg = load_config(write_params_text(tmp_path, text))
    assert cfg.teacher.training.learning_rate == 0.001
    assert load_config(tmp_path / "params.yaml", {"seed": 7}).teacher.training.learning_rate == 0.001
    quoted = text.replace("learning_rate: 1e-3", 'learning_rate: "1e-3"', 1)
    with pytest.raises(ConfigError, match=r"learning_rate: Input should be a valid number \(got string '1e-3'\)"):
        load_config(write_params_text(tmp_path, quoted))
