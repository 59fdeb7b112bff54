"""The distillation methods as params know them: each method's name, what it needs from the pipeline and the
model of its `method_args`, in one table (`METHOD_SPECS`) that imports no torch, so that validating params
(`kd validate`, every stage's start) stays light; and the checks of a student's method, divergence and their
args against it and against the divergences' table (`kd_core.config.divergence_params`).

A method's training code is the class registered under the same name in :mod:`kd_core.methods` (imported when a
stage trains): `register_method` gives it its spec's flags and `Args`, and a test keeps the two name lists
equal. A new method is its module there plus its spec here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator

from kd_core.config.base import StudentConfigLike
from kd_core.config.divergence_params import DIVERGENCE_PARAMS



class MethodArgs(BaseModel):
    """`method_args` of a method (none unless its spec names a subclass); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # as StrictModel: no conversion


# ----------------------------------------------------------------------------------------------- args
class KDArgs(MethodArgs):
    temperature_scale: Literal["none", "tau_squared"] = Field(
        "none", description="factor on the divergence: none = 1, tau_squared = τ² (Hinton; OKD paper eq. 2)")


class ATKDArgs(MethodArgs):
    hard_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of response tokens treated as hard (top UNC)")
    tkd_weight: float = Field(1.0, ge=0.0, description="weight of the target-oriented part (hard tokens only)")
    dkd_weight: float = Field(1.0, ge=0.0, description="weight of the diversity-oriented part (all tokens)")


class GenerationArgs(MethodArgs):
    """Args of a method that samples responses during training (on-policy and mixed methods)."""

    gen_temperature: float = Field(1.0, gt=0, description="sampling temperature of the generations")
    max_new_tokens: int = Field(64, ge=1, description="generated tokens per response, EOS included")


class GKDArgs(GenerationArgs):
    lmbda: float = Field(0.5, ge=0, le=1, description="probability that a micro-batch uses student samples")
    seq_kd: bool = Field(False, description="replace the references by teacher samples (before the lmbda draw)")


class ImitKDArgs(GenerationArgs):
    beta_start: float = Field(1.0, ge=0, le=1, description="probability of keeping a reference at the start")
    beta_end: float = Field(0.0, ge=0, le=1, description="probability of keeping a reference at the end")


class MiniLLMArgs(GenerationArgs):
    teacher_mix: float = Field(0.2, ge=0, lt=1, description="α of the sampling mixture α·p + (1−α)·q")
    clip_range: float = Field(0.2, gt=0, lt=1, description="PPO clip of the importance ratio")
    gamma: float = Field(1.0, ge=0, le=1, description="discount of the long-term reward")
    length_norm: bool = Field(True, description="divide the long-term reward by the number of future tokens")
    whiten: bool = Field(True, description="whiten the advantages over the micro-batch's valid tokens (not the "
                                           "accumulated batch's: see `advantages`)")
    single_step: bool = Field(True, description="exact single-step reverse-KL term (else plain policy gradient)")
    lm_coef: float = Field(0.0, ge=0, description="weight of an added CE on the references (L_PT stand-in)")


class DistiLLMArgs(GenerationArgs):
    init_threshold: float = Field(0.0, ge=0, le=1, description="initial probability φ of student generations")
    threshold_step: float = Field(0.1, gt=0, le=1, description="increase of φ when the proxy got worse")
    loss_eps: float = Field(0.1, ge=0, description="proxy increase (nats) that counts as getting worse")
    eval_interval: int = Field(100, ge=1, description="training micro-batches per validation-proxy window")
    capacity: int = Field(1000, ge=1, description="replay buffer size (sequences)")
    replay_ratio: Literal["decreasing", "constant", "increasing"] = "decreasing"


class SampledRKLArgs(GenerationArgs):
    estimator: Literal["k1", "k3"] = Field(
        "k3", description="per-token estimate of KL(q || p) reported as the loss value: k1 = -r, k3 = (e^r - 1) - r "
                          "(r = log p(y) - log q(y)); the gradient is the same for both")
    gen_temperature: float = Field(1.0, gt=0, description="sampling temperature of the student (unbiased for "
                                                          "KL(q_τ || p_τ) when equal to `temperature`)")


class EntropyAwareOPDArgs(GenerationArgs):
    entropy_threshold: float = Field(
        0.6931471805599453, ge=0, description="h (nats): the forward KL is added where the teacher's entropy exceeds "
                                             "it (default ln 2)")


