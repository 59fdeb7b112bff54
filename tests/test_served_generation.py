"""Generation through a teacher served by another process (`teacher.model.endpoint`, kd_core/teachers/served.py):
tests/vllm_stub.py serves the tiny teacher of an in-process run over `/v1/completions` and `/v1/chat/completions`;
the transfer sets made through it (greedy, and sampled with per-prompt seeds) equal the in-process teacher's, its
evaluation gives the in-process ROUGE-L; a server answering 503 then 429 is retried; the rate limit spaces request
starts; `kd validate` refuses bad endpoint values with one line and exit status 2."""

from __future__ import annotations

import copy
import json

import pytest

from kd_core.config import parse_config
from kd_core.data.tokenize import encode_prompt
from kd_core.errors import EndpointUnreachable
from kd_core.generation import generate
from kd_core.io import read_jsonl
from kd_core.run import RunPaths, load_model, load_model_tokenizer
from kd_core.stages.evaluate import evaluate
from kd_core.stages.prepare import prepare
from kd_core.stages.train_teacher import train_teacher
from kd_core.stages.transfer import transfer
from kd_core.teachers.served import ServedTeacher
from kd_core.teachers.served_http import RateLimit
from tests.conftest import tiny_params, write_params
from tests.vllm_stub import serving

SECRET = "sk-not-a-real-key-5678"
SETS = {"greedy": {"source": "teacher", "greedy": True, "max_new_tokens": 8},
        "sampled": {"source": "teacher", "n_samples": 2, "temperature": 0.9, "top_p": 0.95, "max_new_tokens": 8,
                    "seed": 3}}
TEACHER_TRAINING = {"max_steps": 40, "learning_rate": 0.01, "batch_size": 16, "logging_steps": 10,
                    "warmup_ratio": 0.0}  # long enough that it answers in words, not EOS at once


def _params(tmp, name: str, teacher: dict) -> dict:
    params = tiny_params(run_dir=str(tmp / "runs" / name))
    params["teacher"] = {**params["teacher"], **teacher}
    params["transfer_sets"] = copy.deepcopy(SETS)
    params["evaluation"]["sample_seeds"] = [0, 1]
    return params


def _endpoint(url: str, **extra) -> dict:
    return {"url": url, "model": "tiny-teacher", "batch_size": 3, "auth_env": "STUB_KEY", "backoff_s": 0} | extra


