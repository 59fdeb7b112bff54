"""The pydantic schema of `params.yaml`: one model per section (model sources in `model_source`).

Each validator's message starts with the key it is about (`method: unknown method ...`), so that
`kd_core.config.load` can report it under the full key path. Cross-field rules that need the whole
pipeline live in `graph` (model references, chains, layers) and `metrics` (the champion metric).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictFloat, field_validator, model_validator

from kd_core.config import graph, methods, metrics
from kd_core.config.base import StrictModel
from kd_core.config.data import DataConfig
from kd_core.config.execution import ExecutionConfig, check_execution
from kd_core.config.model_source import LORA_TARGETS, ModelSource
from kd_core.config.routing import RouteConfig, check_routes, with_route_teachers
from kd_core.config.tokenizers import check_shared_vocabulary
from kd_core.config.tracking_store import unknown_scheme
from kd_core.config.transfer_rules import TransferSetConfig


def _deepspeed_stage(path: str) -> int | None:
    try:
        return json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError) as err:
        raise ValueError(f"DeepSpeed config {path!r}: {err}") from None


class LauncherConfig(StrictModel):
    """How the flow runs a training stage as several processes of this machine: `kind` is the launcher (`torchrun`,
    or DeepSpeed's `deepspeed`), started by the stage's Prefect task as `<launcher> ... kd stage NAME --model KEY`
    (kd_core/pipeline/launcher.py). Several nodes: `execution.engine: ray` (a Ray Train job, kd_core/pipeline/cluster), or DeepSpeed's
    own launcher reaching the other nodes over ssh with a hostfile (`extra_args: [--hostfile, PATH]`, `master_addr`
    this node's address)."""

    kind: Literal["torchrun", "deepspeed"]
    nproc_per_node: int = Field(ge=1, description="processes per node (one per GPU)")
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, ge=1, le=65535)
    extra_args: list[str] = Field(default_factory=list, description="more launcher arguments, e.g. [--tee, '3']")

    @model_validator(mode="before")
    @classmethod
    def _nodes_moved_to_ray(cls, v):
        gone = [k for k in ("nnodes", "node_rank") if isinstance(v, dict) and k in v]
        if gone:
            raise ValueError(f"{gone[0]}: the per-node mode is gone; several nodes: execution.engine: ray with "
                             f"execution.stages.<stage>.workers (or kind deepspeed with extra_args [--hostfile, PATH])")
        return v


class TrainingConfig(StrictModel):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: train `epochs`; N >= 1: exactly N optimizer steps")
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
    launcher: LauncherConfig | None = Field(
        None, description="run this training stage from the flow as launched processes (torchrun / deepspeed); "
                          "null: in the flow's process")

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, v: int) -> int:
        if v == 0:  # the Trainer would read 0 as "not set" and train 3 epochs
            raise ValueError("0 steps: give -1 (train `epochs`) or a number of steps >= 1")
        return v

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


class LoraConfig(StrictModel):
    """LoRA adapters (peft): each targeted layer W x becomes W x + (alpha / r) · B A x with A [r, in], B [out, r] the
    only trained weights (B starts at 0); the saved model is W + (alpha / r) · B A, merged (kd_core/models/adapters.py)."""

    r: int = Field(8, ge=1, description="rank of the adapters")
    alpha: float = Field(16, gt=0, description="scaling alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (> 0: a LoRA on the LM head "
                           "makes the fused losses fall back to the logits)")
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="layer names (a name or a dotted suffix, e.g. c_attn, q_proj, lm_head); "
                                        "default: peft's choice for the architecture")

    def unknown_targets(self, source: ModelSource) -> str | None:
        """`target_modules: ...` naming the targets a model built from `source.config` does not have, None when all
        are there or the architecture is not known before the model is loaded (checked then)."""
        if source.config is None or self.target_modules is None:
            return None
        layers = LORA_TARGETS[source.config.arch]
        unknown = [t for t in self.target_modules if t.rsplit(".", 1)[-1] not in layers]
        if not unknown:
            return None
        return (f"target_modules: {', '.join(unknown)}: no such layer in a {source.config.arch} model "
                f"(allowed: {', '.join(layers)})")