class SpeculativeKDArgs(GenerationArgs):
    top_k: int = Field(25, ge=1, description="a student token is kept when among the teacher's top_k, else replaced "
                                             "by a teacher sample")
    gen_temperature: float = Field(1.0, gt=0, description="sampling temperature of student proposals and teacher "
                                                          "replacements")


_LORA_KEYS = {"lora_r", "lora_alpha", "target_modules", "fused_qkv"}
_PROMPT_KEYS = {"num_virtual_tokens"}
_PREFIX_KEYS = {"prefix_projection"}
_PTUNING_KEYS = {"encoder_hidden_size", "encoder_type"}


class OKDArgs(MethodArgs):
    module: Literal["lora", "prefix", "ptuning"] = "lora"
    teacher_kl_weight: float = Field(0.5, ge=0.0, le=1.0, description="α in eq. 16 (KL vs teacher MLE)")
    teacher_loss_weight: float = Field(1.0, ge=0.0, description="weight of L_t in the summed loss")
    teacher_direction: Literal["swapped", "same"] = "swapped"
    temperature_scale: Literal["none", "tau_squared"] = Field(
        "none", description="factor on both KL terms: none = 1, tau_squared = τ² (the paper's eq. 2)")
    # LoRA
    lora_r: int = Field(32, ge=1)
    lora_alpha: float = Field(32.0, gt=0, description="scaling s = lora_alpha / lora_r (paper: s >= 1)")
    target_modules: list[str] | None = Field(None, description="default: q and v projections (GPT-2: c_attn)")
    fused_qkv: Literal["qv", "qkv"] = Field("qv", description="GPT-2 fused c_attn: adapt only the q and v parts")
    # prefix tuning / P-tuning
    num_virtual_tokens: int = Field(10, ge=1)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, ge=1, description="P-tuning encoder width; default model width")
    encoder_type: Literal["MLP", "LSTM"] = "MLP"

    @field_validator(*sorted(_LORA_KEYS | _PROMPT_KEYS | _PREFIX_KEYS | _PTUNING_KEYS))
    @classmethod
    def _applies_to_module(cls, v, info: ValidationInfo):
        module = info.data.get("module", "lora")
        allowed = {"lora": _LORA_KEYS, "prefix": _PROMPT_KEYS | _PREFIX_KEYS,
                   "ptuning": _PROMPT_KEYS | _PTUNING_KEYS}[module]
        if info.field_name not in allowed:
            raise ValueError(f"does not apply to module {module!r}")
        return v


