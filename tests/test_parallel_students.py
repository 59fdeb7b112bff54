"""`orchestration.max_parallel_students > 1` (flows/pipeline.py): the flow runs two independent students'
stages at the same time, every stage waits for the stages that write what it reads, and the students come out
as they do when their stages run one after another (same weights, same metrics)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from kd_core.config import parse_config
from kd_core.pipeline.dag import expand, producers
from kd_core.run import RunPaths
from tests.conftest import PREPARED_STAGES, copy_prepared, tiny_params

pytestmark = pytest.mark.slow

STUDENTS = ("sft", "fkl")
BARRIER_S = 300  # a deadlock guard, not a timing: the other student's distillation starts at once when parallel


def _params(workers: int) -> dict:
    params = tiny_params(orchestration={"max_parallel_students": workers})
    params["students"]["fkl"].pop("finetune")  # (one `kd stage` process less: finetune is the distilled model)
    params["evaluation"].update(limit=4, sample_seeds=[0, 1], exaccerr_prompts=0)
    return params


def _timing(key: str) -> bool:
    return key.endswith(("_time_s", "_per_s", "seconds"))


def _outputs(paths: RunPaths, name: str) -> tuple[dict, dict]:
    weights = load_file(paths.model(name) / "model.safetensors")
    metrics = {k: v for k, v in json.loads(paths.metrics(name).read_text()).items() if not _timing(k)}
    return weights, metrics


def test_parallel_students_overlap_wait_for_producers_and_match_a_sequential_run(
        project, prepared_project, empty_stores, tmp_path_factory, monkeypatch):
    import flows.pipeline as pipeline
    from kd_core.pipeline import execute
    from kd_core.pipeline.one_stage import run_stage

    params = _params(workers=2)
    copy_prepared(prepared_project, project, params)
    cfg = parse_config(params)
    nodes = expand(cfg)

    # every stage the flow runs is logged (a `kd stage` process, `run_as_process`, or in the flow's process); each
    # student's distillation waits until the other one's has started: one stage at a time, the first waits in vain
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    started = {name: threading.Event() for name in STUDENTS}
    node_of = {(n.stage.name, n.key): n.name for n in nodes}

    def traced(run, key_at: int):  # key_at: where the key is among the positional arguments after the stage
        def wrapper(stage: str, *args):
            key = args[key_at] if len(args) > key_at else None
            node = node_of[stage, key]
            with lock:
                events.append(("start", node))
            if stage == "distill":
                started[key].set()
                other = next(name for name in STUDENTS if name != key)
                if not started[other].wait(BARRIER_S):
                    raise AssertionError(f"distill@{key} ran alone: distill@{other} did not start alongside it")
            try:
                return run(stage, *args)
            finally:
                with lock:
                    events.append(("end", node))
        return wrapper

    monkeypatch.setattr(execute, "run_as_process", traced(execute.run_as_process, 0))  # (stage, key, params, ...)
    monkeypatch.setattr(execute, "run_stage", traced(run_stage, 1))  # (stage, cfg, key)
    with empty_stores.prefect_harness():
        result = pipeline.kd_pipeline(params_path="params.yaml")
    assert set(result["registered"]["versions"]) == {"teacher", *STUDENTS}
    assert set(PREPARED_STAGES) <= set(result["skipped"])  # made once a run (tests/conftest.py)

    # a stage retried (a transient error) has several starts: its first start, and its last end, count
    first_start = {node: i for i, (kind, node) in reversed(list(enumerate(events))) if kind == "start"}
    last_end = {node: i for i, (kind, node) in enumerate(events) if kind == "end"}
    ran = [n for n in nodes if n.name in first_start]
    assert {n.name for n in ran} == {n.name for n in nodes} - set(PREPARED_STAGES), events
    assert all(n.name in last_end for n in ran), events
    # both distillations were under way together
    assert max(first_start[f"distill@{s}"] for s in STUDENTS) < min(last_end[f"distill@{s}"] for s in STUDENTS), events
    # ... and no stage started before the stages that write what it reads had ended
    for node in ran:
        for producer in producers(node, nodes):
            if producer.name in last_end:
                assert last_end[producer.name] < first_start[node.name], (producer.name, node.name, events)

    # the same students, their stages run one after another in process in a copy of the same prepared project
    parallel = {name: _outputs(RunPaths(project / cfg.run_dir), name) for name in STUDENTS}
    alone = tmp_path_factory.mktemp("sequential")
    copy_prepared(prepared_project, alone, _params(workers=1))
    monkeypatch.chdir(alone)
    sequential_cfg = parse_config(_params(workers=1))
    for node in nodes:
        if node.key in STUDENTS and node.stage.name in ("cache_teacher", "distill", "finetune", "evaluate"):
            run_stage(node.stage.name, sequential_cfg, node.key)
    for name in STUDENTS:
        weights, metrics = _outputs(RunPaths(alone / cfg.run_dir), name)
        assert weights.keys() == parallel[name][0].keys()
        for key in weights:
            torch.testing.assert_close(parallel[name][0][key], weights[key], rtol=0, atol=0, msg=f"{name}: {key}")
        assert parallel[name][1] == metrics, name
