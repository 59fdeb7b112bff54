"""The one configuration: `params.yaml`, validated with pydantic.

Every stage takes a `PipelineConfig`. Unknown keys are errors (a typo must not silently fall back to a
default), and every error names the key path and the allowed values, e.g.

    params.yaml: students[1].method: unknown method 'fkd' (allowed: kd, sft)

Methods and divergences are looked up by name in their registries (`kd_core.methods`,
`kd_core.losses.divergences`), so a new module registering a name is all it takes to extend them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad params.yaml: the message is one line per problem, each naming the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------- data
class SplitConfig(_Strict):
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class EvalSetConfig(_Strict):
    """A named extra evaluation set read from a local file (same field mapping rules as the main data)."""

    path: str
    limit: int | None = Field(None, ge=1, description="keep the first N valid rows")
    filter_field: str | None = Field(None, description="keep only rows whose field is truthy")


class DataConfig(_Strict):
    source: Literal["builtin", "file", "hub"] = "builtin"
    builtin_examples: int = Field(3000, ge=10)
    builtin_seed: int = 0
    path: str | None = None
    hub_name: str | None = None
    hub_split: str = "train"
    field_map: dict[str, str] = Field(default_factory=dict, description="our field -> source column")
    max_chars: int = Field(4000, ge=16, description="rows whose prompt+response exceed this are bad")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    split: SplitConfig = SplitConfig()
    template: Literal["alpaca", "minimal", "chatml"] = "alpaca"
    max_rows: int | None = Field(None, ge=1, description="keep the first N valid rows of the source (subsampling)")
    eval_sets: dict[str, EvalSetConfig] = Field(default_factory=dict)

    @field_validator("field_map")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        allowed = {"instruction", "context", "response", "category"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"unknown field(s) {bad} (allowed: {', '.join(sorted(allowed))})")
        return v

    @model_validator(mode="after")
    def _source_args(self) -> DataConfig:
        if self.source == "file" and not self.path:
            raise ValueError("path: required when source is 'file'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("hub_name: required when source is 'hub'")
        return self


# ----------------------------------------------------------------------------------------------- models
class ArchConfig(_Strict):
    """A model built from a config (randomly initialised), GPT-2 or Llama shaped."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = Field(2, ge=1)
    hidden: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    n_kv_head: int | None = Field(None, ge=1, description="llama only; default = n_head")
    intermediate: int | None = Field(None, ge=8, description="MLP width; default 4*hidden")

    @model_validator(mode="after")
    def _heads(self) -> ArchConfig:
        if self.hidden % self.n_head:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by n_head ({self.n_head})")
        return self


class ModelSource(_Strict):
    """Exactly one of: `config` (build from an architecture), `checkpoint` (path or hub name),
    `from_teacher_layers` (student only: copy the teacher and keep these layer indices)."""

    config: ArchConfig | None = None
    checkpoint: str | None = None
    gguf_file: str | None = None
    from_teacher_layers: list[int] | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("config", "checkpoint", "from_teacher_layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of config, checkpoint, from_teacher_layers (got {given or 'none'})")
        return self


def _deepspeed_stage(path: str) -> int | None:
    try:
        return json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError) as err:
        raise ValueError(f"DeepSpeed config {path!r}: {err}") from None


class TrainingConfig(_Strict):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="overrides epochs when > 0")
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    seed: int | None = Field(None, description="default: the pipeline seed")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps (0: only the final model)")
    logging_steps: int = Field(20, ge=1)
    deepspeed: str | None = Field(None, description="path to a DeepSpeed json (infra/deepspeed/*.json)")
    teacher_sharding: Literal["replicate", "zero3"] = Field(
        "replicate", description="frozen teacher under DeepSpeed: a full copy per rank, or sharded with ZeRO-3 "
                                 "for inference (needs a stage-3 `deepspeed` config)")
    loss_on_prompt: bool = Field(False, description="train on prompt tokens too (default: response tokens only)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="mixed precision (the Trainer's and DeepSpeed's 'auto' bf16/fp16): the student keeps "
                            "fp32 master weights, the frozen teacher is cast to it; bf16 needs a GPU of the "
                            "Ampere generation or newer (on CPU it is emulated and slow), fp16 any GPU")

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_file(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"DeepSpeed config {v!r} not found (e.g. infra/deepspeed/zero2.json)")
        return v

    @model_validator(mode="after")
    def _sharding_needs_zero3(self) -> TrainingConfig:
        if self.teacher_sharding == "zero3":
            stage = _deepspeed_stage(self.deepspeed) if self.deepspeed else None
            if stage != 3:
                raise ValueError(f"teacher_sharding: 'zero3' needs `deepspeed` set to a ZeRO stage-3 config "
                                 f"(got {self.deepspeed or 'no deepspeed'}; e.g. infra/deepspeed/zero3.json)")
        return self


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="default: peft's choice for the architecture")