class IntermediateArgs(MethodArgs):
    kd_weight: float | None = Field(None, ge=0, description="β for the logit KD term; default 1 − alpha")
    hidden_weight: float = Field(1.0, ge=0, description="γ_h for the hidden-state term")
    attention_weight: float = Field(0.0, ge=0, description="γ_a for the attention-map term (needs eager attention)")
    hidden_loss: Literal["mse", "cosine"] = "mse"
    # a YAML pair is a list: the pair itself converted to a tuple, its two integers strict
    layer_map: Literal["uniform", "last_k"] | list[Annotated[tuple[int, int], Strict(False)]] = "uniform"
    last_k: int = Field(1, ge=1, description="pairs for layer_map: last_k")
    include_embeddings: bool = Field(False, description="also match the embedding outputs (layer 0) for uniform/last_k")
    pair_weights: list[float] | None = Field(None, description="w_k per layer pair (same order as the pairs)")
    projection: Literal["auto", "always", "never"] = "auto"
    projection_init: Literal["xavier", "identity"] = "xavier"
    positions: Literal["all", "response"] = "all"
    attention_heads: Literal["auto", "mean"] = "auto"
    attention_divergence: str = Field(
        "rkl", description="divergence between attention rows, teacher map = p, student map = q: rkl = "
                           "KL(A_s || A_t) (the source's direction, default), fkl = KL(A_t || A_s) (MiniLM)")

    @field_validator("attention_divergence")
    @classmethod
    def _known_divergence(cls, v: str) -> str:
        if v not in DIVERGENCE_PARAMS:
            raise ValueError(f"unknown divergence {v!r} (allowed: {', '.join(sorted(DIVERGENCE_PARAMS))})")
        return v

    @field_validator("pair_weights")
    @classmethod
    def _non_negative(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(w < 0 for w in v):
            raise ValueError("pair weights must be >= 0")
        return v


class ProgressiveArgs(IntermediateArgs):
    kd_schedule: Literal["always", "last_phase"] = Field("always", description="when the logit KD term is on")
    accumulate: bool = Field(True, description="keep earlier pairs on when deeper ones are added")
    train_layers: Literal["active", "all"] = Field(
        "active", description="active: freeze the student layers deeper than the current phase's pairs (the "
                              "source's layer-by-layer variant); all: the whole student trains from step 0")


class ULDArgs(MethodArgs):
    uld_weight: float = Field(1.0, ge=0, description="λ: weight of the ULD term (Wasserstein-1 between the sorted "
                                                     "teacher and student probabilities)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the student's CE on the references (the paper: 1)")
    skip_eos: bool = Field(False, description="leave each side's final EOS out of the alignment (ULD code: "
                                              "skip_student_eos / skip_teacher_eos)")


class GOLDArgs(MethodArgs):
    distill_weight: float = Field(1.0, ge=0, description="weight of the aligned-span term (GOLD: "
                                                         "uld_distillation_weight)")
    ce_weight: float = Field(0.0, ge=0, description="weight of the student's CE on the references (GOLD: "
                                                    "uld_crossentropy_weight)")
    matched_weight: float | None = Field(None, ge=0, description="weight of the divergence over the tokens both "
                                         "vocabularies share; null (with unmatched_weight null): GOLD's adaptive "
                                         "|shared| / |teacher vocabulary|")
    unmatched_weight: float | None = Field(None, ge=0, validate_default=True, description="weight of the sorted "
                                           "L1 (ULD) over the other tokens; null: 1 − the adaptive matched weight")
    skip_eos: bool = Field(True, description="leave each side's final EOS out (GOLD's uld_skip_*_eos default)")
    hybrid: bool = Field(True, description="divergence on the shared tokens + sorted L1 on the rest (GOLD's "
                                           "uld_use_hybrid_loss); false: sorted L1 on whole span vectors")

    @field_validator("unmatched_weight")
    @classmethod
    def _both_or_neither(cls, v: float | None, info: ValidationInfo) -> float | None:
        if (v is None) != (info.data.get("matched_weight") is None):
            raise ValueError("give matched_weight and unmatched_weight both (fixed weights) or neither (adaptive)")
        return v


# ----------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class MethodSpec:
    """What a method needs: the teacher at all (`needs_teacher`), model-generated data (`needs_transfer_set`:
    `train_data` must name a transfer set), the divergence used when params name none and (if not None) the only
    ones it accepts, whether it reads the teacher only through `ctx.teacher_signal` (so it can train on the
    teacher-logit cache, `teacher_cache` in params), whether it reads the teacher only through teacher signals on the
    reference batch or rebuilt ones (`multi_teacher`: `teachers`, several, allowed), and its `method_args` model."""

    name: str
    needs_teacher: bool = True
    needs_transfer_set: bool = False
    default_divergence: tuple[str, dict] = ("fkl", {})
    allowed_divergences: frozenset[str] | None = None
    reads_teacher_cache: bool = False
    multi_teacher: bool = False
    cross_tokenizer: bool = False  # distils across tokenizers: reads the teacher's own tokenization of the text
    uses_alpha: bool = True  # False: its CE weight is a method_args key, `alpha` must stay 0
    Args: type[BaseModel] = MethodArgs

    def validate_args(self, method_args: dict[str, Any]) -> None:
        try:
            self.Args.model_validate(method_args)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            allowed = ", ".join(self.Args.model_fields) or "none"
            raise ValueError(f"method_args.{key}: {msg} (method {self.name!r} takes: {allowed})") from None


METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("sft", needs_teacher=False),
    MethodSpec("seqkd", needs_teacher=False, needs_transfer_set=True),  # the teacher's knowledge is in the data
    MethodSpec("kd", reads_teacher_cache=True, multi_teacher=True, Args=KDArgs),
    MethodSpec("atkd", reads_teacher_cache=True, multi_teacher=True, Args=ATKDArgs),
    MethodSpec("gkd", default_divergence=("jsd", {"beta": 0.5}), multi_teacher=True, Args=GKDArgs),
    MethodSpec("imitkd", multi_teacher=True, Args=ImitKDArgs),
    # minillm's objective is the sequence-level reverse KL
    MethodSpec("minillm", default_divergence=("rkl", {}), allowed_divergences=frozenset({"rkl"}), Args=MiniLLMArgs),
    MethodSpec("distillm", default_divergence=("skl", {"alpha": 0.1}), multi_teacher=True, Args=DistiLLMArgs),
    # on the student's own samples: the sampled-token reverse KL; the reverse KL plus the forward KL where the
    # teacher's entropy is high (their objectives fix the divergences); speculative KD (any divergence, default fkl)
    MethodSpec("sampled_rkl", default_divergence=("rkl", {}), allowed_divergences=frozenset({"rkl"}),
               Args=SampledRKLArgs),
    MethodSpec("entropy_aware_opd", default_divergence=("rkl", {}), allowed_divergences=frozenset({"rkl"}),
               Args=EntropyAwareOPDArgs),
    MethodSpec("speculative_kd", Args=SpeculativeKDArgs),
    MethodSpec("okd", Args=OKDArgs),
    MethodSpec("intermediate", Args=IntermediateArgs),
    MethodSpec("progressive", Args=ProgressiveArgs),
    # across tokenizers: uld's term is not a registered divergence (`divergence` is not read), gold's shared-vocabulary
    # part is `divergence` (GOLD: the generalized JSD, β = 0.5)
    MethodSpec("uld", cross_tokenizer=True, uses_alpha=False, Args=ULDArgs),
    MethodSpec("gold", default_divergence=("jsd", {"beta": 0.5}), cross_tokenizer=True, uses_alpha=False,
               Args=GOLDArgs),
)}


