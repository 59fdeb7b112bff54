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
    assert len(cfg.students) >= 4
    assert {"sft"} < {s.method for s in cfg.students.values()}


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
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


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
