"""`kd validate`, `kd compare` and `--set` parse errors through typer's CliRunner (no subprocess)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from kd_core.cli import app
from tests.conftest import tiny_params, write_params


def _kd(*args: str):
    return CliRunner().invoke(app, list(args))


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_validate_prints_the_resolved_config_with_overrides(project):
    write_params(project, tiny_params())
    result = _kd("validate", "--set", "seed=7", "-S", "students.fkl.divergence=rkl", "-S", "data.max_rows=100")
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert cfg["seed"] == 7 and cfg["students"]["fkl"]["divergence"] == "rkl" and cfg["data"]["max_rows"] == 100
    assert cfg["data"]["max_chars"] == 4000  # defaults are filled in


def test_set_without_equals_is_a_config_error(project):
    write_params(project, tiny_params())
    result = _kd("validate", "--set", "seed")
    assert result.exit_code == 2
    assert _errors(result) == ["error: --set 'seed': expected KEY=VALUE (e.g. --set students.fkl.method=kd)"]


def test_set_with_a_value_that_is_not_yaml_is_a_config_error(project):
    write_params(project, tiny_params())
    result = _kd("validate", "--set", "seed=[1, 2")
    assert result.exit_code == 2 and any("--set 'seed=[1, 2'" in line for line in _errors(result)), result.output


def test_set_with_a_wrong_type_or_unknown_key_names_the_key(project):
    write_params(project, tiny_params())
    wrong_type = _kd("validate", "-S", "seed=abc")
    assert wrong_type.exit_code == 2 and any("seed" in line for line in _errors(wrong_type)), wrong_type.output
    unknown = _kd("validate", "-S", "data.no_such_key=1")
    assert unknown.exit_code == 2 and any("no_such_key" in line for line in _errors(unknown)), unknown.output


def test_validate_missing_params_file(project):
    result = _kd("validate", "--params", "nope.yaml")
    assert result.exit_code == 2 and any("nope.yaml" in line for line in _errors(result)), result.output
