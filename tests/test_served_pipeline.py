"""A whole `kd_pipeline` flow run whose teacher is served by another process (tests/vllm_stub.py serving the tiny
teacher of an in-process run): the flow completes; the teacher's metrics say it is served (its generation metrics
through the endpoint); the students (one with the teacher cache, one live) are registered and the teacher is not,
but has its row (from its metrics) in the comparison report and the console's table; the students' top-1
agreement, asked of the endpoint, equals the in-process teacher's."""

from __future__ import annotations

import copy
import json

import pytest

from kd_core.config import parse_config
from kd_core.data.tokenize import batches
from kd_core.evaluation.teacher_forcing import collect_token_stats, top1_agreement, top1_agreement_tokens
from kd_core.models.build import load_checkpoint
from kd_core.run import RunPaths, load_model_tokenizer, load_train_set
from kd_core.stages.prepare import prepare
from kd_core.stages.train_teacher import train_teacher
from tests.conftest import TINY_MODEL, registered_versions, tiny_params, write_params
from tests.vllm_stub import serving

K = 8
TRAINING = {"max_steps": 3, "learning_rate": 0.003, "batch_size": 8, "logging_steps": 1, "warmup_ratio": 0.0}
STUDENT = {"method": "kd", "teacher": "teacher", "train_data": "train", "divergence": "fkl", "model": TINY_MODEL,
           "training": TRAINING}


@pytest.mark.slow
def test_a_pipeline_with_a_served_teacher_runs_to_the_end(project, empty_stores, capsys, monkeypatch):
    from flows.pipeline import kd_pipeline
    from kd_core.cli import print_table

    local = parse_config(tiny_params(run_dir="runs/local"))
    local_paths = RunPaths.of(local)
    prepare(local, local_paths)
    train_teacher(local, local_paths)
    params = tiny_params(run_dir="runs/served")
    params["students"] = {"cached": copy.deepcopy(STUDENT) | {"teacher_cache": {"enabled": True, "top_k": K}},
                          "live": copy.deepcopy(STUDENT)}
    with serving(local_paths.model("teacher"), "tiny-teacher") as url:
        params["teacher"] |= {"train": False, "model": {"tokenizer": str(local_paths.tokenizer), "endpoint": {
            "url": url, "model": "tiny-teacher", "top_k": K, "batch_size": 8}}}
        path = write_params(project, params)
        with empty_stores.prefect_harness():
            result = kd_pipeline(params_path=str(path))
    cfg = parse_config(params)
    paths = RunPaths.of(cfg)

    teacher_metrics = json.loads(paths.metrics("teacher").read_text())  # generated through the endpoint
    assert {k: teacher_metrics[k] for k in ("served", "endpoint", "model", "parameters")} == {
        "served": True, "endpoint": url, "model": "tiny-teacher", "parameters": None}
    assert "test/rougeL_greedy" in teacher_metrics and "val/loss" not in teacher_metrics
    assert set(result["registered"]["versions"]) == {"cached", "live"}
    assert "served by another process" in result["registered"]["not_registered"]["teacher"]
    assert json.loads(paths.registry.read_text())["not_registered"] == result["registered"]["not_registered"]
    assert {v.tags["kd.model"] for v in registered_versions("kd-student")} == {"cached", "live"}
    assert registered_versions("kd-teacher") == []
    assert result["registered"]["champion"].get("version") is not None
    report = (paths.reports / "compare.md").read_text()
    assert "cached (kd-student" in report
    # the served teacher (never registered) has its row, from metrics/teacher.json, in the report and the console
    (served_row,) = [r for r in result["compare"]["rows"] if r.get("served")]
    assert served_row["label"] == "teacher (served)" and served_row["served"] == url
    assert served_row["metrics"]["test/rougeL_greedy"] == teacher_metrics["test/rougeL_greedy"]
    assert f"| teacher (served) | teacher | served |  | {teacher_metrics['test/rougeL_sampled_mean']:.2f}" in report
    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe: the table at its own width (pytest-xdist sets COLUMNS)
    print_table(result["compare"])
    console = [line for line in capsys.readouterr().out.splitlines() if "teacher (served)" in line]
    assert len(console) == 1 and f"{teacher_metrics['test/rougeL_greedy']:.2f}" in console[0]

    teacher = load_checkpoint(local_paths.model("teacher"))  # the weights the stub served
    for name in ("cached", "live"):
        metrics = json.loads(paths.metrics(name).read_text())
        assert not any(k.startswith(("test/unc_bucket", "test/exaccerr")) for k in metrics)
        assert "test/kl_teacher_student" not in metrics
        tokenizer = load_model_tokenizer(paths, name)
        test_set, _ = load_train_set(cfg, paths, tokenizer, "test")
        stats = collect_token_stats(load_checkpoint(paths.model(name)), teacher,
                                    batches(test_set, tokenizer.pad_token_id, 32))
        assert metrics["test/top1_agreement"] == pytest.approx(top1_agreement(stats), abs=1e-9)
        assert metrics["test/top1_agreement_tokens"] == pytest.approx(top1_agreement_tokens(stats), abs=1e-9)
        # over the top-k and a tail bucket KL can only lose: at most the full KL, and not 0
        assert 0 < metrics["test/kl_teacher_student_topk"] <= float(stats.kl.mean()) + 1e-5
