"""End-to-end runs of the tiny configuration: stage functions, the Prefect flow, `dvc repro`, and bad
input that must register nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_core.config import parse_config
from kd_core.run import RunPaths
from kd_core.tracking.registry import version_rows  # a version's tags and its lineage document, merged
from tests.conftest import (copy_reproduced, dvc_project, dvc_status, registered_versions, reproduced_params, tiny_params,
                            write_params)

KD = str(Path(sys.executable).with_name("kd"))


def _check_run(project: Path, cfg) -> None:
    """What a first run reports and registers (the metrics' values themselves are checked against independent
    computations in tests/test_metric_references.py)."""
    paths = RunPaths.of(cfg)
    reported = {}
    for name in ["teacher", *cfg.students]:
        metrics = reported[name] = json.loads((project / paths.metrics(name)).read_text())
        assert metrics["val/loss"] > 0 and 0 <= metrics["test/rougeL_sampled_mean"] <= 100
        assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-6)
        assert metrics["test/rougeL_sampled_ci_low"] <= metrics["test/rougeL_sampled_mean"] <= metrics["test/rougeL_sampled_ci_high"]
        if name != "teacher":
            assert 0 <= metrics["test/top1_agreement"] <= 1
    students = {v.tags["kd.model"]: v for v in registered_versions("kd-student")}
    assert set(students) == set(cfg.students)
    fkl = students["fkl"]
    assert fkl.tags["kd.method"] == "kd" and fkl.tags["kd.divergence"] == "fkl"
    assert fkl.tags["kd.params_hash"] == cfg.fingerprint() and fkl.tags["kd.teacher"] == "teacher"
    lineage = {r["tags"]["kd.model"]: r["tags"] for r in version_rows("kd-student")}  # tags + the lineage document
    assert int(lineage["fkl"]["kd.parameters"]) > 0 and fkl.tags["kd.data_version"]
    assert [v.tags["kd.role"] for v in registered_versions("kd-teacher")] == ["teacher"]
    champion = MlflowClient().get_model_version_by_alias("kd-student", "champion")
    rule = cfg.tracking.champion  # a first run: no earlier champion, so the best student by the rule's metric
    best = (max if rule.mode == "max" else min)(reported[name][rule.metric] for name in cfg.students)
    assert reported[champion.tags["kd.model"]][rule.metric] == best
    report = (project / paths.reports / "compare.md").read_text()
    assert "teacher (kd-teacher v1)" in report and "fkl (kd-student" in report
    paired_set = cfg.tracking.champion.metric.split("/")[0]  # paired bootstrap on the champion metric's eval set
    if "sft" in cfg.students:
        assert f"## Paired comparison with the SFT student ({paired_set} prompts, bootstrap over prompts)" in report
    assert (project / paths.reports / "size_vs_quality.png").stat().st_size > 1000
    # the registered model loads back as a transformers pipeline
    import mlflow

    loaded = mlflow.transformers.load_model(f"models:/kd-student/{fkl.version}")
    assert loaded.model.config.n_layer == 1


@pytest.mark.slow
def test_prefect_flow_end_to_end(project, empty_stores):
    from flows.pipeline import kd_pipeline

    path = write_params(project, tiny_params())
    with empty_stores.prefect_harness():
        result = kd_pipeline(params_path=str(path))
    cfg = parse_config(tiny_params())
    assert set(result["registered"]["versions"]) == {"teacher", "sft", "fkl"}
    _check_run(project, cfg)
    # the run's MLflow runs: a parent with nested stage runs
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if r.data.tags.get("kd.role") == "pipeline"]
    assert len(parents) == 1
    stages = {r.data.tags.get("kd.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"prepare", "train_teacher", "distill", "finetune", "evaluate", "register"} <= stages


@pytest.mark.slow
def test_dvc_repro_end_to_end_and_noop(project, reproduced_project):
    """`dvc repro` of the tiny params with one student (one process per stage: `reproduced_project`, made once a
    session on the prepared project, whose data, tokenizer and teacher DVC finds up to date), checked in a copy."""
    params = reproduced_params()
    reproduced, first_stdout = reproduced_project
    copy_reproduced(reproduced, project, stores=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def sh(*cmd):
        return subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True, text=True)

    assert "Running stage 'distill@fkl'" in first_stdout
    assert "Running stage 'compare'" in first_stdout
    second = sh("dvc", "repro")
    assert "Running stage" not in second.stdout  # nothing to do
    lock = (project / "dvc.lock").read_text()
    assert "distill@fkl" in lock and "runs/tiny/models/teacher" in lock
    cfg = parse_config(params)
    _check_run(project, cfg)
    # DVC plots: the UNC buckets of each student (data) and the report's images, with no load error
    plots = json.loads(sh("dvc", "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots["errors"]
    unc = plots["data"]["runs/tiny/reports/unc/fkl.json"][0]["content"]["data"]["values"]
    assert [p["bucket"] for p in unc] == list(range(cfg.evaluation.unc_buckets))
    assert all(0.0 <= p["top1_agreement"] <= 1.0 for p in unc)
    assert {"runs/tiny/reports/unc_buckets.png", "runs/tiny/reports/size_vs_quality.png"} <= set(plots["data"])
    # an experiment with one param changed reruns only the stages that depend on it
    exp = sh("dvc", "exp", "run", "-S", "tracking.champion.min_delta=0.5")
    assert "Running stage 'register'" in exp.stdout and "Running stage 'distill" not in exp.stdout


def test_bad_params_exit_nonzero_and_register_nothing(project):
    params = tiny_params()
    params["students"]["fkl"].update(divergence="jsd", divergence_args={"beta": 3})
    write_params(project, params)
    store = (project / "mlflow.db").read_bytes()  # the fixture's empty store
    out = subprocess.run([KD, "run"], cwd=project, capture_output=True, text=True)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: params.yaml: students.fkl.divergence_args.beta: 3.0 is outside [0.0, 1.0]"]
    assert not (project / "runs").exists() and (project / "mlflow.db").read_bytes() == store


def test_bad_data_found_by_the_flow_is_its_line_without_a_traceback(project):
    """A malformed line of the data file is found by `prepare`, inside the flow: `kd run` ends with status 2 and
    the error's line, and Prefect's engine logs the failure without the traceback (146 lines of it before)."""
    from kd_core.data.builtin import generate_builtin
    from kd_core.io import write_jsonl_atomic

    params = tiny_params()
    params["data"] = {"source": "file", "path": "data/d.jsonl", "template": "minimal"}
    write_params(project, params)
    write_jsonl_atomic(project / "data/d.jsonl", generate_builtin(40, 0))
    lines = (project / "data/d.jsonl").read_text().splitlines()
    lines[5] = "{instruction: oops"
    (project / "data/d.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([KD, "run"], cwd=project, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    error = "data/d.jsonl:6: malformed JSON: Expecting property name enclosed in double quotes (column 2)"
    assert out.stderr.splitlines()[-1] == f"error: {error}"
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) < 12, out.stderr
    assert f"Encountered exception during execution: DataError('{error}')" in out.stderr  # the flow's log line
    assert registered_versions("kd-student") == [] and not (project / "runs/tiny/data").exists()


def test_missing_data_file_is_one_clear_error(project):
    params = tiny_params()
    params["data"] = {"source": "file", "path": "nope.jsonl"}
    write_params(project, params)
    out = subprocess.run([KD, "stage", "prepare"], cwd=project, capture_output=True, text=True)
    assert out.returncode == 2
    assert "error: nope.jsonl: data file not found" in out.stderr
    assert registered_versions("kd-student") == []


@pytest.mark.slow
def test_teacher_assistant_chain_and_seqkd_through_the_flow(project, empty_stores):
    """teacher -> ta -> small (a chain of two links), and a SeqKD student on a teacher-generated set."""
    from flows.pipeline import kd_pipeline
    from tests.conftest import TINY_MODEL, TINY_TRAINING

    params = tiny_params()
    params["transfer_sets"] = {"teacher_samples": {"source": "teacher", "n_samples": 2, "max_new_tokens": 8,
                                                   "strategy": "confidence", "keep_fraction": 0.5}}
    params["students"] = {
        "small": {"method": "kd", "teacher": "ta", "train_data": "train", "divergence": "rkl", "model": TINY_MODEL,
                  "training": TINY_TRAINING},
        "ta": {"method": "kd", "teacher": "teacher", "train_data": "train", "divergence": "fkl",
               "model": {"config": {"arch": "llama", "n_layer": 1, "hidden": 40, "n_head": 2}}, "training": TINY_TRAINING},
        "seq": {"method": "seqkd", "teacher": "teacher", "train_data": "teacher_samples", "model": TINY_MODEL,
                "training": TINY_TRAINING},
    }
    path = write_params(project, params)
    cfg = parse_config(params)
    assert cfg.chain_order() == ["ta", "small", "seq"]
    with empty_stores.prefect_harness():
        kd_pipeline(params_path=str(path))
    transfer = [json.loads(line) for line in (project / "runs/tiny/data/teacher_samples.jsonl").read_text().splitlines()]
    n_train = len((project / "runs/tiny/data/train.jsonl").read_text().splitlines())
    assert 0 < len(transfer) <= n_train + 1 and all(r["generated_by"] == "teacher" for r in transfer)
    info = json.loads((project / "runs/tiny/train_info/small.json").read_text())
    assert info["teacher"] == "ta"
    versions = {r["tags"]["kd.model"]: r["tags"] for r in version_rows("kd-student")}
    assert versions["ta"]["kd.role"] == "assistant" and versions["small"]["kd.teacher"] == "ta"
    assert versions["seq"]["kd.train_data"] == "teacher_samples" and versions["seq"]["kd.method"] == "seqkd"


@pytest.mark.slow
def test_flow_records_in_dvc_skips_what_is_up_to_date_and_checks_out_a_version(project, empty_stores):
    """After the flow, `dvc status` is clean (dvc.lock written, outputs cached); a second flow run skips every
    stage and registers nothing; changing one student's params makes only its stages out of date; after the
    data changes (more built-in rows), a run registers new versions, and `kd checkout` of a first-run version
    restores that run's data split and model folder byte for byte."""
    from typer.testing import CliRunner

    from flows.pipeline import kd_pipeline
    from kd_core.cli import app
    from kd_core.io import tree_hash
    from kd_core.pipeline.dag import expand

    params = tiny_params()
    dvc_project(project, params)
    paths = RunPaths.of(parse_config(params))
    with empty_stores.prefect_harness():
        first = kd_pipeline(params_path="params.yaml")
        assert first["skipped"] == []
        assert dvc_status(project) == {}
        first_hashes = {p: tree_hash(project / p) for p in (paths.split("train"), paths.model("fkl"))}
        fkl_v1 = first["registered"]["versions"]["fkl"]["version"]
        n_versions = len(registered_versions("kd-student"))
        second = kd_pipeline(params_path="params.yaml")
        assert set(second["skipped"]) == {n.name for n in expand(parse_config(params))}
        assert len(registered_versions("kd-student")) == n_versions  # nothing registered again
        assert second["compare"]["rows"] == first["compare"]["rows"]

        params["students"]["fkl"]["temperature"] = 2.0
        write_params(project, params)
        stale = set(dvc_status(project))
        assert stale == {"cache_teacher@fkl", "distill@fkl", "finetune@fkl"}, stale
        params["students"]["fkl"]["temperature"] = 1.0
        write_params(project, params)

        params["data"]["builtin_examples"] = 300  # 60 more rows
        write_params(project, params)
        third = kd_pipeline(params_path="params.yaml")
        assert third["skipped"] == []  # every stage reads the data
        assert third["registered"]["versions"]["fkl"]["new"] is True
    assert len(registered_versions("kd-student")) == n_versions + len(params["students"])
    assert tree_hash(project / paths.split("train")) != first_hashes[paths.split("train")]
    # each version has a model card (its description, and README.md beside the logged model)
    import mlflow

    client = MlflowClient()
    v1 = client.get_model_version("kd-student", str(fkl_v1))
    assert v1.description.startswith("# fkl: distilled student")  # the card without its YAML metadata
    assert "divergence `fkl`" in v1.description and "test/rougeL_sampled" in v1.description
    card = mlflow.artifacts.download_artifacts(run_id=v1.run_id, artifact_path="fkl/README.md")
    readme = Path(card).read_text()
    assert readme.startswith("---\n") and readme.endswith(v1.description)
    # the pipeline runs hold the resolved config, params.yaml, dvc.lock and the report; three runs, three parents
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if r.data.tags.get("kd.role") == "pipeline"]
    assert len(parents) == 3 and all(r.info.status == "FINISHED" for r in parents)
    last = max(parents, key=lambda r: r.info.start_time)
    assert last.data.params["students.fkl.method"] == "kd" and last.data.tags["kd.dvc"] == "recorded"
    listed = {a.path for a in client.list_artifacts(last.info.run_id)}
    assert {"config", "lineage", "reports"} <= listed

    runner = CliRunner()
    shown = runner.invoke(app, ["lineage", f"kd-student:{fkl_v1}"])
    assert shown.exit_code == 0, shown.output
    assert "teacher chain: teacher <- fkl" in shown.output and "data.runs/tiny/data/train.jsonl" in shown.output
    out = runner.invoke(app, ["checkout", f"kd-student:{fkl_v1}"])
    assert out.exit_code == 0, out.output
    assert {p: tree_hash(project / p) for p in first_hashes} == first_hashes