@pytest.fixture(scope="module")
def runs(tmp_path_factory, empty_stores):
    """(url, (the in-process run's cfg, paths), (the served run's cfg, paths)): the tiny teacher trained in the
    first run, served by tests/vllm_stub.py as the second run's teacher (with the first run's tokenizer)."""
    import mlflow

    tmp = tmp_path_factory.mktemp("servegen")
    uri = f"sqlite:///{empty_stores.seed_mlflow(tmp / 'mlflow.db')}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("STUB_KEY", SECRET)
        mlflow.set_tracking_uri(uri)
        base = tiny_params()["teacher"]
        local = parse_config(_params(tmp, "local", {"training": TEACHER_TRAINING}))
        local_paths = RunPaths.of(local)
        prepare(local, local_paths)
        train_teacher(local, local_paths)
        with serving(local_paths.model("teacher"), "tiny-teacher", "STUB_KEY") as url:
            model = {"endpoint": _endpoint(url), "tokenizer": str(local_paths.tokenizer)}
            remote = parse_config(_params(tmp, "served", {"model": model, "train": False}))
            assert base["name"] == remote.teacher.name
            remote_paths = RunPaths.of(remote)
            prepare(remote, remote_paths)
            train_teacher(remote, remote_paths)
            yield url, (local, local_paths), (remote, remote_paths)
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_a_transfer_set_through_the_server_equals_the_in_process_one(runs, name):
    _, (local, local_paths), (remote, remote_paths) = runs
    theirs, ours = transfer(local, local_paths, name), transfer(remote, remote_paths, name)
    rows = read_jsonl(remote_paths.split(name))
    assert rows == read_jsonl(local_paths.split(name))
    assert ours["rows"] == theirs["rows"] == len(rows) > 0
    answers = ours["answered_prompts"] * SETS[name].get("n_samples", 1)  # the server's count has the EOS too
    assert theirs["generated_tokens"] <= ours["generated_tokens"] <= theirs["generated_tokens"] + answers
    assert len({r["response"] for r in rows}) > 1  # answers in words, not all alike
    if name == "sampled":  # two samples per prompt, not the same
        assert sum(a["response"] != b["response"] for a, b in zip(rows, rows[len(rows) // 2:])) > 0


def test_the_served_teachers_evaluation_equals_the_in_process_one(runs):
    _, (local, local_paths), (remote, remote_paths) = runs
    ours, theirs = evaluate(remote, remote_paths, "teacher"), evaluate(local, local_paths, "teacher")
    url = remote.teacher.model.endpoint.url
    assert {k: ours[k] for k in ("served", "endpoint", "model", "parameters")} == \
        {"served": True, "endpoint": url, "model": "tiny-teacher", "parameters": None}
    generation = [k for k in theirs if k.startswith("test/") and not k.endswith(("tokens_per_s", "/loss", "/ppl"))]
    assert "test/rougeL_greedy" in generation and "test/rougeL_sampled_mean" in generation
    assert {k: ours[k] for k in generation} == pytest.approx({k: theirs[k] for k in generation}, abs=1e-9)
    assert "val/loss" in theirs and not {"val/loss", "test/loss"} & set(ours)  # (every reference token's log-prob)
    per_prompt = [json.loads(line) for line in (remote_paths.generations("teacher") / "test.jsonl").open()]
    assert [p["greedy"] for p in per_prompt] == \
        [json.loads(line)["greedy"] for line in (local_paths.generations("teacher") / "test.jsonl").open()]


def _prompts(cfg, paths, n: int = 4):
    tokenizer = load_model_tokenizer(paths, "teacher")
    rows = read_jsonl(paths.split("train"))[:n]
    return tokenizer, [encode_prompt(r, tokenizer, cfg.data.template, cfg.tokenizer.max_length) for r in rows]


def test_a_server_answering_503_then_429_is_retried(runs):
    url, (local, local_paths), _ = runs
    tokenizer, prompts = _prompts(local, local_paths)
    want = generate(load_model(local_paths, "teacher"), tokenizer, prompts, max_new_tokens=6, do_sample=False)
    endpoint = parse_config(_params(local_paths.root, "x", {"model": {"endpoint": _endpoint(
        url, model="flaky-a", retries=0), "tokenizer": "tok"}, "train": False})).teacher.model.endpoint
    with pytest.raises(EndpointUnreachable, match="HTTP 503.*after 0 retries") as err:
        generate(ServedTeacher(endpoint, len(tokenizer)), tokenizer, prompts, max_new_tokens=6, do_sample=False)
    assert SECRET not in str(err.value) and "\n" not in str(err.value)
    patient = endpoint.model_copy(update={"model": "flaky-b", "retries": 2, "max_concurrent": 1, "batch_size": 8})
    got = generate(ServedTeacher(patient, len(tokenizer)), tokenizer, prompts, max_new_tokens=6, do_sample=False)
    assert got.texts == want.texts and got.token_ids == want.token_ids


def test_chat_generation_sends_the_prompt_as_a_user_message(runs):
    url, (local, local_paths), (remote, _) = runs
    tokenizer, prompts = _prompts(local, local_paths)
    # the stub encodes the message's text with the model's tokenizer: the prompts, when they read back the same
    assert all(tokenizer(tokenizer.decode(p, skip_special_tokens=True))["input_ids"] == p for p in prompts)
    chat = remote.teacher.model.endpoint.model_copy(update={"generate_api": "chat"})
    want = generate(load_model(local_paths, "teacher"), tokenizer, prompts, max_new_tokens=6, do_sample=True, seed=5)
    got = generate(ServedTeacher(chat, len(tokenizer)), tokenizer, prompts, max_new_tokens=6, do_sample=True, seed=5)
    assert got.texts == want.texts


def test_the_rate_limit_spaces_request_starts():
    now, slept = [10.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limit = RateLimit(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limit.wait()
    now[0] += 1.0  # idle a second: the next start is not delayed
    limit.wait()
    assert slept == pytest.approx([0.25, 0.25])
    assert RateLimit(None).interval == 0


@pytest.mark.parametrize("change, key, says", [
    (lambda e: e.update(url="http://user:pw@host:8000"), "teacher.model.endpoint.url", "URL contains a password"),
    (lambda e: e.update(url="http://user@host:8000"), "teacher.model.endpoint.url", "no user or password"),
    (lambda e: e.update(url="http://host:8000/v1?key=abc"), "teacher.model.endpoint.url", "not a base URL"),
    (lambda e: e.update(url="ftp://host"), "teacher.model.endpoint.url", "should match pattern"),
    (lambda e: e.update(url="http://host:99999"), "teacher.model.endpoint.url", "out of range"),
    (lambda e: e.update(model=" "), "teacher.model.endpoint.model", "without surrounding spaces"),
    (lambda e: e.pop("model"), "teacher.model.endpoint.model", "Field required"),
    (lambda e: e.update(auth_env=SECRET), "teacher.model.endpoint.auth_env", "never the key itself"),
    (lambda e: e.update(retries=-1), "teacher.model.endpoint.retries", "greater than or equal to 0"),
    (lambda e: e.update(requests_per_s=0), "teacher.model.endpoint.requests_per_s", "greater than 0"),
    (lambda e: e.update(max_concurrent=0), "teacher.model.endpoint.max_concurrent", "greater than or equal to 1"),
    (lambda e: e.update(generate_api="responses"), "teacher.model.endpoint.generate_api", "'completions' or 'chat'"),
    (lambda e: e.update(sampling_seed="yes"), "teacher.model.endpoint.sampling_seed", "valid boolean"),
])
def test_kd_validate_refuses_bad_endpoint_values_in_one_line(tmp_path, change, key, says):
    from typer.testing import CliRunner

    from kd_core.cli import app

    endpoint = _endpoint("http://127.0.0.1:8000")
    params = _params(tmp_path, "v", {"model": {"endpoint": endpoint, "tokenizer": "tok"}, "train": False})
    parse_config(copy.deepcopy(params))  # valid as given
    change(endpoint)
    result = CliRunner().invoke(app, ["validate", "--params", str(write_params(tmp_path, params))])
    assert result.exit_code == 2, result.output
    assert key in result.stderr and says in result.stderr and len(result.stderr.splitlines()) == 1
    assert SECRET not in result.stderr


def test_a_served_source_cannot_score_rows(tmp_path):
    from typer.testing import CliRunner

    from kd_core.cli import app

    params = _params(tmp_path, "v", {"model": {"endpoint": _endpoint("http://h:1"), "tokenizer": "tok"},
                                     "train": False})
    params["transfer_sets"]["greedy"] |= {"strategy": "confidence", "keep_fraction": 0.5}
    result = CliRunner().invoke(app, ["validate", "--params", str(write_params(tmp_path, params))])
    assert result.exit_code == 2
    assert "transfer_sets.greedy.strategy: 'confidence' scores rows" in result.stderr
    assert "allowed: generated, augment, paraphrase" in result.stderr and len(result.stderr.splitlines()) == 1
