"""Several teachers in params (`students.<name>.teachers`): validation, the model graph (flow and DVC), and a
teacher + a teacher assistant teaching one student through the pipeline's stage functions, live and cached."""

from __future__ import annotations

import math

import pytest
import torch

from kd_core.config import load_config, parse_config
from kd_core.errors import ConfigError
from kd_core.pipeline.dag import expand, producers
from kd_core.run import RunPaths
from tests.conftest import TINY_MODEL, TINY_TRAINING, tiny_params, write_params

STEPS = dict(TINY_TRAINING, max_steps=3)


def params_with(**students) -> dict:
    """Tiny params: `ta` (kd from the teacher) and the given students."""
    params = tiny_params()
    params["students"] = {"ta": {"method": "kd", "teacher": "teacher", "train_data": "train", "model": TINY_MODEL,
                                 "training": STEPS}}
    for name, extra in students.items():
        params["students"][name] = {"method": "kd", "teacher": "ta", "train_data": "train", "model": TINY_MODEL,
                                    "training": STEPS, "teachers": {"teacher": 0.7, "ta": 0.3}} | extra
    return params


def error_of(project, params) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(write_params(project, params))
    return str(err.value)


def test_teachers_config_and_graph():
    cfg = parse_config(params_with(x={"teacher_combine": "mixture", "teachers": {"teacher": 3, "ta": 1}}))
    x = cfg.students["x"]
    assert x.teacher_weights() == {"teacher": 0.75, "ta": 0.25} and x.teacher_combine == "mixture"
    assert cfg.students["ta"].teacher_weights() == {"teacher": 1.0}
    assert set(cfg.dependencies("x")) == {"teacher", "ta"} and cfg.chain_order() == ["ta", "x"]
    nodes = {n.name: n for n in expand(cfg)}
    feeding = {p.name for p in producers(nodes["distill@x"], list(nodes.values()))}
    assert "finetune@ta" in feeding  # x waits for its teacher assistant (and through it for the teacher)


@pytest.mark.parametrize("students,message", [
    ({"x": {"teachers": {"teacher": 0.7, "ta": 0}}}, "students.x.teachers.ta: Input should be greater than 0"),
    ({"x": {"teachers": {"teacher": 0.7, "ta": "0.3"}}}, "students.x.teachers.ta: Input should be a valid number"),
    ({"x": {"teachers": {"teacher": 0.7, "nobody": 0.3}}},
     "students.x.teachers.nobody: unknown model (allowed: teacher, ta)"),
    ({"x": {"teacher": "teacher"}},
     "students.x.teacher: must be 'ta', the nearest of students.x.teachers"),
    ({"x": {"method": "okd"}}, "students.x.teachers: method 'okd' reads one teacher model (or none); several "
                               "teachers are for: atkd, distillm, gkd, imitkd, kd"),
    ({"x": {"teacher_combine": "mean"}}, "students.x.teacher_combine: Input should be 'sum' or 'mixture'"),
    ({"ta2": {"teacher": "teacher", "teachers": None}, "x": {"teachers": {"ta": 0.5, "ta2": 0.5}}},
     "students.x.teachers: 'ta', 'ta2' are not in one chain"),
])
def test_invalid_teachers_are_one_line_errors_naming_file_and_key(project, students, message):
    msg = error_of(project, params_with(**students))
    assert msg.startswith(f"{project / 'params.yaml'}: {message}"), msg
    assert "\n" not in msg.strip(), msg


def test_dvc_sees_the_same_graph_as_the_flow(project):
    """dvc.yaml (generic: one teacher path per student) and the flow agree on a multi-teacher config; the
    student's stages depend on the teacher assistant's model."""
    from tests.conftest import dvc_project, dvc_stages_matching_the_flow

    params = params_with(x={"teacher_cache": {"enabled": True, "top_k": 8}})
    dvc_project(project, params)
    stages = dvc_stages_matching_the_flow(project)
    assert "runs/tiny/models/ta" in {str(d) for d in stages["distill@x"].deps}
    assert "runs/tiny/models/ta" in {str(d) for d in stages["cache_teacher@x"].deps}


