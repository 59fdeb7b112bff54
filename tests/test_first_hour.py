"""The first hour of a new user (issue 29, item 4): a copy of the project that is not a git repository (a
downloaded archive) runs, with DVC bookkeeping off and one line saying so and how to turn it on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import dvc_project, registered_versions, tiny_params


@pytest.mark.slow
def test_kd_run_in_a_project_copy_without_git(project, empty_stores):
    """The tiny config through `kd run` (a process, as a user runs it) in a DVC project whose `.git` is gone."""
    from prefect.settings import PREFECT_API_URL

    dvc_project(project, tiny_params())
    shutil.rmtree(project / ".git")
    with empty_stores.prefect_harness():
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        out = subprocess.run([str(Path(sys.executable).with_name("kd")), "run"], cwd=project, text=True,
                             capture_output=True, env=env | {"PREFECT_API_URL": PREFECT_API_URL.value()})
    shown = out.stdout + out.stderr
    assert out.returncode == 0, shown[-5000:]
    assert "Traceback" not in shown and "SCMError" not in shown, shown[-5000:]
    off = [line for line in shown.splitlines() if "DVC" in line and "off" in line]
    assert off == [f"DVC bookkeeping off: {project.resolve()} is not a git repository (DVC needs one): `git init` "
                   "here turns it on; every stage runs"], shown[-5000:]
    assert not (project / "dvc.lock").exists()  # nothing recorded
    assert {v.tags["kd.model"] for v in registered_versions("kd-student")} == {"sft", "fkl"}
    assert any(line.startswith("champion:") for line in shown.splitlines())


# the registry: a handful of tags on a version, its full lineage one JSON document on its run, `kd lineage` reads it
LINEAGE = {"kd.role": "student", "kd.model": "fkl", "kd.method": "kd", "kd.divergence": "fkl", "kd.teacher": "teacher",
           "kd.root_teacher": "teacher", "kd.train_data": "train", "kd.teacher_parameters": "61000",
           "kd.parameters": "24416", "kd.params_hash": "p123", "kd.data_version": "d456", "kd.run_dir": "runs/tiny",
           "kd.finetuned": "true", "kd.model_hash": "m789", "kd.git_commit": "abc", "kd.git_dirty": "false",
           "kd.dvc.data.runs/tiny/data/train.jsonl": "0f1e", "kd.dvc.model.runs/tiny/models/fkl": "9a8b.dir",
           "kd.eval_prompts.test": "e1e1"}


def test_a_version_shows_a_handful_of_tags_and_kd_lineage_reads_the_rest(project):
    """Version 1 registered the old way (every fact a version tag), version 2 the new way (`VERSION_TAGS` on the
    version, the rest in its run's `kd.lineage`): `kd lineage` prints the same facts for both, and the registry
    rows (the champion rule, `kd compare`) see the same tags."""
    import json

    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from kd_core.cli import app
    from kd_core.tracking import registry
    from tests.conftest import write_params

    write_params(project, tiny_params())
    client = MlflowClient()
    experiment = client.create_experiment("tiny", artifact_location=str(project / "artifacts"))
    client.create_registered_model("kd-student")
    old_run = client.create_run(experiment, tags=LINEAGE).info.run_id
    client.create_model_version("kd-student", source=f"runs:/{old_run}/fkl", run_id=old_run, tags=LINEAGE)
    shown = {k: v for k, v in LINEAGE.items() if k in registry.VERSION_TAGS}
    new_run = client.create_run(experiment, tags=shown | {registry.LINEAGE_TAG: json.dumps(LINEAGE)}).info.run_id
    client.create_model_version("kd-student", source=f"runs:/{new_run}/fkl", run_id=new_run, tags=shown)

    # a lineage over MLflow's 8,000 characters of a tag (many data files) goes into an artifact its tag names
    many = LINEAGE | {f"kd.dvc.data.runs/tiny/data/eval/set{i:03d}.jsonl": f"{i:032x}" for i in range(200)}
    import mlflow

    with mlflow.start_run(experiment_id=experiment) as big:
        mlflow.set_tags(shown | {registry.LINEAGE_TAG: registry._lineage_tag(json.dumps(many))})
    client.create_model_version("kd-student", source=f"runs:/{big.info.run_id}/fkl", run_id=big.info.run_id,
                                tags=shown)
    assert len(json.dumps(many)) > 8000 and len(client.get_run(big.info.run_id).data.tags[registry.LINEAGE_TAG]) < 100

    assert len(client.get_model_version("kd-student", "2").tags) == len(registry.VERSION_TAGS) <= 10
    assert [r["tags"] for r in registry.version_rows("kd-student")] == [LINEAGE, LINEAGE, many]
    printed = []
    for version in (1, 2):
        out = CliRunner().invoke(app, ["lineage", f"kd-student:{version}"])
        assert out.exit_code == 0, (out.output, out.exception)
        printed.append(out.stdout.splitlines()[1:])  # (the first line names the version)
    assert printed[0] == printed[1]
    text = "\n".join(printed[1])
    assert "data.runs/tiny/data/train.jsonl: 0f1e" in text and "model.runs/tiny/models/fkl: 9a8b.dir" in text
    assert "params hash:  p123" in text and "git abc" in text and "weights hash: m789" in text


# README's table: generated from a run's report, written between its markers
def test_readme_table_is_generated_from_a_run_report_and_written_between_the_markers(tmp_path):
    import json

    from kd_core.evaluation import readme_table
    from tests.conftest import REPO

    run_dir = tmp_path / "runs/default"
    (run_dir / "reports").mkdir(parents=True)

    def row(model, name, version, method, divergence, mean, low, high):
        role = "teacher" if model == "teacher" else "student"
        return {"name": name, "version": version, "tags": {"kd.model": model, "kd.role": role, "kd.method": method,
                                                           "kd.divergence": divergence, "kd.git_commit": "412d2cf9e0"},
                "metrics": {"pinned/rougeL_sampled_mean": mean, "pinned/rougeL_sampled_ci_low": low,
                            "pinned/rougeL_sampled_ci_high": high}}
    rows = [row("teacher", "kd-teacher", 3, "teacher-sft", "", 26.82, 25.1, 28.4),
            row("sft", "kd-student", 9, "sft", "", 10.55, 9.7, 11.4),
            row("sft", "kd-student", 5, "sft", "", 99.0, 98.0, 99.5),  # an older run's version: not in the table
            row("jsd_transfer", "kd-student", 10, "kd", "jsd", 6.44, 5.6, 7.3)]
    paired = [{"model": "teacher", "mean_diff": 16.27, "ci_low": 14.9, "ci_high": 17.6, "p_value": 0.0002},
              {"model": "jsd_transfer", "mean_diff": -4.11, "ci_low": -5.55, "ci_high": -2.78, "p_value": 0.0004}]
    (run_dir / "reports/compare.json").write_text(json.dumps(
        {"rows": rows, "paired_vs_sft": paired, "metric": "pinned/rougeL_sampled_mean", "paired_set": "pinned",
         "eval_sets": {"pinned": {"n_prompts": 500}}}))
    (run_dir / "registry.json").write_text(json.dumps({"versions": {  # (sorted by name: the table orders by role)
        "jsd_transfer": {"registered_model": "kd-student", "version": 10}, "sft": {"registered_model": "kd-student",
        "version": 9}, "teacher": {"registered_model": "kd-teacher", "version": 3}}}))
    table = readme_table.run_table(run_dir)
    assert table.splitlines()[2:5] == [
        "| teacher | teacher-sft | 26.82 [25.10, 28.40] | +16.27 [+14.90, +17.60] | < 0.001 |",
        "| sft | sft | 10.55 [9.70, 11.40] | — | — |",
        "| jsd_transfer | kd (jsd) | 6.44 [5.60, 7.30] | -4.11 [-5.55, -2.78] | < 0.001 |"]
    assert "`pinned` eval set, 500 prompts" in table and "git 412d2cf" in table

    readme = tmp_path / "README.md"
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(readme_table.BEGIN) == 1 and text.count(readme_table.END) == 1
    assert len(text.split(readme_table.BEGIN)[0].splitlines()) < 30  # the table is on the first screen
    readme.write_text(text, encoding="utf-8")
    readme_table.write_into(readme, table)
    written = readme.read_text(encoding="utf-8")
    assert f"{readme_table.BEGIN}\n{table}\n{readme_table.END}" in written
    assert written.split(readme_table.BEGIN)[0] == text.split(readme_table.BEGIN)[0]
    assert written.split(readme_table.END)[1] == text.split(readme_table.END)[1]
