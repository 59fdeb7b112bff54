"""Small utilities over a causal LM (a `transformers` model, possibly wrapped by DDP in `.module`): eval
mode, device, output vocabulary, position limit, forward with explicit position ids, and the
teacher-forced log-probability of the target tokens. Position t's logits predict token t + 1."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from kd_core.data.tokenize import IGNORE_INDEX


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP-style wrapper (`.module`), else the model itself."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Put the models (None skipped) in eval mode; restore each one's previous mode afterwards, even on error."""
    modes = [(m, m.training) for m in models if m is not None]
    try:
        for m, _ in modes:
            m.eval()
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def output_vocab_size(model: torch.nn.Module) -> int | None:
    """How many logits the model emits (the logits' last dimension).

    The rows of the output layer (`get_output_embeddings().weight`) come first: they are what the logits
    have, also when `config.vocab_size` disagrees (embeddings resized or padded to a multiple). Only a
    model without a readable output layer falls back to `config.vocab_size`; None when neither is known.
    """
    inner = _unwrapped(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(inner, "config", None), "vocab_size", None)
    return int(size) if size else None


def shared_vocab_size(*models: torch.nn.Module | None) -> int | None:
    """min over the models' `output_vocab_size` (None skipped; the size `shared_vocab` slices logits to);
    None when none is known."""
    sizes = [output_vocab_size(m) for m in models if m is not None]
    sizes = [s for s in sizes if s]
    return min(sizes) if sizes else None


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's position limit: `config.max_position_embeddings` (the `transformers` name; GPT-2's config
    maps it to `n_positions`), else `config.n_positions`; None when the model has none."""
    cfg = getattr(_unwrapped(model), "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def length_limit(*models: torch.nn.Module | None) -> int | None:
    """The longest sequence every given model accepts: min of `max_positions` (None when no model has one)."""
    limits = [max_positions(m) for m in models if m is not None]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B,T] 0/1 mask -> [B,T] position ids cumsum(mask) − 1, clipped at 0: the first real token of a
    left-padded row gets position 0 (harmless for right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _accepts_kwarg(model: torch.nn.Module, name: str, *, allow_var_kw: bool) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return allow_var_kw
    if name in params:
        return True
    return allow_var_kw and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def causal_lm_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     logits_to_keep: int | None = None) -> torch.Tensor:
    """Forward a causal LM with explicit `position_ids` (so a left-padded row equals its unpadded forward).

    input_ids, attention_mask: [B,T] on the model's device (1 = real token; left or right padding).
    logits_to_keep: only the last k positions are returned (passed to the model when its `forward` takes
    `logits_to_keep`, else sliced afterwards). Returns [B,T,V] (or [B,k,V]) float32 logits; call it under
    `torch.no_grad()` / `inference_mode`.
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts_kwarg(model, "position_ids", allow_var_kw=True):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    if _accepts_kwarg(model, "use_cache", allow_var_kw=True):
        kwargs["use_cache"] = False
    if logits_to_keep is not None and _accepts_kwarg(model, "logits_to_keep", allow_var_kw=False):
        kwargs["logits_to_keep"] = int(logits_to_keep)
    logits = model(**kwargs).logits
    if logits_to_keep is not None and logits.shape[1] != logits_to_keep:
        logits = logits[:, -int(logits_to_keep):]
    return logits.float()


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32: logits [N,V] or [B,T,V], targets [N] or [B,T] -> [N] or [B,T].

    Computed as −cross_entropy (the training CE's numerics, `methods.base.token_ce`). Negative targets
    (IGNORE_INDEX) read id 0: mask those positions yourself (`response_logprobs` does).
    """
    return -F.cross_entropy(logits.float().movedim(-1, 1), targets.clamp(min=0), reduction="none")


def response_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log q(y_{t+1} | y_≤t) of each response token of a right-padded batch.

    batch: input_ids, attention_mask, labels [B,T] (IGNORE_INDEX off the response), on the model's device.
    Returns (logprobs [B,T-1] float32, 0 off the mask; mask [B,T-1] bool = labels[:, 1:] != IGNORE_INDEX).
    E.g. the mean response CE is −logprobs.sum() / mask.sum(). Runs under the caller's grad mode.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets.ne(IGNORE_INDEX)
    return target_logprobs(logits, targets).masked_fill(~mask, 0.0), mask


class HeadInputs(NamedTuple):
    """What a causal LM's output layer reads, and the layer: logits = hidden @ weight^T + bias."""

    hidden: torch.Tensor  # [B, T, H], the last hidden states (after the final norm)
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V] or None


# config keys of models whose logits are not the plain projection (Gemma's soft-capping, Cohere's scale, ...)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
_PLAIN_HEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> checked on its first call


def lm_head_inputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> HeadInputs | None:
    """The model's last hidden states and output layer, from one forward that projects only the last position
    (`logits_to_keep=1`): the batch's logits are never formed. Runs under the caller's grad mode, through the
    wrapper (DDP, DeepSpeed, PEFT) like a plain forward, with the inputs `model_logits` passes.

    A LoRA-adapted head (peft) is the projection by its adapted weight W + s · B A
    (`kd_core.models.adapters.adapted_head`), with gradient to the adapters: a fused loss never ignores them.

    None when the logits are not that projection, and the caller uses the model's logits instead: no
    `nn.Linear` output layer holding its weight (a head sharded by ZeRO-3, a LoRA head with adapter dropout), a
    config that scales or soft-caps the logits, a forward without `logits_to_keep`, or (checked on the first call
    per model) a kept last-position logit row that differs from the projection of the last hidden state.
    """
    inner = _unwrapped(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and not isinstance(head, torch.nn.Linear):  # (peft only when a head is not a plain layer)
        from kd_core.models.adapters import adapted_head

        projection = adapted_head(head)
        if projection is None:
            return None
        weight, bias = projection
    else:
        weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        return None
    cfg = getattr(inner, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(cfg, key, None) not in (None, 1.0) for key in _LOGIT_TRANSFORMS):
        return None
    core = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner  # PEFT
    if not _accepts_kwarg(core, "logits_to_keep", allow_var_kw=False):
        return None
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    plain = _PLAIN_HEAD.get(inner)
    if plain is None:
        with torch.no_grad():
            kept = out.logits[:, -1].float()
            projected = F.linear(hidden[:, -1], weight, bias).float()
            tol = 1e-4 if out.logits.dtype == hidden.dtype == torch.float32 else 2e-2
            plain = bool(torch.allclose(kept, projected, rtol=tol, atol=tol * max(1.0, float(kept.abs().max()))))
        _PLAIN_HEAD[inner] = plain
    return HeadInputs(hidden, weight, bias) if plain else None
