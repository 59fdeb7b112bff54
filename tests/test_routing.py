"""Per-sample teacher routing (`students.<name>.route`, kd_core/teachers/routing.py): the routed loss and gradient equal
each row's loss against its own teacher computed by hand (logits and fused paths), one-line config and data
errors, and a routed student through the stages, live and on caches over each teacher's own rows."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kd_core.config import load_config, parse_config
from kd_core.data.tokenize import CausalCollator, EncodedExample
from kd_core.errors import ConfigError, DataError
from kd_core.teachers.cache_key import example_key
from kd_core.methods import StepContext, get_method
from kd_core.teachers.routed import RoutedTeachers
from kd_core.teachers.source import CachedTeacher, LiveTeacher
from tests.conftest import TINY_MODEL, TINY_TRAINING, tiny_params, write_params
from tests.method_harness import student_config

IG, PAD = -100, 1
STEPS = dict(TINY_TRAINING, max_steps=3)


def _gpt2(seed: int, vocab: int = 30) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()


def _teacher(seed: int) -> GPT2LMHeadModel:
    """A tiny GPT-2 with peaked next-token distributions (its tied embeddings scaled up): teachers that differ."""
    model = _gpt2(seed)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(30)
    return model.eval()


def _batch():
    """Five rows of different lengths (prompt tokens IG in the labels); rows 0, 2, 3 go to `a`, 1 and 4 to `b`."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for prompt, response in ((3, 4), (2, 6), (4, 1), (5, 3), (2, 2)):
        ids = torch.randint(2, 30, (prompt + response,), generator=g).tolist()
        examples.append(EncodedExample(ids, [IG] * prompt + ids[prompt:]))
    batch = CausalCollator(PAD)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    owners = ["a", "b", "a", "a", "b"]
    return batch, {example_key(e.input_ids, e.labels): o for e, o in zip(examples, owners)}, owners


def _by_hand(student, teachers: dict, batch, owners, tau: float) -> torch.Tensor:
    """Σ_rows Σ_response positions KL(p_teacher(row) || q) at τ / N, each row alone through its own teacher."""
    total, n = 0.0, int(batch["labels"][:, 1:].ne(IG).sum())
    for i, owner in enumerate(owners):
        length = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i:i + 1, :length], batch["labels"][i, :length]
        q = torch.log_softmax(student(input_ids=ids).logits[0] / tau, -1)
        with torch.no_grad():
            p = torch.log_softmax(teachers[owner](input_ids=ids).logits[0] / tau, -1)
        for t in range(length - 1):
            if labels[t + 1] != IG:
                total = total + (p[t].exp() * (p[t] - q[t])).sum()
    return total / n


@pytest.mark.parametrize("fused", [False, True])
def test_routed_loss_and_gradient_equal_each_rows_loss_against_its_own_teacher_by_hand(fused):
    student, teachers = _gpt2(0), {"a": _teacher(1), "b": _teacher(2)}
    batch, routed, owners = _batch()
    cfg = student_config("kd", divergence="fkl", temperature=1.5, fused_lm_head=fused)
    routed_teachers = RoutedTeachers({"a": LiveTeacher(teachers["a"]), "b": LiveTeacher(teachers["b"])}, routed)
    n = batch["labels"][:, 1:].ne(IG).sum()
    ctx = StepContext(student=student, batch=batch, num_items=n, teacher_source=routed_teachers)
    loss = get_method("kd")(cfg, {}).compute_loss(ctx).loss
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    expected = _by_hand(student, teachers, batch, owners, 1.5)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(got, (p.grad for p in student.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # not the loss against either teacher alone
    for alone in teachers.values():
        one = get_method("kd")(cfg, {}).compute_loss(StepContext(student=student, batch=batch, num_items=n,
                                                                 teacher=alone)).loss
        assert abs(float(one.detach()) - float(loss.detach())) > 1e-2


def test_a_row_outside_the_routed_rows_is_an_error():
    batch, routed, _ = _batch()
    routed.pop(next(iter(routed)))
    with pytest.raises(DataError, match=r"batch row 0\) is not among the routed rows"):
        RoutedTeachers({"a": LiveTeacher(_gpt2(1)), "b": LiveTeacher(_gpt2(2))}, routed).signal(batch)


def _params(**route) -> dict:
    params = tiny_params()
    params["students"] = {
        "ta": {"method": "kd", "teacher": "teacher", "train_data": "train", "model": TINY_MODEL, "training": STEPS},
        "routed": {"method": "kd", "teacher": "ta", "train_data": "train", "model": TINY_MODEL, "training": STEPS,
                   "route": {"domains": {"arithmetic": "teacher"}, "default": "ta"} | route}}
    return params


@pytest.mark.parametrize("change, message", [
    ({"domains": {"arithmetic": "nope"}}, "students.routed.route.domains.arithmetic: unknown model 'nope' (allowed: "
                                          "teacher, ta)"),
    ({"default": "routed"}, "students.routed.route.default: unknown model 'routed' (allowed: teacher, ta)"),
    ({"field": "source"}, "students.routed.route.field: Input should be 'category'"),
    ({"domains": {}}, "students.routed.route.domains: Dictionary should have at least 1 item"),
    ({"teachers_too": True}, "students.routed.teachers: set by route (its domains' teachers and its default); "
                             "leave teachers out"),
    ({"method": "gkd"}, "students.routed.route: method 'gkd' scores batches it builds itself; routing by a data "
                        "field is for: atkd, kd"),
])
def test_bad_routes_are_one_line_errors_naming_the_key(tmp_path, change, message):
    params = _params()
    if change.pop("teachers_too", False):
        params["students"]["routed"]["teachers"] = {"teacher": 1.0}
    elif "method" in change:
        params["students"]["routed"]["method"] = change["method"]
    else:
        params["students"]["routed"]["route"] |= change
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, params))
    assert message in str(err.value) and "\n" not in str(err.value).strip(), str(err.value)
    cfg = parse_config(_params())
    assert cfg.students["routed"].teachers == {"teacher": 1.0, "ta": 1.0}