def _lora_problem(lora: LoraConfig, source: ModelSource, training: TrainingConfig) -> str | None:
    """What makes a LoRA model's settings unusable before it is built (`lora.` keys first)."""
    if (unknown := lora.unknown_targets(source)) is not None:
        return f"lora.{unknown}"
    if training.deepspeed and _deepspeed_stage(training.deepspeed) == 3:
        return (f"lora: LoRA under ZeRO-3 ({training.deepspeed}) is not supported: the merge needs the full weights "
                f"on one rank (use a ZeRO-2 config, e.g. infra/deepspeed/zero2.json)")
    return None


class TeacherConfig(StrictModel):
    name: str = "teacher"
    model: ModelSource
    train: bool = Field(True, description="false: use the checkpoint as is (no SFT)")
    finetune: Literal["full", "lora"] = "full"
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _not_cut_from_itself(self) -> TeacherConfig:
        if self.model.from_teacher_layers is not None:
            raise ValueError("model.from_teacher_layers: students only (the teacher has no teacher to be cut "
                             "from; allowed: config, checkpoint)")
        if self.finetune == "lora" and self.train and (problem := _lora_problem(self.lora, self.model, self.training)):
            raise ValueError(problem)
        return self


class FinetuneConfig(StrictModel):
    """Post-distillation fine-tuning: cross-entropy on the task data at a smaller learning rate."""

    enabled: bool = False
    epochs: float = Field(1.0, gt=0)
    lr_scale: float = Field(0.1, gt=0, le=1, description="learning rate = distillation lr * lr_scale")


class TeacherCacheConfig(StrictModel):
    """Teacher-logit cache (kd_core/teachers/cache.py): run the teacher once over `train_data`, keep its `top_k`
    log-probabilities (+ the tail mass) per response token, and train without the live teacher. top_k >= the
    vocabulary size is exact; smaller k gives the sparse divergences of kd_core/losses/sparse.py."""

    enabled: bool = False
    top_k: int = Field(64, ge=1, description="teacher tokens kept per position (capped at the vocabulary size)")
    batch_size: int = Field(32, ge=1, description="teacher batch size while building the cache")
    logprobs: Literal["float16", "float32"] = Field("float16", description="stored log-probs: float16 (~260 bytes "
                                                    "per token at k = 64) or float32 (~516, exact at k = V)")


def _weights_trained(data: Any) -> Any:
    """A student's `finetune: full | lora`, the teacher's spelling of which weights train: `lora` is `lora: {}` (its
    `lora` settings if given), `full` is no `lora`; a mapping is the post-distillation fine-tuning."""
    if not isinstance(data, dict) or not isinstance(data.get("finetune"), str):
        return data
    mode, rest = data["finetune"], {k: v for k, v in data.items() if k != "finetune"}
    if mode == "lora":
        return rest | {"lora": rest.get("lora") or {}}
    if mode == "full" and rest.get("lora") is None:
        return rest
    if mode == "full":
        raise ValueError("finetune: 'full' trains every weight, but lora settings are given: drop one of them")
    raise ValueError(f"finetune: {mode!r}: allowed: full, lora (which weights train, as the teacher's), or a "
                     f"mapping (enabled, epochs, lr_scale: the post-distillation fine-tuning)")