class TeacherConfig(_Strict):
    name: str = "teacher"
    model: ModelSource
    train: bool = Field(True, description="false: use the checkpoint as is (no SFT)")
    finetune: Literal["full", "lora"] = "full"
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()


class FinetuneConfig(_Strict):
    """Post-distillation fine-tuning: cross-entropy on the task data at a smaller learning rate."""

    enabled: bool = False
    epochs: float = Field(1.0, gt=0)
    lr_scale: float = Field(0.1, gt=0, le=1, description="learning rate = distillation lr * lr_scale")


class TransferSetConfig(_Strict):
    """A transfer set generated by a model (SeqKD data), written as `data/<name>.jsonl` by the transfer stage.

    strategy: `generated` (the model's responses replace the references), `confidence` (keep the
    `keep_fraction` of generations with the highest mean token log-probability under the model),
    `augment` (the references plus `n_samples` generations per prompt)."""

    source: str = Field("teacher", description="the model that generates: the teacher or a student name")
    strategy: Literal["generated", "confidence", "augment"] = "generated"
    n_samples: int = Field(1, ge=1)
    greedy: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    keep_fraction: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class TeacherCacheConfig(_Strict):
    """Teacher-logit cache (kd_core/logit_cache.py): run the teacher once over `train_data`, keep its `top_k`
    log-probabilities (+ the tail mass) per response token, and train without the live teacher. top_k >= the
    vocabulary size is exact; smaller k gives the sparse divergences of kd_core/losses/sparse.py."""

    enabled: bool = False
    top_k: int = Field(64, ge=1, description="teacher tokens kept per position (capped at the vocabulary size)")
    batch_size: int = Field(32, ge=1, description="teacher batch size while building the cache")


class StudentConfig(_Strict):
    name: str = Field("", description="filled from the key under `students`")
    teacher: str = Field("teacher", description="who teaches it: the teacher, or another student (a teacher assistant)")
    train_data: str = Field("train", description="'train' (the split) or the name of a transfer set")
    method: str = "kd"
    divergence: str = Field("fkl", description="default: the method's own (fkl for kd, jsd for gkd, ...)")
    divergence_args: dict[str, float] = Field(default_factory=dict)
    method_args: dict[str, Any] = Field(default_factory=dict)
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the CE loss: alpha*CE + (1-alpha)*KD")
    temperature: float = Field(1.0, gt=0)
    model: ModelSource
    training: TrainingConfig = TrainingConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_default_divergence(cls, data: Any) -> Any:
        """No divergence given: the method's default (and its default args) is what gets recorded."""
        from kd_core.methods import METHODS

        if isinstance(data, dict) and data.get("divergence") is None and data.get("method", "kd") in METHODS:
            name, args = METHODS[data.get("method", "kd")].default_divergence
            data = {**data, "divergence": name, "divergence_args": {**args, **(data.get("divergence_args") or {})}}
        return data

    @model_validator(mode="after")
    def _registered_names(self) -> StudentConfig:
        from kd_core.losses.divergences import DIVERGENCES
        from kd_core.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r} (allowed: {', '.join(sorted(METHODS))})")
        allowed_div = METHODS[self.method].allowed_divergences
        if allowed_div is not None and self.divergence not in allowed_div:
            raise ValueError(f"divergence: {self.divergence!r} does not fit method {self.method!r} "
                             f"(allowed: {', '.join(sorted(allowed_div))})")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: unknown divergence {self.divergence!r} "
                             f"(allowed: {', '.join(sorted(DIVERGENCES))})")
        spec = DIVERGENCES[self.divergence].params
        for key, value in self.divergence_args.items():
            if key not in spec:
                allowed = ", ".join(sorted(spec)) or "none"
                raise ValueError(f"divergence_args.{key}: not a parameter of {self.divergence!r} (allowed: {allowed})")
            p = spec[key]
            if not p.low <= value <= p.high:
                raise ValueError(f"divergence_args.{key}: {value} is outside [{p.low}, {p.high}]")
        METHODS[self.method].validate_args(self.method_args)
        if self.teacher_cache.enabled and not METHODS[self.method].reads_teacher_cache:
            readers = ", ".join(sorted(n for n, m in METHODS.items() if m.reads_teacher_cache))
            raise ValueError(f"teacher_cache.enabled: method {self.method!r} needs the live teacher (on-policy, full "
                             f"logits or no teacher at all); the cache is read by: {readers}")
        return self


