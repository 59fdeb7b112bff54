"""Two pipelines with different params at the same time, in one project folder, against one MLflow store:
separate run folders, separate MLflow parent runs, no file of one in the other, both registered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_params, write_params

KD = str(Path(sys.executable).with_name("kd"))

pytestmark = pytest.mark.slow


def _params(run_dir: str, divergence: str) -> dict:
    p = tiny_params(run_dir=run_dir)
    del p["students"]["sft"]
    p["students"]["fkl"].pop("finetune")
    p["students"]["fkl"]["divergence"] = divergence
    for model in (p["teacher"], p["students"]["fkl"]):
        model["training"] = dict(model["training"], max_steps=3)
    p["evaluation"].update(limit=3, sample_seeds=[0], exaccerr_prompts=0)
    p["evaluation"]["generation"]["max_new_tokens"] = 4
    return p


@pytest.mark.fresh_stores  # both runs create the MLflow store and Prefect database at once, as first runs do
def test_two_pipelines_at_once_do_not_touch_each_other(project):
    runs = {"a": _params("runs/a", "fkl"), "b": _params("runs/b", "rkl")}
    procs = {}
    for name, params in runs.items():
        path = write_params(project, params).rename(project / f"params_{name}.yaml")
        procs[name] = subprocess.Popen([KD, "run", "--params", str(path.name)], cwd=project,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = {name: proc.communicate(timeout=400) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"run {name}:\n{outputs[name][1][-4000:]}"

    a, b = project / "runs/a", project / "runs/b"
    files = {name: {p.relative_to(root) for p in root.rglob("*") if p.is_file()} for name, root in (("a", a), ("b", b))}
    assert files["a"] and files["b"]
    # no temporary leftovers of atomic writes
    for rel in files["a"] | files["b"]:
        assert not any(part.startswith(".") and ("tmp" in part or "old" in part) for part in rel.parts), rel
    assert {p.name for p in (a / "models").iterdir()} == {"teacher", "fkl"}
    # different params really gave different models (nothing was shared or overwritten)
    assert (a / "models/fkl/model.safetensors").read_bytes() != (b / "models/fkl/model.safetensors").read_bytes()

    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    parents = {r.data.tags["kd.run_dir"]: r for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("kd.role") == "pipeline"}
    assert set(parents) == {"runs/a", "runs/b"}
    for run_dir, parent in parents.items():
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert {c.data.tags.get("kd.stage") for c in children} >= {"prepare", "train_teacher", "distill", "register"}
        assert {c.data.tags["kd.params_hash"] for c in children} == {parent.data.tags["kd.params_hash"]}
    assert parents["runs/a"].data.tags["kd.params_hash"] != parents["runs/b"].data.tags["kd.params_hash"]
    # no file of one run names the other, neither its folder nor its MLflow parent run; except the comparison
    # report's table of the registry's versions (every run's, each tagged with its run folder: by design)
    for root, other in ((a, "runs/b"), (b, "runs/a")):
        marks = (other.encode(), parents[other].info.run_id.encode())
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                if path == root / "reports/compare.json":
                    report = json.loads(data)
                    report["rows"] = [r for r in report["rows"] if r["tags"].get("kd.run_dir") != other]
                    data = json.dumps(report).encode()
                assert not any(mark in data for mark in marks), f"{path.relative_to(project)} names {other}"

    students = client.search_model_versions("name='kd-student'")
    by_dir = {v.tags["kd.run_dir"]: v for v in students}
    assert set(by_dir) == {"runs/a", "runs/b"} and len(students) == 2
    assert {by_dir["runs/a"].tags["kd.divergence"], by_dir["runs/b"].tags["kd.divergence"]} == {"fkl", "rkl"}
    assert sorted(int(v.version) for v in students) == [1, 2]
    assert len(client.search_model_versions("name='kd-teacher'")) == 2