class StudentConfig(StrictModel):
    name: str = Field("", description="filled from the key under `students`")
    teacher: str = Field("teacher", description="who teaches it: the teacher, or another student (a teacher assistant)")
    train_data: str = Field("train", description="'train' (the split) or the name of a transfer set")
    method: str = "kd"
    divergence: str = Field("fkl", description="default: the method's own (fkl for kd, jsd for gkd, ...)")
    divergence_args: dict[str, float] = Field(default_factory=dict)
    method_args: dict[str, Any] = Field(default_factory=dict)
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the CE loss: alpha*CE + (1-alpha)*KD")
    temperature: float = Field(1.0, gt=0)
    fused_lm_head: bool = Field(True, description="kd, gkd, imitkd, distillm: the loss from the models' last hidden "
                                "states and LM heads, the batch's logits never formed (same values, less memory)")
    model: ModelSource
    training: TrainingConfig = TrainingConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()
    teachers: dict[str, Annotated[StrictFloat, Field(gt=0)]] | None = Field(
        None, description="several teachers: model -> weight (> 0, normalised to sum 1); names `teacher` (the "
                          "nearest, which dvc.yaml's stages depend on and which samples for on-policy methods) and "
                          "models before it in its chain (kd_core/teachers/ensemble.py)")
    teacher_combine: Literal["sum", "mixture"] = Field(
        "sum", description="with `teachers`: sum = Σ_k w_k D(p_k || q), mixture = D(Σ_k w_k p_k || q)")
    route: RouteConfig | None = Field(None, description="per-row teacher by a data field (kd_core/config/routing.py)")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters only, with these settings (`{}`: the "
                                    "defaults); the saved model is merged, the adapter kept in its `adapter/` folder; "
                                    "null: every weight trains")

    def teacher_weights(self) -> dict[str, float]:
        """Every teacher of the student with its normalised weight (one teacher: {teacher: 1.0})."""
        if not self.teachers:
            return {self.teacher: 1.0}
        total = sum(self.teachers.values())
        return {name: w / total for name, w in self.teachers.items()}

    @model_validator(mode="before")
    @classmethod
    def _method_default_divergence(cls, data: Any) -> Any:
        return methods.with_default_divergence(with_route_teachers(_weights_trained(data)))

    @model_validator(mode="after")
    def _registered_names(self) -> StudentConfig:
        methods.check_student(self)
        if self.lora is not None and (problem := _lora_problem(self.lora, self.model, self.training)):
            raise ValueError(problem)
        return self


# ----------------------------------------------------------------------------------------------- rest
class GenerationConfig(StrictModel):
    """Decoding of the evaluation (the papers' protocol: sampling at T = 1, top-p 1, and greedy). With
    `reference_percentile` = P, each eval set gets min(max_new_tokens, ceil(P-th percentile of its references'
    token counts) + 1) new tokens (`kd_core.evaluation.run.generation_budget`): long enough for the references,
    no longer than they need."""

    max_new_tokens: int = Field(32, ge=1, description="new tokens per prompt (with reference_percentile: the cap)")
    reference_percentile: float | None = Field(
        None, gt=0, le=100, description="per eval set, new tokens = this percentile of the references' token "
                                        "counts + 1 (EOS), at most max_new_tokens; null: max_new_tokens everywhere")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, ge=1)


class EvaluationConfig(StrictModel):
    eval_sets: list[str] = Field(default_factory=lambda: ["test"],
                                 description="'test' (the split) and names from data.eval_sets")
    limit: int | None = Field(None, ge=1, description="first N prompts of each set (null: all); >= 500 gives the "
                                                      "paired tests against SFT some power (compare report: MDE)")
    sample_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    greedy: bool = True
    generation: GenerationConfig = GenerationConfig()
    unc_buckets: int = Field(3, ge=1, description="teacher-uncertainty buckets for the agreement/KL analysis")
    exaccerr_lengths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [8, 16],
                                                                description="ExAccErr(l) for these l")
    exaccerr_prompts: int = Field(32, ge=0, description="prompts of the test split used for ExAccErr (0: off)")
    exaccerr_samples: int = Field(2, ge=1, description="prefixes sampled per prompt and model")
    answers: dict[str, metrics.AnswerRule] = Field(default_factory=dict, description="eval set -> answer rule: "
                                                   "answer match and pass@k (kd_core/evaluation/answers.py)")
    pass_at_k: list[Annotated[int, Field(ge=1)]] | None = Field(None, description="k of pass@k (null: 1, #seeds)")

    @property
    def pass_ks(self) -> list[int]:
        """The k of the pass@k metrics: `pass_at_k`, or 1 and the number of sample seeds; none without seeds."""
        ks = self.pass_at_k if self.pass_at_k is not None else (1, len(self.sample_seeds))
        return sorted(set(ks)) if self.sample_seeds else []

    @model_validator(mode="after")
    def _some_generation(self) -> EvaluationConfig:
        """Eval sets are there to be generated on: greedy, sampled with each seed, or both."""
        if self.eval_sets and not self.sample_seeds and not self.greedy:
            raise ValueError("sample_seeds: empty and greedy is false: the eval sets would get no generation metric "
                             "(give seeds, e.g. [0], or set greedy: true)")
        return self