# ----------------------------------------------------------------------------------------------- checks
def with_default_divergence(data: Any) -> Any:
    """A student's params without a divergence: its method's default (and default args) is what gets recorded."""
    if isinstance(data, dict) and data.get("divergence") is None and data.get("method", "kd") in METHOD_SPECS:
        name, args = METHOD_SPECS[data.get("method", "kd")].default_divergence
        data = {**data, "divergence": name, "divergence_args": {**args, **(data.get("divergence_args") or {})}}
    return data


def check_student(st: StudentConfigLike) -> None:
    """A student's method, divergence and their args are registered names and fit each other; ValueError with a
    message that starts with the key (`divergence_args.beta: ...`)."""
    if st.method not in METHOD_SPECS:
        raise ValueError(f"method: unknown method {st.method!r} (allowed: {', '.join(sorted(METHOD_SPECS))})")
    method = METHOD_SPECS[st.method]
    allowed_div = method.allowed_divergences
    if allowed_div is not None and st.divergence not in allowed_div:
        raise ValueError(f"divergence: {st.divergence!r} does not fit method {st.method!r} "
                         f"(allowed: {', '.join(sorted(allowed_div))})")
    if st.divergence not in DIVERGENCE_PARAMS:
        raise ValueError(f"divergence: unknown divergence {st.divergence!r} "
                         f"(allowed: {', '.join(sorted(DIVERGENCE_PARAMS))})")
    spec = DIVERGENCE_PARAMS[st.divergence]
    for key, value in st.divergence_args.items():
        if key not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise ValueError(f"divergence_args.{key}: not a parameter of {st.divergence!r} (allowed: {allowed})")
        p = spec[key]
        if not p.low <= value <= p.high:
            raise ValueError(f"divergence_args.{key}: {value} is outside [{p.low}, {p.high}]")
    method.validate_args(st.method_args)
    if st.teacher_cache.enabled and not method.reads_teacher_cache:
        readers = ", ".join(sorted(n for n, m in METHOD_SPECS.items() if m.reads_teacher_cache))
        raise ValueError(f"teacher_cache.enabled: method {st.method!r} needs the live teacher (on-policy, full "
                         f"logits or no teacher at all); the cache is read by: {readers}")
    if st.alpha and not method.uses_alpha:
        raise ValueError(f"alpha: method {st.method!r} weighs its cross-entropy with method_args.ce_weight (alpha "
                         f"must stay 0)")
    if st.teachers and not method.multi_teacher:
        allowed = ", ".join(sorted(n for n, m in METHOD_SPECS.items() if m.multi_teacher))
        raise ValueError(f"teachers: method {st.method!r} reads one teacher model (or none); several teachers "
                         f"are for: {allowed}")


def get_spec(name: str) -> MethodSpec:
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (allowed: {', '.join(sorted(METHOD_SPECS))})") from None
