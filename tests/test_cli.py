"""`kd validate`, `kd compare` and `--set` parse errors through typer's CliRunner (no subprocess); how a finished
`kd stage` process ends (one small subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from kd_core.cli import app
from tests.conftest import REPO, tiny_params, write_params


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


_ENDS = """
import atexit, sys
from kd_core.cli import _exit_now
atexit.register(lambda: print("exit handlers ran", flush=True))
print("stage done", flush=True)
_exit_now()
print("teardown reached", flush=True)
sys.exit(3)
"""


def test_a_rank_of_a_distributed_launch_ends_without_the_interpreters_teardown(tmp_path):
    """A rank (WORLD_SIZE > 1) ends at `_exit_now` whatever script the launcher started (here `python -c`, not
    `kd`): exit handlers run, status 0, and the code after it (the interpreter's teardown, where gloo's threads
    could abort the rank) never runs. Outside a launch and outside `kd`, `_exit_now` returns (an in-process runner)."""
    def ends(world_size: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, WORLD_SIZE=world_size, PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-c", _ENDS], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)

    rank = ends("2")
    assert (rank.returncode, rank.stdout.splitlines()) == (0, ["stage done", "exit handlers ran"]), rank.stderr
    alone = ends("1")
    assert alone.returncode == 3 and alone.stdout.splitlines() == ["stage done", "teardown reached",
                                                                   "exit handlers ran"], alone.stderr


def test_validate_names_the_key_of_a_data_file_that_does_not_exist(project):
    params = tiny_params()
    params["data"] = {"source": "file", "path": "data/nope.jsonl", "template": "minimal",
                      "eval_sets": {"held": {"path": "data/held.jsonl"}}}
    write_params(project, params)
    result = _kd("validate")
    assert result.exit_code == 2
    assert _errors(result) == ["error: params.yaml: data.path: 'data/nope.jsonl': file not found",
                               "error: params.yaml: data.eval_sets.held.path: 'data/held.jsonl': file not found"]


def test_an_override_inside_a_student_that_does_not_exist_names_the_students(project):
    """A typo in `--set students.<name>.<key>` added a student of that one key (reported as its missing fields)."""
    write_params(project, tiny_params())
    result = _kd("validate", "--set", "students.fk1.divergence=rkl")
    assert result.exit_code == 2
    assert _errors(result) == ["error: override 'students.fk1.divergence': 'fk1' is not one of the students of "
                               "params.yaml (sft, fkl); give a new one whole: students.fk1={...}"]
    added = _kd("validate", "--set", "students.new={method: sft, teacher: teacher, model: {config: {n_layer: 1}}}")
    assert added.exit_code == 0 and "new" in json.loads(added.stdout)["students"], added.output


def test_set_reads_an_exponent_as_a_number(project):
    write_params(project, tiny_params())
    result = _kd("validate", "-S", "teacher.training.learning_rate=5e-5")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["teacher"]["training"]["learning_rate"] == 5e-5
