"""A teacher served by another process (`teacher.model.endpoint`): an OpenAI-compatible server (vLLM, SGLang,
llama.cpp's server, a hosted API) whose `/v1/completions` scores the student's token ids and answers the teacher's
top-k log-probs per token (vLLM's extension), and which generates transfer sets and evaluation answers
(`/v1/completions`, or `/v1/chat/completions` with `generate_api: chat`). kd_core/teachers/served.py is the client;
docs/methods.md, "A teacher served by another process", and docs/operations.md. No torch here."""

from __future__ import annotations

import re
from typing import Literal

from urllib.parse import urlsplit

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from kd_core.config.base import PipelineConfigLike, StrictModel


class EndpointConfig(StrictModel):
    """Where the teacher is served and how it is asked. `api`: `prompt_logprobs` (vLLM's extension:
    `prompt_logprobs: k`, token ids as keys) or `echo` (the OpenAI form: `echo: true, logprobs: k`, with vLLM's
    `return_tokens_as_token_ids` so that the keys are token ids, not text)."""

    url: StrictStr = Field(..., pattern=r"^https?://[^\s]+$", description="the server's base URL, e.g. "
                           "http://host:8000 (`/v1/completions` is appended)")
    model: StrictStr = Field(..., min_length=1, description="the served model's name (the request's `model`)")
    top_k: StrictInt = Field(20, ge=1, description="teacher log-probs per token in live training (vLLM caps it at "
                             "its --max-logprobs, default 20); the cache asks for teacher_cache.top_k")
    timeout_s: StrictFloat | StrictInt = Field(60.0, gt=0, description="seconds one request may take")
    auth_env: StrictStr | None = Field(None, min_length=1, description="environment variable holding the API "
                                          "key (sent as a bearer token; never written or logged)")
    batch_size: StrictInt = Field(8, ge=1, description="prompts per request (scoring, and greedy generation "
                                  "through /v1/completions)")
    api: Literal["prompt_logprobs", "echo"] = "prompt_logprobs"
    generate_api: Literal["completions", "chat"] = Field(
        "completions", description="how it generates: `completions` (/v1/completions on the run's token ids: the "
        "prompts exactly as the in-process model gets them) or `chat` (/v1/chat/completions, one user message with "
        "the row's instruction and context; the server applies its own chat template)")
    sampling_seed: StrictBool = Field(True, description="send each sampled prompt's seed (`seed`, one prompt per "
                                      "request: the same samples on every run where the server honours it; off "
                                      "for a server that rejects `seed`)")
    retries: StrictInt = Field(4, ge=0, description="retries of a request answered 429 or 5xx, or not answered "
                               "(connection refused or reset, timed out), with exponential backoff")
    backoff_s: StrictFloat | StrictInt = Field(1.0, ge=0, description="backoff factor: the n-th retry waits "
                                               "backoff_s * 2^(n-1) s, the first none (urllib3's Retry); a "
                                               "Retry-After header is honoured")
    max_concurrent: StrictInt = Field(4, ge=1, description="requests in flight at once")
    requests_per_s: StrictFloat | StrictInt | None = Field(None, gt=0, description="at most this many requests "
                                                          "started per second (a hosted API's rate limit); none: "
                                                          "no limit")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        """A base URL with a host, no credentials, query or fragment (a key goes in `auth_env`, never here)."""
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ValueError("no user or password in the URL (the API key is read from the environment variable "
                             "named by auth_env)")
        if not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not a base URL (allowed: http[s]://host[:port][/path], no query)")
        try:
            parts.port
        except ValueError as err:
            raise ValueError(f"{url!r}: {err}") from None
        return url

    @field_validator("model")
    @classmethod
    def _model(cls, model: str) -> str:
        if not model.strip() or model != model.strip():
            raise ValueError(f"{model!r}: the served model's name, without surrounding spaces")
        return model

    @field_validator("auth_env")
    @classmethod
    def _auth_env(cls, name: str | None) -> str | None:
        """The name of an environment variable (letters, digits, '_'; not a key itself)."""
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"the name of an environment variable holding the key (letters, digits, '_', e.g. "
                             f"VLLM_API_KEY), never the key itself (got {len(name)} characters that are not a "
                             f"variable name)")
        return name


# methods that read the teacher only through its top-k log-probs (the methods the teacher-logit cache serves)
def check_served_teacher(cfg: PipelineConfigLike) -> None:
    """A served teacher is the teacher only, is not trained, generates transfer sets whose strategy needs no scores
    of it (generated, augment, paraphrase), and teaches at temperature 1 (the endpoint's log-probs are the model's
    own) with a method that reads its top-k log-probs; ValueError naming the key otherwise."""
    from kd_core.config.methods import METHOD_SPECS

    for name, st in cfg.students.items():
        if st.model.endpoint is not None:
            raise ValueError(f"students.{name}.model.endpoint: the teacher only (a student is trained here; "
                             f"allowed: config, checkpoint, from_teacher_layers)")
    if not cfg.is_served(cfg.teacher.name):
        return
    if cfg.teacher.train:
        raise ValueError("teacher.train: a teacher served by another process (teacher.model.endpoint) is not "
                         "trained here (allowed: false)")
    for name, ts in cfg.transfer_sets.items():
        if ts.source == cfg.teacher.name and ts.strategy in ("confidence", "hard_examples"):
            raise ValueError(f"transfer_sets.{name}.strategy: {ts.strategy!r} scores rows with {ts.source!r}, which "
                             f"is served by another process (teacher.model.endpoint): it generates, it does not "
                             f"score here (allowed: generated, augment, paraphrase)")
        if ts.hardness == "gap" and cfg.students[ts.source].teacher == cfg.teacher.name:
            raise ValueError(f"transfer_sets.{name}.hardness: 'gap' scores the references with {ts.source!r}'s teacher, "
                             f"which is served by another process (top-k log-probs only; allowed: loss)")
    readers = ", ".join(sorted(n for n, m in METHOD_SPECS.items() if m.reads_teacher_cache))
    for name, st in cfg.students.items():
        if cfg.teacher.name not in st.teacher_weights() or not METHOD_SPECS[st.method].needs_teacher:
            continue
        if not METHOD_SPECS[st.method].reads_teacher_cache:
            raise ValueError(f"students.{name}.method: {st.method!r} needs the teacher model itself, a served "
                             f"teacher gives its top-k log-probs (allowed: {readers})")
        if st.model.from_teacher_layers is not None:
            raise ValueError(f"students.{name}.model.from_teacher_layers: the served teacher's layers are not here "
                             f"(allowed: config, checkpoint)")
        if st.temperature != 1:
            raise ValueError(f"students.{name}.temperature: {st.temperature}: a served teacher's log-probs are at "
                             f"temperature 1 (allowed: 1.0)")
