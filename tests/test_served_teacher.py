"""A teacher served by another process (`teacher.model.endpoint`, kd_core/teachers/served.py): a vLLM-like server on
loopback (tests/vllm_stub.py) serves the tiny teacher; the teacher cache built from it and the live KD loss of a batch
equal the in-process teacher's; the config rules; each failure one line naming the URL (never the key), of the
right class (a server down is retryable, a malformed answer is not)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from kd_core.config import ConfigError, parse_config
from kd_core.config.load import load_config
from kd_core.data.tokenize import batches
from kd_core.errors import EndpointError, EndpointUnreachable, is_retryable
from kd_core.teachers.cache import TeacherLogitCache
from kd_core.teachers.cache_key import TENSORS
from kd_core.methods.base import prediction_positions
from kd_core.models.build import build_from_config
from kd_core.run import RunPaths, load_run_tokenizer, load_train_set
from kd_core.teachers.served import ServedTeacher
from kd_core.stages.cache_teacher import cache_teacher
from kd_core.stages.distill import distill
from kd_core.stages.prepare import prepare
from kd_core.stages.train_teacher import train_teacher
from kd_core.data.tokenize import batches
from kd_core.teachers.signal import TopKTeacherSignal
from tests.conftest import TINY_MODEL, free_port, tiny_params, write_params
from tests.vllm_stub import serving

K = 8
SECRET = "sk-not-a-real-key-1234"
STUDENT = {"method": "kd", "teacher": "teacher", "train_data": "train", "divergence": "fkl", "model": TINY_MODEL,
           "training": {"max_steps": 2, "learning_rate": 0.003, "batch_size": 8, "logging_steps": 1,
                        "warmup_ratio": 0.0}}


def _params(tmp, name: str, teacher_model: dict) -> dict:
    params = tiny_params(run_dir=str(tmp / "runs" / name))
    params["teacher"] = {**params["teacher"], "model": teacher_model, "train": False}
    params["students"] = {"cached": copy.deepcopy(STUDENT) | {"teacher_cache": {"enabled": True, "top_k": K,
                                                                                "logprobs": "float32"}},
                          "live": copy.deepcopy(STUDENT)}  # (float32: compared with the live teacher at 1e-5)
    return params


def _endpoint(url: str, **extra) -> dict:
    return {"url": url, "model": "tiny-teacher", "top_k": K, "batch_size": 5, "auth_env": "STUB_KEY",
            "backoff_s": 0} | extra  # (retries without waiting)


@pytest.fixture(scope="module")
def served(tmp_path_factory, empty_stores):
    """(tmp, the in-process run's cfg and paths, the served run's cfg and paths): the tiny teacher of the first run
    served by tests/vllm_stub.py, the second run's teacher that endpoint with the first run's tokenizer."""
    import mlflow

    tmp = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{empty_stores.seed_mlflow(tmp / 'mlflow.db')}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("STUB_KEY", SECRET)
        mlflow.set_tracking_uri(uri)
        local = parse_config(_params(tmp, "local", tiny_params()["teacher"]["model"]))
        local_paths = RunPaths.of(local)
        prepare(local, local_paths)
        train_teacher(local, local_paths)
        with serving(local_paths.model("teacher"), "tiny-teacher", "STUB_KEY") as url:
            remote = parse_config(_params(tmp, "served", {"endpoint": _endpoint(url),
                                                          "tokenizer": str(local_paths.tokenizer)}))
            remote_paths = RunPaths.of(remote)
            prepare(remote, remote_paths)
            train_teacher(remote, remote_paths)
            yield tmp, url, (local, local_paths), (remote, remote_paths)
    mlflow.set_tracking_uri(None)


def test_cache_from_the_endpoint_equals_the_in_process_teachers(served):
    _, _, (local, local_paths), (remote, remote_paths) = served
    assert cache_teacher(remote, remote_paths, "cached")["source"] == "built"
    cache_teacher(local, local_paths, "cached")
    ours = load_file(str(remote_paths.teacher_cache("cached") / TENSORS))
    theirs = load_file(str(local_paths.teacher_cache("cached") / TENSORS))
    assert ours["top_logprobs"].shape == theirs["top_logprobs"].shape == (int(theirs["offsets"][-1]), K)
    assert torch.equal(ours["offsets"], theirs["offsets"]) and torch.equal(ours["top_ids"], theirs["top_ids"])
    torch.testing.assert_close(ours["top_logprobs"], theirs["top_logprobs"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours["tail_logmass"], theirs["tail_logmass"], atol=2e-5, rtol=1e-5)
    assert cache_teacher(remote, remote_paths, "cached")["source"] == "current"


@pytest.mark.parametrize("api", ["prompt_logprobs", "echo"])
def test_live_kd_loss_of_a_batch_equals_the_in_process_teachers(served, api):
    _, url, (local, local_paths), (remote, remote_paths) = served
    cache_teacher(local, local_paths, "cached")
    tokenizer = load_run_tokenizer(remote_paths)
    ds, _ = load_train_set(remote, remote_paths, tokenizer)
    cache = TeacherLogitCache(local_paths.teacher_cache("cached"), ds)
    student = build_from_config(remote.students["live"].model.config, tokenizer, 64, seed=1)
    endpoint = remote.teacher.model.endpoint.model_copy(update={"api": api})
    teacher = ServedTeacher(endpoint, cache.vocab_size)
    batch = next(iter(batches(ds, tokenizer.pad_token_id, 6)))
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    positions = prediction_positions(batch["labels"][:, 1:].ne(-100))
    live, cached = teacher.signal(batch), TopKTeacherSignal.from_cache(cache, batch, "cpu")
    assert torch.equal(live.top_ids, cached.top_ids)
    for name in ("fkl", "rkl"):
        torch.testing.assert_close(live.divergence(logits, positions, name), cached.divergence(logits, positions, name),
                                   atol=1e-5, rtol=1e-5)


def test_a_live_student_trains_on_the_served_teacher(served):
    _, _, _, (remote, remote_paths) = served
    info = distill(remote, remote_paths, "live")
    assert info["steps"] == 2 and (remote_paths.distilled("live") / "config.json").is_file()


def _served_params(tmp, url: str = "http://127.0.0.1:9") -> dict:
    return _params(tmp, "x", {"endpoint": _endpoint(url), "tokenizer": "tok"})


@pytest.mark.parametrize("change, key", [
    (lambda p: p["teacher"].update(train=True), "teacher.train"),
    (lambda p: p["students"]["live"].update(temperature=2.0), "students.live.temperature"),
    (lambda p: p["students"]["live"].update(method="okd"), "students.live.method"),
    (lambda p: p["teacher"]["model"].pop("tokenizer"), "teacher.model"),
    (lambda p: p["teacher"]["model"]["endpoint"].update(top_k="8"), "teacher.model.endpoint.top_k"),
    (lambda p: p["students"]["live"]["model"].update(endpoint=_endpoint("http://h")), "students.live.model"),
    (lambda p: p.update(transfer_sets={"gen": {"source": "teacher", "strategy": "confidence", "keep_fraction": 0.5}}),
     "transfer_sets.gen.strategy"),
    (lambda p: p["tracking"]["champion"].update(metric="test/unc_bucket0_kl"), "tracking.champion.metric"),
])
def test_config_rules_name_the_file_and_key(tmp_path, change, key):
    params = _served_params(tmp_path)
    parse_config(copy.deepcopy(params))  # the served teacher as given is valid
    change(params)
    path = write_params(tmp_path, params)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and key in str(err.value)


def _teacher(url: str, **extra) -> ServedTeacher:
    cfg = parse_config(_served_params_dummy(url, **extra))
    return ServedTeacher(cfg.teacher.model.endpoint, 300)


def _served_params_dummy(url: str, **extra) -> dict:
    params = tiny_params()
    params["teacher"] = {**params["teacher"], "train": False,
                         "model": {"endpoint": _endpoint(url, **extra), "tokenizer": "tok"}}
    params["students"] = {"live": copy.deepcopy(STUDENT)}
    return params


EXAMPLE = [([5, 6, 7, 8], [-100, -100, 7, 8])]


@pytest.mark.parametrize("model, error, what", [
    ("no-logprobs", EndpointError, "no prompt_logprobs"),
    ("short", EndpointError, "3 prompt_logprobs entries for a prompt of 4 tokens"),
    ("other-model", EndpointError, "HTTP 404"),
    ("http500", EndpointUnreachable, "HTTP 500"),
])
def test_a_bad_answer_is_one_line_naming_the_url(served, monkeypatch, model, error, what):
    _, url, _, _ = served
    monkeypatch.setenv("STUB_KEY", SECRET)
    with pytest.raises(error) as err:
        _teacher(url, model=model).rows(EXAMPLE, K)
    message = str(err.value)
    assert what in message and f"{url}/v1/completions" in message and "\n" not in message and SECRET not in message
    assert is_retryable(err.value) == (error is EndpointUnreachable)


def test_a_wrong_key_and_a_server_down(served, monkeypatch):
    _, url, _, _ = served
    monkeypatch.setenv("STUB_KEY", "wrong-" + SECRET)
    with pytest.raises(EndpointError, match="HTTP 401") as err:
        _teacher(url).rows(EXAMPLE, K)
    assert SECRET not in str(err.value) and not is_retryable(err.value)
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EndpointUnreachable, match="not reachable") as err:
        _teacher(down).rows(EXAMPLE, K)
    assert f"{down}/v1/completions" in str(err.value) and is_retryable(err.value)