@pytest.mark.slow
def test_a_routed_student_through_the_stages_live_and_on_caches_over_each_teachers_rows(project):
    """teacher -> ta; `routed` learns arithmetic rows from the teacher and the rest from ta. Its caches hold each
    teacher's own rows; with k = V (float32) a routed batch's loss on the caches equals the live one."""
    from kd_core.teachers.cache import TeacherLogitCache
    from kd_core.teachers.routing import route_rows
    from kd_core.run import RunPaths, load_model, load_run_tokenizer, load_train_set
    from kd_core.stages.cache_teacher import cache_teacher
    from kd_core.stages.distill import distill
    from kd_core.stages.finetune import finetune
    from kd_core.stages.prepare import prepare
    from kd_core.stages.train_teacher import train_teacher

    params = _params()
    params["students"]["cached"] = dict(params["students"]["routed"], teacher_cache={
        "enabled": True, "top_k": 4096, "logprobs": "float32"})
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    prepare(cfg, paths)
    train_teacher(cfg, paths)
    distill(cfg, paths, "ta")
    finetune(cfg, paths, "ta")  # (none configured: models/ta is the distilled model)
    for name in ("routed", "cached"):
        info = distill(cfg, paths, name)
        finetune(cfg, paths, name)
        assert info["route"] == {"field": "category", "domains": {"arithmetic": "teacher"}, "default": "ta"}
        assert info["steps"] == 3 and info["final_loss"] > 0
    rows = [json.loads(line) for line in paths.split("train").read_text().splitlines()]
    tokenizer = load_run_tokenizer(paths)
    ds, _ = load_train_set(cfg, paths, tokenizer, "train")
    routed = route_rows(paths, cfg.students["cached"], ds)
    assert set(routed.values()) == {"teacher", "ta"}
    arithmetic = sum(1 for r in rows if r["category"] == "arithmetic")
    caches = {t: TeacherLogitCache(paths.teacher_cache("cached") / t, _subset(ds, routed, t)) for t in ("teacher", "ta")}
    assert len(caches["teacher"].offsets) - 1 == arithmetic > 0
    assert len(caches["ta"].offsets) - 1 == len(ds) - arithmetic > 0
    batch = CausalCollator(tokenizer.pad_token_id)([ds[i] for i in range(12)])
    student = load_model(paths, "cached")
    n = batch["labels"][:, 1:].ne(IG).sum()
    live = [load_model(paths, t).eval() for t in ("teacher", "ta")]
    losses = [get_method("kd")(cfg.students["cached"], {}).compute_loss(StepContext(
        student=student, batch=batch, num_items=n, teacher_source=RoutedTeachers(members, routed))).loss
        for members in ({t: CachedTeacher(caches[t]) for t in ("teacher", "ta")},
                        {t: LiveTeacher(model) for t, model in zip(("teacher", "ta"), live)})]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    # a domain without rows, and rows without a teacher, are one-line data errors
    bad = _params(domains={"arithmetic": "teacher", "astrology": "teacher"})
    with pytest.raises(DataError, match=r"students.routed.route.domains.astrology: no row of 'train' has category "
                                        r"'astrology' \(its category values: 'arithmetic', "):
        route_rows(paths, parse_config(bad).students["routed"], ds)
    bad = _params(default=None)
    bad["students"]["routed"]["teacher"] = "teacher"  # (its only teacher now)
    with pytest.raises(DataError, match=r"students.routed.route: rows of category '\w+' \(e.g. row '[^']+'\) have no "
                                        r"teacher: add '\w+' to students.routed.route.domains or set"):
        route_rows(paths, parse_config(bad).students["routed"], ds)


