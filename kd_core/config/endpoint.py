"""A teacher served by another process (`teacher.model.endpoint`): an OpenAI-compatible `/v1/completions` endpoint
as vLLM serves it, which scores the student's token ids and answers the teacher's top-k log-probs per token
(kd_core/teachers/served.py is the client; docs/methods.md, "A teacher served by another process"). No torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictFloat, StrictInt, StrictStr

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
    batch_size: StrictInt = Field(8, ge=1, description="prompts per request")
    api: Literal["prompt_logprobs", "echo"] = "prompt_logprobs"


# methods that read the teacher only through its top-k log-probs (the methods the teacher-logit cache serves)
def check_served_teacher(cfg: PipelineConfigLike) -> None:
    """A served teacher is the teacher only, is not trained, generates no transfer set, and teaches at temperature 1
    (the endpoint's log-probs are the model's own) with a method that reads its top-k log-probs; ValueError naming
    the key otherwise."""
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
        if ts.source == cfg.teacher.name:
            raise ValueError(f"transfer_sets.{name}.source: {ts.source!r} is served by another process "
                             f"(teacher.model.endpoint): it gives top-k log-probs, not generations (allowed: a "
                             f"student name)")
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
