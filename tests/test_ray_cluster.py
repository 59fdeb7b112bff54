"""The pipeline on a Ray cluster (`execution.engine: ray`, kd_core/pipeline/cluster) of two nodes on 127.0.0.1 (Ray's own
test cluster: a head and a worker node, one CPU each): the tiny pipeline through the flow with fkl's distillation
as a Ray Train job of 2 workers and the evaluation sharded over 2 actors; its weights against a 2-process torchrun
run of the same seeds and global batch, its sharded outputs against one process's, one worker killed mid-distill,
and the lineage against the local run's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from kd_core.config import load_config, parse_config
from kd_core.config.schema import LauncherConfig
from tests.conftest import copy_prepared, dvc_status, reproduced_params, write_params

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

RAY_STAGES = {"distill": {"workers": 2, "cpus_per_worker": 1}, "evaluate": {"workers": 2, "cpus_per_worker": 1}}


class ListLog:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg, *args):
        self.lines.append(msg % args if args else msg)


def _params(**execution) -> dict:
    """`reproduced_params` (the local run the lineage is compared with), fkl at batch 8 per worker: with 2 workers the
    global batch of the local run (16), checkpoints every 2 steps, and `execution`."""
    params = reproduced_params()
    params["students"]["fkl"]["training"] = dict(params["students"]["fkl"]["training"], batch_size=8, save_steps=2)
    if execution:
        params["execution"] = execution
    return params


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def ray_cluster(session_tmpdir):
    """A Ray cluster of two nodes (1 CPU each) on 127.0.0.1, RAY_ADDRESS pointing at it; its files in the session's
    temporary folder."""
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    temp = session_tmpdir / "ray"  # where Ray also looks for the address of the current cluster (TMPDIR/ray)
    temp.mkdir(exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(temp),
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    mp.setenv("RAY_ADDRESS", cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def harness(empty_stores):
    with empty_stores.prefect_harness():
        yield


@pytest.fixture(scope="module")
def ray_run(ray_cluster, harness, prepared_project, tmp_path_factory, empty_stores):
    """The tiny pipeline (one student) through the flow on the cluster: (project folder, flow result, the lines the
    distill task logged)."""
    import flows.pipeline as pipeline
    import mlflow

    from kd_core.pipeline import execute

    root = tmp_path_factory.mktemp("ray-run")
    copy_prepared(prepared_project, root, _params(engine="ray", stages=RAY_STAGES))
    uri = f"sqlite:///{empty_stores.seed_mlflow(root / 'mlflow.db')}"
    streamed: list[ListLog] = []
    real = execute.run_training_job

    def capturing(stage, key, params_path, overrides, cfg, resources, log):
        streamed.append(ListLog())
        try:
            return real(stage, key, params_path, overrides, cfg, resources, streamed[-1])
        finally:
            for line in streamed[-1].lines:
                log.info("%s", line)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("DVC_SITE_CACHE_DIR", str(root / ".dvc-site-cache"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(execute, "run_training_job", capturing)
        mlflow.set_tracking_uri(uri)
        try:
            result = pipeline.kd_pipeline(params_path=str(root / "params.yaml"))
        finally:
            mlflow.set_tracking_uri(None)
    return root, result, streamed


def test_distill_on_two_ray_workers_equals_two_torchrun_processes(ray_run, prepared_project, tmp_path, monkeypatch):
    """fkl's distillation as a Ray Train job of 2 workers (one per node) ends with the weights of a 2-process
    torchrun launch of the same stage: bit for bit (the same code, seeds, data shards and gloo all-reduce of 2
    ranks; only who starts the processes differs)."""
    from kd_core.pipeline.launcher import run_launched
    from tests.conftest import free_port
    from kd_core.pipeline.one_stage import run_stage

    root, result, streamed = ray_run
    assert len(streamed) == 1, "distill@fkl only runs on Ray Train (the teacher, finetune and the rest in the flow)"
    lines = streamed[0].lines
    assert lines[0].startswith("submitting distill --model fkl on Ray: 2 workers")
    assert any(line.startswith("[rank0]: ") for line in lines) and any(line.startswith("[rank1]: ") for line in lines)
    info = json.loads((root / "runs/tiny/train_info/fkl.distill.json").read_text())
    assert info["steps"] == 6
    assert set(result["registered"]["versions"]) == {"teacher", "fkl"}
    assert not (root / "runs/tiny/.ray-train").exists()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    copy_prepared(prepared_project, tmp_path, _params())
    run_stage("cache_teacher", load_config(tmp_path / "params.yaml"), "fkl")  # (a manifest: no cache)
    run_launched("distill", "fkl", "params.yaml", None,
                 LauncherConfig(kind="torchrun", nproc_per_node=2, master_port=free_port()), ListLog())
    _assert_same_weights(root / "runs/tiny/distilled/fkl", tmp_path / "runs/tiny/distilled/fkl")


def test_sharded_evaluation_equals_one_process(ray_run, tmp_path, monkeypatch):
    """The evaluation of fkl and of the teacher, generations sharded over 2 actors (greedy and two sampling seeds),
    writes the generations and metrics one process writes."""
    from kd_core.pipeline.one_stage import run_stage

    root, _, _ = ray_run
    shutil.copytree(root / "runs", tmp_path / "runs", symlinks=True)
    monkeypatch.chdir(tmp_path)
    params = _params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = parse_config(params)
    for model in ("teacher", "fkl"):
        run_stage("evaluate", cfg, model)
        for name in ("test.jsonl",):
            ours = (tmp_path / f"runs/tiny/generations/{model}/{name}").read_bytes()
            assert ours == (root / f"runs/tiny/generations/{model}/{name}").read_bytes(), model
        local = json.loads((tmp_path / f"runs/tiny/metrics/{model}.json").read_text())
        sharded = json.loads((root / f"runs/tiny/metrics/{model}.json").read_text())
        assert {k: v for k, v in local.items() if "per_s" not in k} == \
            {k: v for k, v in sharded.items() if "per_s" not in k}


def test_sharded_teacher_cache_equals_one_process(ray_cluster, prepared_project, tmp_path, monkeypatch):
    """The teacher cache's forward passes over 2 actors (batches of 8, 3 batches: 2 + 1): the tensors of one process."""
    import torch

    from kd_core.pipeline.cluster.shards import sharded
    from kd_core.teachers.cache import build_cache
    from kd_core.run import RunPaths, load_model, load_run_tokenizer, load_train_set

    copy_prepared(prepared_project, tmp_path, _params())
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(_params(engine="ray", stages={"cache_teacher": {"workers": 2}}))
    paths = RunPaths.of(cfg)
    tokenizer = load_run_tokenizer(paths)
    ds, _ = load_train_set(cfg, paths, tokenizer, "train", loss_on_prompt=False)
    ds.examples = ds.examples[:20]
    teacher = load_model(paths, "teacher")
    args = (teacher, ds, tokenizer.pad_token_id, 300, 2.0, 5, 8)
    local = build_cache(*args)
    with sharded(cfg, "cache_teacher") as pool:
        merged = build_cache(*args)
        assert len(pool.actors) == 2
    assert local.keys() == merged.keys()
    for key in local:
        assert torch.equal(local[key], merged[key]), key