def _subset(ds, routed, teacher):
    """The examples of `ds` routed to `teacher`, in order."""
    from kd_core.data.tokenize import EncodedDataset

    return EncodedDataset([ex for ex in ds.examples if routed.get(example_key(ex.input_ids, ex.labels)) == teacher])


def test_dvc_sees_the_same_graph_as_the_flow_for_a_routed_student(project):
    """dvc.yaml and the flow agree on a routed config (cached): the student's stages depend on its nearest routed
    teacher, and the flow orders it after every routed teacher."""
    from tests.conftest import dvc_project, dvc_stages_matching_the_flow

    params = _params()
    params["students"]["routed"]["teacher_cache"] = {"enabled": True, "top_k": 8}
    dvc_project(project, params)
    stages = dvc_stages_matching_the_flow(project)
    cfg = load_config(project / "params.yaml")
    assert "runs/tiny/models/ta" in {str(d) for d in stages["cache_teacher@routed"].deps}
    assert cfg.chain_order() == ["ta", "routed"] and set(cfg.dependencies("routed")) == {"ta", "teacher"}


@pytest.mark.parametrize("method", ["kd", "atkd"])
def test_two_routes_to_the_same_teacher_give_that_teachers_loss(method):
    """The plumbing of every signal call (positions, targets and ATKD's per-position weights split by row and put
    back): rows split between two copies of one teacher give exactly the single-teacher loss and gradient."""
    student, teacher = _gpt2(0), _teacher(1)
    batch, routed, _ = _batch()
    cfg = student_config(method, temperature=1.3, fused_lm_head=False)
    n = batch["labels"][:, 1:].ne(IG).sum()
    results = []
    for kwargs in ({"teacher_source": RoutedTeachers({"a": LiveTeacher(teacher), "b": LiveTeacher(teacher)}, routed)}, {"teacher": teacher}):
        student.zero_grad()
        loss = get_method(method)(cfg, cfg.method_args).compute_loss(
            StepContext(student=student, batch=batch, num_items=n, **kwargs)).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_a_routed_cache_is_stale_for_the_same_student_without_its_route():
    """A cache over one teacher's rows never serves (nor is linked to) a student that needs all rows."""
    from kd_core.teachers.cache_key import stale_fields

    key = {"teacher": "teacher", "top_k": 8, "logprobs": "float16"}
    routed = {"key": key | {"route": {"field": "category", "domains": {"arithmetic": "teacher"}, "default": "ta"}}}
    assert stale_fields(routed, key) == ["route"] and stale_fields({"key": key}, key) == []


@pytest.mark.slow
def test_a_routed_student_runs_through_the_flow(project, empty_stores):
    """`kd run`'s flow on the tiny config with a routed student (arithmetic rows from the teacher, the rest from ta),
    one live and one on caches: every stage runs, both are registered with their route, each cache holds its
    teacher's rows."""
    from flows.pipeline import kd_pipeline
    from kd_core.run import RunPaths, load_run_tokenizer, load_train_set
    from kd_core.teachers.routing import route_rows
    from tests.conftest import registered_versions

    params = _params()
    params["students"]["cached"] = dict(params["students"]["routed"], teacher_cache={"enabled": True, "top_k": 8})
    path = write_params(project, params)
    with empty_stores.prefect_harness():
        result = kd_pipeline(params_path=str(path))
    cfg = parse_config(params)
    paths = RunPaths.of(cfg)
    assert set(result["registered"]["versions"]) == {"teacher", "ta", "routed", "cached"}
    assert {v.tags["kd.model"] for v in registered_versions("kd-student")} == {"ta", "routed", "cached"}
    tokenizer = load_run_tokenizer(paths)
    ds = load_train_set(cfg, paths, tokenizer)[0]
    owner = route_rows(paths, cfg.students["cached"], ds)  # example key -> its teacher
    routed = [owner[example_key(e.input_ids, e.labels)] for e in ds.examples]
    for name in ("routed", "cached"):
        info = json.loads(paths.train_info(name).read_text())
        assert info["route"] == {"field": "category", "domains": {"arithmetic": "teacher"}, "default": "ta"}
        assert info["steps"] == 3 and 0 <= json.loads(paths.metrics(name).read_text())["test/top1_agreement"] <= 1
    manifests = {t: json.loads((paths.teacher_cache("cached") / t / "manifest.json").read_text())
                 for t in ("teacher", "ta")}
    assert manifests["teacher"]["stats"]["examples"] == routed.count("teacher") > 0  # the arithmetic rows
    assert manifests["ta"]["stats"]["examples"] == routed.count("ta") > 0
