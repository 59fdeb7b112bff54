"""`dvc repro` of a tiny project with the peers' parts together (issue 30): a teacher served by another process
(tests/vllm_stub.py serving the prepared project's tiny teacher) that generates the transfer set, a LoRA student
(`finetune: lora`) trained on it (SeqKD), and a student routed by `category` between the served teacher and the
LoRA student, on a cache per teacher over its own rows. Every stage runs as its own `kd stage` process; afterwards
DVC finds everything up to date and a second `dvc repro` runs nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, dvc_project, dvc_stages_matching_the_flow, dvc_status, tiny_params
from tests.vllm_stub import serving

K = 8
TRAINING = {"max_steps": 3, "learning_rate": 0.003, "batch_size": 8, "logging_steps": 1, "warmup_ratio": 0.0}


def _params(url: str, tokenizer: Path) -> dict:
    """Served teacher (its top-k: K) -> a sampled transfer set `seq`; `ta`: a LoRA student, SeqKD on `seq`;
    `routed`: arithmetic rows from the served teacher, the others from `ta`, both cached."""
    params = tiny_params()
    params["teacher"] |= {"train": False, "model": {"tokenizer": str(tokenizer), "endpoint": {
        "url": url, "model": "tiny-teacher", "top_k": K, "batch_size": 8}}}
    # sampled (T = 1): the barely trained teacher answers in tokens, where greedy it may end at once
    params["transfer_sets"] = {"seq": {"source": "teacher", "max_new_tokens": 8, "seed": 1}}
    params["students"] = {
        "ta": {"method": "seqkd", "teacher": "teacher", "train_data": "seq", "model": TINY_MODEL,
               "training": TRAINING, "finetune": "lora"},
        "routed": {"method": "kd", "teacher": "ta", "train_data": "train", "model": TINY_MODEL, "training": TRAINING,
                   "route": {"domains": {"arithmetic": "teacher"}, "default": "ta"},
                   "teacher_cache": {"enabled": True, "top_k": K}}}
    params["evaluation"] |= {"limit": 4, "sample_seeds": [0]}
    return params


@pytest.mark.slow
def test_served_teacher_lora_and_routed_students_through_dvc_repro(project, prepared_project, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from kd_core.config import load_config
    from kd_core.models.adapters import ADAPTER_DIR
    from kd_core.run import RunPaths, load_run_tokenizer, load_train_set

    served = tmp_path_factory.mktemp("served-teacher")  # the weights another process serves: not in the project
    for part in ("models/teacher", "tokenizer"):
        shutil.copytree(prepared_project / "runs/tiny" / part, served / Path(part).name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def sh(*cmd: str) -> str:
        out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    with serving(served / "teacher", "tiny-teacher") as url:
        dvc_project(project, _params(url, served / "tokenizer"))
        sh("dvc", "config", "core.analytics", "false")
        stages = dvc_stages_matching_the_flow(project)  # (the same graph as `kd run`'s flow)
        first = sh("dvc", "repro")
        assert dvc_status(project) == {}
        second = sh("dvc", "repro")
    assert {s for s in stages if f"Running stage '{s}'" in first} == set(stages)
    assert {"transfer@seq", "cache_teacher@routed", "finetune@ta", "evaluate_teacher", "compare"} <= set(stages)
    assert "Running stage" not in second

    run = project / "runs/tiny"
    assert json.loads((run / "models/teacher/endpoint.json").read_text())["url"] == url  # no weights here
    seq = [json.loads(line) for line in (run / "data/seq.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (run / "data/train.jsonl").read_text().splitlines()]
    assert 0 < len(seq) <= len(train) and all(r["generated_by"] == "teacher" and r["response"] for r in seq)

    # the LoRA student: its folder is the merged model (a plain causal LM, no adapter weights) and its adapter
    ta = run / "models/ta"
    adapter = json.loads((ta / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] >= 1
    names = {n for n, _ in AutoModelForCausalLM.from_pretrained(ta).named_parameters()}
    assert names and not any("lora_" in n for n in names)
    info = json.loads((run / "train_info/ta.json").read_text())
    assert 0 < info["trainable_parameters"] < info["parameters"]

    # the routed student: a cache per teacher over its own rows (arithmetic: the served teacher's, the rest: ta's)
    # among its training examples (the train rows that fit the context)
    cfg = load_config(project / "params.yaml")
    paths = RunPaths.of(cfg)
    examples, _ = load_train_set(cfg, paths, load_run_tokenizer(paths), "train")
    arithmetic = sum(train[i]["category"] == "arithmetic" for i in examples.rows)
    caches = run / "teacher_cache/routed"
    assert json.loads((caches / "manifest.json").read_text()) == {"enabled": True, "teachers": ["ta", "teacher"]}
    manifests = {t: json.loads((caches / t / "manifest.json").read_text()) for t in ("teacher", "ta")}
    assert manifests["teacher"]["stats"]["examples"] == arithmetic > 0
    assert manifests["ta"]["stats"]["examples"] == len(examples) - arithmetic > 0
    assert manifests["teacher"]["key"]["top_k"] == manifests["ta"]["key"]["top_k"] == K
    routed = json.loads((run / "train_info/routed.distill.json").read_text())
    assert routed["route"] == {"field": "category", "domains": {"arithmetic": "teacher"}, "default": "ta"}
    assert routed["teacher_forward_passes"] == 0 and routed["steps"] == 3  # (from the caches only)

    # the served teacher: evaluated through the endpoint, not registered, its row in the comparison
    teacher = json.loads((run / "metrics/teacher.json").read_text())
    assert teacher["served"] is True and "test/rougeL_greedy" in teacher
    registry = json.loads((run / "registry.json").read_text())
    assert set(registry["versions"]) == {"ta", "routed"} and "teacher" in registry["not_registered"]
    report = json.loads((run / "reports/compare.json").read_text())
    served_row = report["rows"][0]
    assert served_row["label"] == "teacher (served)" and served_row["served"] == url
    assert served_row["metrics"]["test/rougeL_greedy"] == teacher["test/rougeL_greedy"]
    assert "| teacher (served) | teacher | served |" in (run / "reports/compare.md").read_text()
