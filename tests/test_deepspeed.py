"""DeepSpeed ZeRO through `kd stage distill` under `torchrun`: two CPU processes (gloo) must train the same
student as one process with the same global batch, with the frozen teacher replicated or ZeRO-3 sharded, and
OKD's trainable online module (outside the engine) updated identically on every rank.

Run as a script, this file is the launch entry: it calls the `kd` CLI after telling DeepSpeed that no
compiled op is available (its shared-memory CPU all-reduce would otherwise JIT-compile for ~100 s on first
use; gloo does the reduction instead).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]



def _instrument_training(die_at_step: int, step_log: str | None) -> None:
    """For the resume test: every rank exits abruptly (as on a preempted node) when the loss of step
    `die_at_step` + 1 is computed, and rank 0 appends the step of every loss it computes to `step_log`."""
    from kd_core.training.trainer import DistillationTrainer

    compute = DistillationTrainer.compute_loss

    def instrumented(self, *args, **kwargs):
        step = self.state.global_step
        if step == die_at_step:
            os._exit(3)
        if step_log and self.is_world_process_zero():
            with open(step_log, "a") as f:
                f.write(f"{step}\n")
        return compute(self, *args, **kwargs)
    DistillationTrainer.compute_loss = instrumented


if __name__ == "__main__":
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)
    from kd_core.cli import app

    if os.environ.get("KD_TEST_DIE_AT_STEP") or os.environ.get("KD_TEST_STEP_LOG"):
        _instrument_training(int(os.environ.get("KD_TEST_DIE_AT_STEP") or -1), os.environ.get("KD_TEST_STEP_LOG"))

    app()
    sys.exit(0)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from kd_core.config import ConfigError, load_config  # noqa: E402
from kd_core.data.tokenize import CausalCollator, encode_rows, load_tokenizer  # noqa: E402
from kd_core.io import read_jsonl  # noqa: E402
from kd_core.models.build import load_checkpoint, make_model  # noqa: E402
from kd_core.run import RunPaths  # noqa: E402
from kd_core.run import n_positions as _n_positions  # noqa: E402
from kd_core.stages.distill import distill  # noqa: E402
from kd_core.stages.prepare import prepare  # noqa: E402
from kd_core.stages.train_teacher import train_teacher  # noqa: E402
from tests.conftest import TINY_MODEL, tiny_params, write_params  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 16
TOLERANCE = 1e-4  # float32 sums in another order (per-rank micro-batches, all-reduce): ~3e-6 measured


def _params() -> dict:
    training = {"max_steps": STEPS, "learning_rate": 0.003, "batch_size": GLOBAL_BATCH, "logging_steps": 2,
                "warmup_ratio": 0.0}
    params = tiny_params()
    params["teacher"]["training"] = dict(training, max_steps=6)
    params["students"] = {
        "fkl": {"method": "kd", "divergence": "fkl", "model": TINY_MODEL, "training": training},
        "okd": {"method": "okd", "method_args": {"lora_r": 4}, "model": TINY_MODEL, "training": training},
        "lora": {"method": "kd", "divergence": "fkl", "model": TINY_MODEL, "training": dict(training),
                 "lora": {"r": 4, "alpha": 8.0, "target_modules": ["c_attn", "lm_head"]}},
    }
    return params


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, empty_stores):
    """A project with data and a trained teacher; single-process reference students under `reference/`."""
    import mlflow

    pytest.importorskip("deepspeed")
    folder = tmp_path_factory.mktemp("ds")
    uri = f"sqlite:///{empty_stores.seed_mlflow(folder / 'mlflow.db')}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        write_params(folder, _params())
        cfg = load_config(folder / "params.yaml")
        paths = RunPaths.of(cfg)
        prepare(cfg, paths)
        train_teacher(cfg, paths)
        for name in cfg.students:
            distill(cfg, paths, name)
            shutil.copytree(paths.distilled(name), folder / "reference" / name)
        mlflow.set_tracking_uri(None)
    return folder, RunPaths(folder / paths.root), cfg


def _launch(folder: Path, student: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
               TORCH_EXTENSIONS_DIR=str(folder / "torch_extensions"), PYTHONPATH=str(REPO), **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "stage", "distill", "--model", student] + [a for o in overrides for a in ("-S", f"students.{student}.{o}")]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def _distill_runs(folder: Path, student: str) -> int:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, filter_string=f"tags.`kd.model` = '{student}' and tags.`kd.stage` = 'distill'"))


@torch.no_grad()
def _logits(model: torch.nn.Module, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.flatten() for b in batches])


def _val_batches(paths, cfg) -> list[dict]:
    tokenizer = load_tokenizer(paths.tokenizer)
    ds, _ = encode_rows(read_jsonl(paths.split("val"))[:16], tokenizer, cfg.data.template, cfg.tokenizer.max_length, "truncate")
    return [CausalCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])]


@pytest.mark.slow
@pytest.mark.parametrize("student, zero, extra", [
    ("fkl", "zero3", ["training.teacher_sharding=zero3"]),  # ZeRO-3 student (gathered at save), sharded teacher
    ("okd", "zero2", ["training.grad_accum=2"]),  # online module outside the engine; 2 ranks x 4 x 2 accumulation
    ("lora", "zero2", []),  # LoRA student (adapters in the engine, saved merged by rank 0)
])
def test_two_process_zero_run_matches_single_process(tiny_project, student, zero, extra):
    folder, paths, cfg = tiny_project
    per_rank = GLOBAL_BATCH // 2 // (2 if "training.grad_accum=2" in extra else 1)
    runs_before = _distill_runs(folder, student)
    proc = _launch(folder, student, f"training.deepspeed={REPO / 'infra/deepspeed' / f'{zero}.json'}",
                   f"training.batch_size={per_rank}", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]

    info = json.loads(paths.train_info(f"{student}.distill").read_text())
    assert info["steps"] == STEPS
    assert _distill_runs(folder, student) == runs_before + 1  # rank 0 alone tracked the stage

    batches = _val_batches(paths, cfg)
    reference = _logits(load_checkpoint(folder / "reference" / student), batches)
    distributed = _logits(load_checkpoint(paths.distilled(student)), batches)
    assert (distributed - reference).abs().max() < TOLERANCE
    # and training moved the student far beyond that tolerance (the match is not trivial)
    initial = make_model(cfg.student(student).model, load_tokenizer(paths.tokenizer), _n_positions(cfg), cfg.seed)
    assert (reference - _logits(initial, batches)).abs().max() > 100 * TOLERANCE

    if student == "lora":  # the adapter beside the merged model, as in one process
        name = "adapter/adapter_model.safetensors"
        ref, got = load_file(folder / "reference" / student / name), load_file(paths.distilled(student) / name)
        assert ref.keys() == got.keys()
        assert max((ref[k] - got[k]).abs().max().item() for k in ref) < TOLERANCE
    if student == "okd":  # the online module trained on both ranks equals the single-process one
        name = "okd_online_module/adapter_model.safetensors"
        ref, got = load_file(folder / "reference" / student / name), load_file(paths.distilled(student) / name)
        assert ref.keys() == got.keys()
        assert max((ref[k] - got[k]).abs().max().item() for k in ref) < TOLERANCE


@pytest.mark.slow
def test_two_process_zero_run_killed_after_a_checkpoint_resumes_from_it(tiny_project):
    """Both ranks die during step 3 of 4, after the DeepSpeed checkpoint of step 2 (weights and optimizer
    shards in `global_step2/`, the online module in `extra_modules.pt`). Launched again, the run resumes at
    step 2 and ends with the student and online module of the uninterrupted single-process run (a restart
    from scratch would also end there: the step log tells them apart)."""
    folder, paths, cfg = tiny_project
    student = "okd"
    ckpts = paths.distilled(student).parent / f".{student}-checkpoints"
    shutil.rmtree(paths.distilled(student), ignore_errors=True)
    overrides = (f"training.deepspeed={REPO / 'infra/deepspeed/zero2.json'}", "training.batch_size=8",
                 "training.save_steps=2")
    step_log = folder / "steps.log"
    step_log.unlink(missing_ok=True)

    killed = _launch(folder, student, *overrides, env={"KD_TEST_DIE_AT_STEP": "2"})
    assert killed.returncode != 0
    assert not paths.distilled(student).exists(), "a killed stage must not leave a final model"
    assert [p.name for p in ckpts.iterdir()] == ["checkpoint-2"]
    assert (ckpts / "checkpoint-2/latest").read_text().strip() == "global_step2"
    assert not (ckpts / "checkpoint-2/optimizer.pt").exists()  # DeepSpeed's layout, not the Trainer's

    resumed = _launch(folder, student, *overrides, env={"KD_TEST_STEP_LOG": str(step_log)})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert step_log.read_text().split() == ["2", "3"]  # continued from the checkpoint, did not start over
    assert not ckpts.exists()  # the final model supersedes the resume checkpoints

    batches = _val_batches(paths, cfg)
    reference = _logits(load_checkpoint(folder / "reference" / student), batches)
    assert (_logits(load_checkpoint(paths.distilled(student)), batches) - reference).abs().max() < TOLERANCE
    name = "okd_online_module/adapter_model.safetensors"
    ref, got = load_file(folder / "reference" / student / name), load_file(paths.distilled(student) / name)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < TOLERANCE


def test_teacher_sharding_needs_a_stage3_config(tmp_path):
    params = _params()
    params["students"]["fkl"]["training"] |= {"teacher_sharding": "zero3",
                                              "deepspeed": str(REPO / "infra/deepspeed/zero2.json")}
    with pytest.raises(ConfigError, match=r"students\.fkl\.training\.teacher_sharding: 'zero3' needs .*stage-3"):
        load_config(write_params(tmp_path, params))
    params["students"]["fkl"]["training"]["deepspeed"] = str(REPO / "infra/deepspeed/zero3.json")
    assert load_config(write_params(tmp_path, params)).student("fkl").training.teacher_sharding == "zero3"