# ----------------------------------------------------------------------------------------------- rest
class GenerationConfig(_Strict):
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, ge=1)


class EvaluationConfig(_Strict):
    eval_sets: list[str] = Field(default_factory=lambda: ["test"],
                                 description="'test' (the split) and names from data.eval_sets")
    limit: int | None = Field(None, ge=1, description="first N prompts of each set")
    sample_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    greedy: bool = True
    generation: GenerationConfig = GenerationConfig()
    unc_buckets: int = Field(3, ge=1, description="teacher-uncertainty buckets for the agreement/KL analysis")
    exaccerr_lengths: list[int] = Field(default_factory=lambda: [8, 16], description="ExAccErr(l) for these l")
    exaccerr_prompts: int = Field(32, ge=0, description="prompts of the test split used for ExAccErr (0: off)")
    exaccerr_samples: int = Field(2, ge=1, description="prefixes sampled per prompt and model")


class ChampionRule(_Strict):
    metric: str = "test/rougeL_sampled_mean"
    mode: Literal["max", "min"] = "max"
    min_delta: float = Field(0.0, ge=0, description="move the alias only when better by more than this")
    significance: float | None = Field(
        None, gt=0, lt=1, description="also require a paired bootstrap p-value below this (per-prompt test ROUGE-L)")


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(None, description="default: env MLFLOW_TRACKING_URI, else sqlite in run_dir's project")
    experiment: str = "kd-pipeline"
    registered_model: str = "kd-student"
    register_teacher_as: str = "kd-teacher"
    champion: ChampionRule = ChampionRule()


class OrchestrationConfig(_Strict):
    max_parallel_students: int = Field(1, ge=1)
    retries: int = Field(1, ge=0, description="Prefect retries for transient failures")


class TokenizerConfig(_Strict):
    """For models built from a config: a byte-level BPE trained on the train split."""

    vocab_size: int = Field(2048, ge=64)
    max_length: int = Field(128, ge=8, description="tokens; longer samples are truncated or dropped")
    overlong: Literal["truncate", "drop"] = "truncate"