class ChampionRule(StrictModel):
    metric: str = "test/rougeL_sampled_mean"
    mode: Literal["max", "min"] = "max"
    min_delta: float = Field(0.0, ge=0, description="move the alias only when better by more than this")
    significance: float | None = Field(
        None, gt=0, lt=1, description="also require a paired bootstrap p-value below this (per-prompt test ROUGE-L)")


class TrackingConfig(StrictModel):
    tracking_uri: str | None = Field(None, description="default: env MLFLOW_TRACKING_URI, else sqlite in run_dir's project")

    @field_validator("tracking_uri")
    @classmethod
    def _a_store_mlflow_has(cls, v: str | None) -> str | None:
        if v is not None and (problem := unknown_scheme(v)):
            raise ValueError(problem)
        return v

    experiment: str = "kd-pipeline"
    registered_model: str = "kd-student"
    register_teacher_as: str = "kd-teacher"
    champion: ChampionRule = ChampionRule()


class OrchestrationConfig(StrictModel):
    max_parallel_students: int = Field(1, ge=1, description="stages run side by side (> 1: each in its own process)")
    retries: int = Field(1, ge=0, description="Prefect retries for transient failures")


class TokenizerConfig(StrictModel):
    """For models built from a config: a byte-level BPE trained on the train split."""

    vocab_size: int = Field(2048, ge=64)
    max_length: int = Field(128, ge=8, description="tokens; longer samples are truncated or dropped")
    overlong: Literal["truncate", "drop"] = "truncate"


class PipelineConfig(StrictModel):
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
    execution: ExecutionConfig = ExecutionConfig()

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
        """Rules over several sections, first failure reported: model names and references, chains (no
        cycle), layer indices of students cut from their teacher, then evaluation (eval sets, champion)."""
        check_routes(self)
        graph.check_references(self)
        graph.chain_order(self)
        graph.check_teachers(self)
        graph.check_layer_indices(self)
        check_shared_vocabulary(self)  # token-level methods: one tokenizer for teacher and student
        metrics.check_evaluation(self)
        check_execution(self)  # stage@key keys exist; a training stage runs under a launcher or on Ray, not both
        return self

    # ---- helpers
    def student(self, name: str) -> StudentConfig:
        if name not in self.students:
            raise KeyError(f"no student named {name!r} (students: {', '.join(self.students)})")
        return self.students[name]

    def is_served(self, name: str) -> bool:
        """Whether model `name` is a teacher served by another process (`teacher.model.endpoint`): only its top-k
        log-probs are here, not its weights. The one place that answers it (validators, teachers, stages)."""
        return name == self.teacher.name and self.teacher.model.endpoint is not None

    def dependencies(self, student: str) -> list[str]:
        """The models a student needs finished first: its teacher and the source of its transfer set."""
        return graph.dependencies(self, student)

    def chain_order(self) -> list[str]:
        """Student names ordered so that every model comes after the models it depends on."""
        return graph.chain_order(self)

    def fingerprint(self) -> str:
        """Short hash of the whole config but `execution` (where stages run changes nothing they produce): tags
        registered models with the params that produced them."""
        params = self.model_dump(mode="json", exclude={"execution"})
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
