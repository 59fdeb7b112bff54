"""How a model is made: built from an architecture (`ArchConfig`), loaded from a checkpoint, or cut from its
teacher (`from_teacher_layers`): `ModelSource`, with the rules transformers would otherwise enforce only
when the model is built, after the stages before it have run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kd_core.config.base import StrictModel
from kd_core.config.endpoint import EndpointConfig


class ArchConfig(StrictModel):
    """A model built from a config (randomly initialised), GPT-2 or Llama shaped."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = Field(2, ge=1)
    hidden: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    n_kv_head: int | None = Field(None, ge=1, description="llama only; default = n_head")
    intermediate: int | None = Field(None, ge=8, description="MLP width; default 4*hidden")

    @model_validator(mode="after")
    def _heads(self) -> ArchConfig:
        """What transformers needs: hidden = n_head * head_dim; for llama, n_kv_head divides n_head (grouped
        query attention repeats each key/value head n_head / n_kv_head times) and head_dim is even (rotary
        embeddings rotate pairs of dimensions)."""
        if self.hidden % self.n_head:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by n_head ({self.n_head})")
        if self.arch != "llama":
            if self.n_kv_head is not None:
                raise ValueError(f"n_kv_head: llama only ({self.arch} has one key/value head per attention head)")
            return self
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head: {self.n_kv_head} must divide n_head ({self.n_head}) "
                             f"(allowed: {', '.join(str(k) for k in _divisors(self.n_head))})")
        head_dim = self.hidden // self.n_head
        if head_dim % 2:
            raise ValueError(f"hidden: hidden / n_head = {self.hidden} / {self.n_head} = {head_dim} must be even for "
                             f"llama (rotary embeddings rotate pairs of dimensions)")
        return self


# the layers LoRA can adapt (linear, Conv1D and embedding layers) of each buildable architecture, by their last name
# (tests/test_lora_student.py checks them against the models transformers builds)
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "lm_head", "wte", "wpe"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"),
}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


class ModelSource(StrictModel):
    """Exactly one of: `config` (build from an architecture), `checkpoint` (path or hub name),
    `from_teacher_layers` (student only: copy the teacher and keep these layer indices).

    `tokenizer`: the model's own tokenizer (a tokenizer folder or hub name, loaded with `AutoTokenizer`, from the
    local files / hub cache only). Without it a model built from `config` uses the run's shared tokenizer (the one
    `prepare` writes) and a checkpoint its own; with it a `config` model gets that vocabulary, a checkpoint the given
    tokenizer instead of its files. A model cut `from_teacher_layers` has its teacher's. Teacher and student with
    different tokenizers need a method that distils across tokenizers (`uld`, `gold`): `kd validate` refuses the
    others (`kd_core.config.tokenizers`)."""

    config: ArchConfig | None = None
    checkpoint: str | None = None
    gguf_file: str | None = None
    from_teacher_layers: list[int] | None = None
    tokenizer: str | None = Field(None, min_length=1, description="the model's own tokenizer (folder or hub name); "
                                  "default: a config model the run's shared one, a checkpoint its own")
    trust_remote_code: bool = False
    endpoint: EndpointConfig | None = Field(None, description="teacher only: served by another process (an "
                                            "OpenAI-compatible /v1/completions, as vLLM serves it)")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        """A validator, not a pydantic discriminated union: the YAML has no tag key (the variant is told by
        which key is present), a callable discriminator would add the tag to every error path
        (`model.config.config.n_layer`), and `kd_core.models.build` reads all three fields of one type."""
        given = [k for k in ("config", "checkpoint", "from_teacher_layers", "endpoint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of config, checkpoint, from_teacher_layers, endpoint (got {given or 'none'})")
        if self.endpoint is not None and self.tokenizer is None:
            raise ValueError("endpoint: give tokenizer too (the served model's tokenizer, folder or hub name: the "
                             "endpoint scores the token ids it makes)")
        if self.gguf_file is not None and self.checkpoint is None:
            raise ValueError("gguf_file: a file inside `checkpoint` (give checkpoint too, or drop gguf_file)")
        layers = self.from_teacher_layers
        if layers is not None and self.tokenizer is not None:
            raise ValueError("tokenizer: a model cut from_teacher_layers keeps its teacher's tokenizer (drop tokenizer, "
                             "or build the model from config / a checkpoint)")
        if layers is not None:
            if not layers:
                raise ValueError("from_teacher_layers: empty (give the teacher layer indices to keep, e.g. [0, 2])")
            if negative := [i for i in layers if i < 0]:
                raise ValueError(f"from_teacher_layers: negative indices {negative} (allowed: 0 to the teacher's "
                                 f"layers - 1)")
            if repeated := sorted({i for i in layers if layers.count(i) > 1}):
                raise ValueError(f"from_teacher_layers: indices {repeated} given twice (each teacher layer is "
                                 f"kept at most once)")
        return self