def test_a_killed_worker_restarts_and_training_resumes(ray_run, prepared_project, tmp_path, monkeypatch):
    """Rank 1 SIGKILLed right after the checkpoint of step 2: Ray restarts the worker group, the stage resumes from
    checkpoint-2 and ends with the weights of the uninterrupted run."""
    from kd_core.pipeline.cluster.dispatch import run_training_job, training_on_ray
    from kd_core.pipeline.one_stage import run_stage

    root, _, _ = ray_run
    copy_prepared(prepared_project, tmp_path, _params(engine="ray", stages=RAY_STAGES))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("KD_TEST_DIE_AFTER_CHECKPOINT", "distilled/fkl:2")
    monkeypatch.setenv("KD_TEST_DIE_RANK", "1")
    cfg = load_config(tmp_path / "params.yaml")
    run_stage("cache_teacher", cfg, "fkl")
    log = ListLog()
    run_training_job("distill", "fkl", "params.yaml", None, cfg, training_on_ray("distill", cfg, "fkl"), log)
    assert any(line.endswith("resuming from runs/tiny/distilled/.fkl-checkpoints/checkpoint-2") for line in log.lines), \
        log.lines[-30:]
    _assert_same_weights(root / "runs/tiny/distilled/fkl", tmp_path / "runs/tiny/distilled/fkl")


def test_a_bad_input_fails_once_with_the_in_process_error(ray_cluster, project):
    """distill on Ray before its inputs exist: the job raises the error, message and exit status of the stage in
    process, and is not run again (Ray's restart finds the recorded error and ends at once)."""
    from kd_core.pipeline.cluster.dispatch import run_training_job, training_on_ray
    from kd_core.errors import MissingInput, exit_code
    from kd_core.pipeline.one_stage import run_stage

    cfg = load_config(write_params(project, _params(engine="ray", stages=RAY_STAGES)))
    with pytest.raises(MissingInput) as in_process:
        run_stage("distill", cfg, "fkl")
    log = ListLog()
    with pytest.raises(MissingInput) as on_ray:
        run_training_job("distill", "fkl", "params.yaml", None, cfg, training_on_ray("distill", cfg, "fkl"), log)
    assert str(on_ray.value) == str(in_process.value) and exit_code(on_ray.value) == 2
    assert sum(line.startswith("[rank0]: worker 0 of 2") for line in log.lines) == 1, log.lines
    assert f"[rank0]: error: {in_process.value}" in log.lines


def test_lineage_matches_the_local_run(ray_run, reproduced_project):
    """`dvc status` is clean after the run on Ray, and its dvc.lock is the local run's (`dvc repro` of the same
    params): the same stages, commands, dependencies, params and outputs; the stages that do not depend on fkl's
    batch size (the only param that differs: 8 per worker × 2 workers vs 16) with the same hashes, the teacher's
    sharded evaluation included (but its metrics file, which holds a tokens/s)."""
    root, _, _ = ray_run
    local_root, _ = reproduced_project
    assert dvc_status(root) == {}
    ours = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    local = yaml.safe_load((local_root / "dvc.lock").read_text())["stages"]
    assert ours.keys() == local.keys()
    for name in ours:
        a, b = ours[name], local[name]
        assert a["cmd"] == b["cmd"]
        assert [d["path"] for d in a.get("deps", [])] == [d["path"] for d in b.get("deps", [])]
        assert [o["path"] for o in a.get("outs", [])] == [o["path"] for o in b.get("outs", [])]
    timed = "runs/tiny/metrics/teacher.json"  # (its gen_tokens_per_s differs from run to run)
    for name in ("prepare", "train_teacher", "evaluate_teacher"):
        a, b = (dict(e, outs=[o for o in e.get("outs", []) if o["path"] != timed]) for e in (ours[name], local[name]))
        assert a == b, name