@pytest.mark.slow
def test_a_teacher_and_a_teacher_assistant_teach_one_student(project):
    from kd_core.teachers.cache import TeacherLogitCache
    from kd_core.methods import get_method
    from kd_core.methods.base import StepContext
    from kd_core.teachers.ensemble import TeacherEnsemble
    from kd_core.teachers.source import CachedTeacher, LiveTeacher
    from kd_core.run import load_model, load_run_tokenizer, load_train_set
    from kd_core.stages.cache_teacher import cache_teacher
    from kd_core.stages.distill import distill
    from kd_core.stages.finetune import finetune
    from kd_core.stages.prepare import prepare
    from kd_core.stages.train_teacher import train_teacher
    from kd_core.data.tokenize import CausalCollator

    everything = {"top_k": 4096, "logprobs": "float32"}  # >= the vocabulary, full precision: the cache is exact
    params = params_with(
        live={},
        cached={"teacher_combine": "mixture", "teacher_cache": everything},
        gkd={"method": "gkd", "teacher_combine": "mixture",
             "method_args": {"seq_kd": True, "lmbda": 0.0, "max_new_tokens": 4}})
    params["students"]["cached"]["teacher_cache"] = dict(everything, enabled=True)
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    prepare(cfg, paths)
    train_teacher(cfg, paths)
    distill(cfg, paths, "ta")
    finetune(cfg, paths, "ta")
    infos = {}
    for name in ("live", "cached", "gkd"):
        if name == "cached":
            built = cache_teacher(cfg, paths, name)
            assert set(built["teachers"]) == {"teacher", "ta"}
            assert all(part["source"] == "built" for part in built["teachers"].values())
            assert all(p["source"] == "current" for p in cache_teacher(cfg, paths, name)["teachers"].values())
        infos[name] = distill(cfg, paths, name)
        assert infos[name]["steps"] == 3 and math.isfinite(infos[name]["final_loss"]), name
        assert infos[name]["teachers"] == {"teacher": 0.7, "ta": 0.3}, name
    batches = 3 * STEPS["batch_size"]
    assert infos["live"]["teacher_forward_passes"] == 2 * batches  # both teachers run on every batch
    assert infos["cached"]["teacher_forward_passes"] == 0
    assert infos["gkd"]["generated_tokens"] > 0

    # the student `cached` trained on the two caches; with top_k >= V they give the live teachers' loss
    tokenizer = load_run_tokenizer(paths)
    ds, _ = load_train_set(cfg, paths, tokenizer, "train")
    batch = CausalCollator(tokenizer.pad_token_id)([ds[i] for i in range(8)])
    student_cfg = cfg.students["cached"]
    finetune(cfg, paths, "cached")  # (none configured: the distilled model as is)
    student = load_model(paths, "cached")
    caches = [TeacherLogitCache(paths.teacher_cache("cached") / t, ds) for t in ("teacher", "ta")]
    live = [load_model(paths, t).eval() for t in ("teacher", "ta")]
    losses = []
    for members in ([CachedTeacher(c) for c in caches], [LiveTeacher(m) for m in live]):
        method = get_method("kd")(student_cfg, {})
        ctx = StepContext(student=student, batch=batch, num_items=batch["labels"][:, 1:].ne(-100).sum(),
                          teacher_source=TeacherEnsemble(dict(zip(("teacher", "ta"), members)), [0.7, 0.3], "mixture"))
        losses.append(method.compute_loss(ctx).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    one = get_method("kd")(student_cfg, {}).compute_loss(  # not the loss against one of the teachers alone
        StepContext(student=student, batch=batch, num_items=ctx.num_items, teacher=live[0])).loss
    assert not torch.allclose(one, losses[1])
