"""Every registered method runs through the pipeline's stage functions on the tiny setup: distill,
finetune, evaluate, with the metrics and training info a user would look at."""

from __future__ import annotations

import json
import math

import pytest

from kd_core.config import load_config
from kd_core.methods import METHODS
from kd_core.run import RunPaths
from kd_core.stages.distill import distill
from kd_core.stages.evaluate import evaluate
from kd_core.stages.finetune import finetune
from kd_core.stages.transfer import transfer
from tests.conftest import TINY_MODEL, TINY_TRAINING, copy_prepared, tiny_params

ARGS = {  # keep generation short on the tiny setup
    "imitkd": {"max_new_tokens": 6}, "gkd": {"max_new_tokens": 6, "lmbda": 1.0}, "minillm": {"max_new_tokens": 6},
    "distillm": {"max_new_tokens": 6, "init_threshold": 0.5},
    "sampled_rkl": {"max_new_tokens": 6}, "entropy_aware_opd": {"max_new_tokens": 6},
    "speculative_kd": {"max_new_tokens": 6, "top_k": 5},
}


@pytest.mark.slow
def test_every_registered_method_runs_through_the_stages(project, prepared_project):
    params = tiny_params()
    params["evaluation"].update(sample_seeds=[0], exaccerr_prompts=4, exaccerr_lengths=[2])
    params["transfer_sets"] = {"gen": {"source": "teacher", "max_new_tokens": 6}}
    params["students"] = {
        name: {"method": name, "teacher": "teacher", "train_data": "gen" if METHODS[name].needs_transfer_set else "train",
               "model": TINY_MODEL, "training": dict(TINY_TRAINING, max_steps=3), "method_args": ARGS.get(name, {})}
        for name in sorted(METHODS)
    }
    copy_prepared(prepared_project, project, params)  # data, tokenizer, teacher: made once a run (conftest)
    cfg = load_config(project / "params.yaml")
    paths = RunPaths.of(cfg)
    transfer(cfg, paths, "gen")
    for name in cfg.chain_order():
        info = distill(cfg, paths, name)
        assert info["steps"] == 3 and math.isfinite(info["final_loss"]), name
        assert info["teacher_forward_passes"] > 0 or not METHODS[name].needs_teacher, name
        finetune(cfg, paths, name)
        metrics = evaluate(cfg, paths, name)
        assert math.isfinite(metrics["val/loss"]) and 0 <= metrics["test/top1_agreement"] <= 1, name
        assert json.loads(paths.metrics(name).read_text())["val/loss"] == metrics["val/loss"]
    okd_module = paths.model("okd") / "okd_online_module"
    assert okd_module.is_dir(), "OKD saves its trained online module next to the student"
    assert json.loads(paths.train_info("gkd").read_text())["generated_tokens"] > 0