class PipelineConfig(_Strict):
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    teacher: TeacherConfig
    transfer_sets: dict[str, TransferSetConfig] = Field(default_factory=dict)
    students: dict[str, StudentConfig] = Field(min_length=1, description="name -> student")
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @field_validator("students", mode="before")
    @classmethod
    def _names_from_keys(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of student name -> settings")
        out = {}
        for name, body in v.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"{name!r}: a student name is letters, digits, '_', '.', '-'")
            out[name] = {**body, "name": name} if isinstance(body, dict) else body
        return out

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        names = list(self.students)
        if self.teacher.name in names:
            raise ValueError(f"students: name {self.teacher.name!r} is the teacher's")
        models = [self.teacher.name, *names]
        for name, ts in self.transfer_sets.items():
            if name in ("train", "val", "test"):
                raise ValueError(f"transfer_sets.{name}: reserved name (train, val, test are the splits)")
            if ts.source not in models:
                raise ValueError(f"transfer_sets.{name}.source: unknown model {ts.source!r} (allowed: {', '.join(models)})")
        from kd_core.methods import METHODS

        for name, st in self.students.items():
            if st.teacher not in models or st.teacher == name:
                allowed = ", ".join(m for m in models if m != name)
                raise ValueError(f"students.{name}.teacher: unknown model {st.teacher!r} (allowed: {allowed})")
            if METHODS[st.method].needs_transfer_set and st.train_data == "train":
                allowed = ", ".join(self.transfer_sets) or "none defined under transfer_sets"
                raise ValueError(f"students.{name}.train_data: method {st.method!r} trains on a transfer set "
                                 f"(allowed: {allowed})")
            if st.train_data != "train" and st.train_data not in self.transfer_sets:
                allowed = ", ".join(["train", *self.transfer_sets])
                raise ValueError(f"students.{name}.train_data: unknown data {st.train_data!r} (allowed: {allowed})")
        for name in names:  # teacher-assistant chains (and transfer-set sources) must end at the teacher
            path: list[str] = []

            def walk(node: str) -> None:
                if node == self.teacher.name:
                    return
                if node in path:
                    raise ValueError(f"students.{name}.teacher: cycle {' -> '.join(path + [node])}")
                path.append(node)
                for dep in self.dependencies(node):
                    walk(dep)
                path.pop()
            walk(name)
        known = {"test", *self.data.eval_sets}
        for i, name in enumerate(self.evaluation.eval_sets):
            if name not in known:
                raise ValueError(f"evaluation.eval_sets[{i}]: unknown eval set {name!r} (allowed: {', '.join(sorted(known))})")
        return self

    # ---- helpers
    def student(self, name: str) -> StudentConfig:
        if name not in self.students:
            raise KeyError(f"no student named {name!r} (students: {', '.join(self.students)})")
        return self.students[name]

    def dependencies(self, student: str) -> list[str]:
        """The models a student needs finished first: its teacher and the source of its transfer set."""
        st = self.students[student]
        deps = [st.teacher]
        if st.train_data in self.transfer_sets:
            deps.append(self.transfer_sets[st.train_data].source)
        return deps

    def chain_order(self) -> list[str]:
        """Student names ordered so that every model comes after the models it depends on."""
        done: list[str] = []

        def visit(name: str) -> None:
            if name in done or name == self.teacher.name:
                return
            for dep in self.dependencies(name):
                visit(dep)
            done.append(name)
        for name in self.students:
            visit(name)
        return done

    def fingerprint(self) -> str:
        """Short hash of the whole config: tags registered models with the params that produced them."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e['input']!r})"
        # model validators report at the parent; their message starts with the sub-key ("method: ...")
        sub = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg)
        if sub and e["type"] == "value_error":
            loc, msg = (f"{loc}.{sub.group(1)}" if loc else sub.group(1)), sub.group(2)
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


# Credentials never go in params.yaml: it is committed, hashed into tags and logged as MLflow params.
SECRET_WORDS = {"password", "passwd", "secret", "token", "apikey", "credential", "credentials"}
SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "token")}
SECRET_HINT = ("set credentials in the environment instead (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, HF_TOKEN)")


def _looks_secret(key: str) -> bool:
    parts = re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", key.strip())
    parts = [p.lower() for p in parts if p]
    return bool(SECRET_WORDS & set(parts)) or any(pair in SECRET_PAIRS for pair in zip(parts, parts[1:]))


def find_secrets(raw: Any, path: str = "") -> list[str]:
    """Keys that look like credentials and URLs with a password (`scheme://user:pass@host`), by key path."""
    from urllib.parse import urlsplit

    found = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            sub = f"{path}.{key}" if path else str(key)
            if _looks_secret(str(key)):
                found.append(f"{sub}: looks like a credential; {SECRET_HINT}")
            else:
                found += find_secrets(value, sub)
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            found += find_secrets(value, f"{path}[{i}]")
    elif isinstance(raw, str) and "://" in raw:
        try:
            has_password = urlsplit(raw).password is not None
        except ValueError:
            has_password = False
        if has_password:
            found.append(f"{path}: URL contains a password (user:password@); {SECRET_HINT}")
    return found


def parse_config(raw: dict[str, Any], source: str = "params.yaml") -> PipelineConfig:
    secrets = find_secrets(raw)
    if secrets:
        raise ConfigError("\n".join(f"{source}: {line}" for line in secrets))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    # YAML anchors load as one shared object: un-alias so an override of one student changes only that one
    raw = json.loads(json.dumps(raw, default=str))
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_config(raw, source=str(path))


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` (list indices as numbers, like `dvc exp run -S`)."""
    node: Any = raw
    *parents, leaf = dotted.split(".")
    for key in parents + [leaf]:
        is_last = key is leaf
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted!r}: {key!r} is not an index of a list of {len(node)}")
            if is_last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if is_last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"override {dotted!r}: cannot descend into a {type(node).__name__} at {key!r}")
