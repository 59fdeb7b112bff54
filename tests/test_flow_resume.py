"""Stage-level resume of a whole `kd run` (issue 12, item 5; issue 18, cancellation): a run cancelled (SIGTERM)
and then one killed (SIGKILL) during a student's distillation, started again, skip the stages that finished,
resume the interrupted one from its last complete checkpoint (the cancellation's, then `training.save_steps`')
and leave the registry as an uninterrupted run leaves it.

The kill is deterministic: `KD_TEST_DIE_AFTER_CHECKPOINT=distilled/fkl:4` makes the `kd run` process SIGKILL
itself right after the checkpoint of fkl's distillation step 4 is complete (kd_core.training.trainer's test hook)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from kd_core.config import parse_config
from kd_core.faults import DIE_AFTER_CHECKPOINT_ENV, SIGTERM_AT_STEP_ENV
from kd_core.io import tree_hash
from kd_core.pipeline.dag import expand
from kd_core.run import RunPaths
from kd_core.training.trainer import last_complete_checkpoint
from tests.conftest import dvc_project, dvc_status, registered_versions, tiny_params

pytestmark = pytest.mark.slow

KD = str(Path(sys.executable).with_name("kd"))
STEPS, SAVE_STEPS, KILLED_AT = 8, 2, 4


def _params() -> dict:
    params = tiny_params()
    for student in params["students"].values():
        student["training"] = dict(student["training"], max_steps=STEPS)
    params["students"]["fkl"]["training"]["save_steps"] = SAVE_STEPS
    params["evaluation"].update(limit=3, sample_seeds=[0], exaccerr_prompts=0)
    return params


def _kd_run(project: Path, log: Path, **env: str) -> tuple[int, str]:
    """`kd run` in `project` (its own Prefect home and MLflow store), output to `log`. It runs in a session of
    its own: a run that kills itself leaves its ephemeral Prefect server behind, which is ended here."""
    env = dict(os.environ, PREFECT_HOME=str(project / ".prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", **env)
    with log.open("w") as out:
        proc = subprocess.Popen([KD, "run"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of this run's process group (the server)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode, log.read_text()


def _stage_runs(stage: str, model: str | None = None) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], f"tags.`kd.stage` = '{stage}'")
    return [r for r in runs if model is None or r.data.tags.get("kd.model") == model]


def _uninterrupted_fkl(folder: Path, params: dict, inputs: RunPaths, monkeypatch) -> Path:
    """fkl's stages (teacher cache, distill, finetune) run in-process without a kill in `folder`, on copies of
    the data, tokenizer and teacher of the resumed project (outputs of the stages that finished before the kill).
    Its MLflow runs go to the current store (the checks of the resumed project's store are done by then)."""
    from kd_core.pipeline.one_stage import run_stage
    from tests.conftest import write_params

    cfg = parse_config(params)
    write_params(folder, params)
    root = folder / cfg.run_dir
    for rel in ("data", "tokenizer", f"models/{cfg.teacher.name}", f"train_info/{cfg.teacher.name}.json"):
        src, dst = inputs.root / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    monkeypatch.chdir(folder)
    for stage in ("cache_teacher", "distill", "finetune"):
        run_stage(stage, cfg, "fkl")
    return root


def test_killed_flow_resumes_at_the_interrupted_stage(project, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(project / ".dvc-site-cache"))  # not /var/tmp/dvc (hermetic)
    params = _params()
    dvc_project(project, params)
    cfg = parse_config(params)
    paths = RunPaths(project / cfg.run_dir)
    nodes = [n.name for n in expand(cfg)]
    interrupted = nodes.index("distill@fkl")
    ckpts = paths.root / "distilled" / ".fkl-checkpoints"

    # 0. cancelled (SIGTERM, as Prefect cancels a flow run) during fkl's step 1: the stage stops at the next step
    # boundary with a checkpoint there (the signal reaches the main thread while the task's thread trains, so the
    # step boundary is 1 or 2), the flow ends, the process exits with 143
    rc, out = _kd_run(project, project / "cancelled.log", **{SIGTERM_AT_STEP_ENV: "distilled/fkl:1"})
    assert rc == 128 + signal.SIGTERM, out[-4000:]
    assert "cancelled (SIGTERM) at step" in out
    stopped_at = int(last_complete_checkpoint(ckpts).name.removeprefix("checkpoint-"))
    assert stopped_at in (1, 2) and not paths.distilled("fkl").exists()

    # 1. started again (it resumes from that checkpoint), killed right after fkl's step-4 checkpoint is saved
    rc, out = _kd_run(project, project / "killed.log", **{DIE_AFTER_CHECKPOINT_ENV: f"distilled/fkl:{KILLED_AT}"})
    assert rc == -signal.SIGKILL, out[-4000:]
    cancelled_run, killed_run = sorted(_stage_runs("distill", "fkl"), key=lambda r: r.info.start_time)
    history = MlflowClient().get_metric_history(killed_run.info.run_id, "loss")
    assert history and min(m.step for m in history) > stopped_at, [m.step for m in history]
    assert set(dvc_status(project)) == set(nodes[interrupted:]), "finished stages are recorded, the rest are not"
    assert {"prepare", "train_teacher", "distill@sft"} <= set(nodes[:interrupted])
    assert last_complete_checkpoint(ckpts).name == f"checkpoint-{KILLED_AT}"
    assert not paths.distilled("fkl").exists() and not paths.model("fkl").exists()
    assert registered_versions("kd-student") == [] and registered_versions("kd-teacher") == []

    # 2. started again without the hook: the finished stages are skipped, fkl's distillation resumes at step 4
    rc, out = _kd_run(project, project / "resumed.log", PREFECT_LOGGING_LEVEL="INFO")
    assert rc == 0, out[-4000:]
    skipped = re.findall(r"(\S+): up to date in DVC, skipped", out)  # the flow's log line of a Skipped task
    assert skipped == nodes[:interrupted], skipped
    assert len(_stage_runs("prepare")) == len(_stage_runs("train_teacher")) == 1  # not run again
    assert len(_stage_runs("distill", "sft")) == 1
    *_, resumed_run = sorted(_stage_runs("distill", "fkl"), key=lambda r: r.info.start_time)
    history = MlflowClient().get_metric_history(resumed_run.info.run_id, "loss")
    assert history and min(m.step for m in history) > KILLED_AT, [m.step for m in history]
    assert max(m.step for m in history) == STEPS
    info = json.loads(paths.train_info("fkl.distill").read_text())
    assert info["steps"] == STEPS
    assert not ckpts.exists(), "checkpoints are removed once the final model is saved"

    # 3. the registry ends as an uninterrupted run's: one version per model, champion set, DVC clean
    assert dvc_status(project) == {}
    assert len(registered_versions("kd-teacher")) == 1
    students = registered_versions("kd-student")
    assert sorted(v.tags["kd.model"] for v in students) == sorted(cfg.students)
    assert MlflowClient().get_model_version_by_alias("kd-student", "champion").tags["kd.model"] in cfg.students
    # the killed run's MLflow runs (its pipeline run, fkl's distill) were closed as KILLED, the cancelled one's as
    # FAILED, none left RUNNING
    every = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tiny").experiment_id])
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    assert sorted(r.info.status for r in _stage_runs("distill", "fkl")) == ["FAILED", "FINISHED", "KILLED"]

    # 4. the same weights as fkl trained without a kill (same inputs and seed, CPU)
    straight = _uninterrupted_fkl(tmp_path_factory.mktemp("straight"), params, paths, monkeypatch)
    a = load_file(straight / "distilled/fkl/model.safetensors")
    b = load_file(paths.distilled("fkl") / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    fkl = next(v for v in students if v.tags["kd.model"] == "fkl")
    assert fkl.tags["kd.model_hash"] == tree_hash(straight / "models/fkl"), "registered: the uninterrupted weights"
