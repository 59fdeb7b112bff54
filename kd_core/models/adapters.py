"""LoRA adapters on a causal LM (peft), for the teacher (`teacher.finetune: lora`) and the students
(`students.<name>.lora`): wrap a model, read the adapted LM head for the fused losses, save the merged model with
its adapter beside it, and load that folder back for more training.

A targeted layer y = W x (+ b) becomes y = W x + s · B A x (+ b), s = alpha / r, A [r, in] and B [out, r] the only
trained weights (peft: B starts at 0, so training starts from the model itself). The saved folder holds the merged
model W' = W + s · B A (a plain `AutoModelForCausalLM` checkpoint) and, in `adapter/`, the adapter (peft's
`save_pretrained`: A, B and their config) over the model it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd_core.errors import ModelError

ADAPTER_DIR = "adapter"  # the adapter's folder inside a saved model's folder


def is_peft(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped by peft (a `PeftModel`)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def _adaptable_layers(model: torch.nn.Module) -> dict[str, str]:
    """{module name: type name} of the layers LoRA can adapt (linear, Conv1D, embedding)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, kinds)}


def check_targets(model: torch.nn.Module, target_modules: list[str] | None, key: str) -> None:
    """ModelError naming `key` when a target (a layer name or a dotted suffix of one, peft's rule) matches no layer
    LoRA can adapt in `model`."""
    if target_modules is None:
        return
    layers = _adaptable_layers(model)
    unknown = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in layers)]
    if unknown:
        names = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise ModelError(f"{key}.target_modules: {', '.join(unknown)}: no such layer in {type(model).__name__} "
                         f"(allowed: {', '.join(names)})")


def _untie_head(model: torch.nn.Module) -> None:
    """Give a LoRA-adapted LM head its own copy of a weight it shares with the input embeddings: merging the adapter
    into a shared weight would change the embeddings too (the merged model would differ from the trained one)."""
    from peft.tuners.lora import LoraLayer

    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, LoraLayer) or embeddings is None:
        return
    base = head.get_base_layer()
    if base.weight is getattr(embeddings, "weight", None):
        base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        text_config = model.config.get_text_config()
        for config in {id(c): c for c in (model.config, text_config)}.values():
            config.tie_word_embeddings = False


def with_lora(model: torch.nn.Module, lora_cfg, key: str) -> torch.nn.Module:
    """`model` wrapped with LoRA adapters (`lora_cfg`: a `kd_core.config.LoraConfig`; `key` names it in errors):
    only the adapters train. A targeted LM head tied to the input embeddings is untied first (`_untie_head`)."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, lora_cfg.target_modules, key)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. no default targets for this architecture
        raise ModelError(f"{key}.target_modules: {str(err).splitlines()[0]}") from None
    _untie_head(peft_model)
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> int:
    """How many parameters of `model` have requires_grad (with LoRA: the adapters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapted_head(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight and bias of a LoRA-adapted linear LM head as one projection, W + s · B A (with gradient to A and
    B), so that a fused loss sees the adapted head; None when `head` is not one, or when it is not a projection by
    one weight (adapter dropout while training, DoRA, a LoRA bias, adapters disabled or already merged: use the
    logits)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(head, LoraLayer) or not isinstance(head.get_base_layer(), torch.nn.Linear):
        return None
    if head.disable_adapters or head.merged:
        return None
    base = head.get_base_layer()
    weight = base.weight
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        dropout = head.lora_dropout[name]
        if head.use_dora.get(name) or head.lora_bias.get(name):
            return None
        if head.training and not isinstance(dropout, torch.nn.Identity) and dropout.p > 0:
            return None
        weight = weight + head.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def save_merged(model: torch.nn.Module, out_dir: Path) -> None:
    """Write a peft `model` to `out_dir`: its adapter to `out_dir/adapter/`, then the merged model (the adapters
    folded into the weights, a plain causal LM) to `out_dir`. The model is merged in place (after training)."""
    out_dir = Path(out_dir)
    # the adapters alone (peft would add a targeted LM head's or embedding's whole base weight: not an adapter's,
    # and loaded back over the merged model it would undo the merge before `load_for_training` does)
    model.save_pretrained(str(out_dir / ADAPTER_DIR), save_embedding_layers=False)
    model.merge_and_unload().save_pretrained(str(out_dir))


def load_for_training(model_dir: Path, key: str) -> torch.nn.Module:
    """The folder written by `save_merged` as the peft model it was saved from, adapters trainable: the merged model
    with the adapter of `model_dir/adapter/` loaded and unmerged (W = W' − s · B A), so that training goes on with
    the same adapter and the folder written next is again the model it was trained from plus that adapter."""
    from peft import PeftModel

    from kd_core.models.build import load_checkpoint

    adapter = Path(model_dir) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{model_dir}: no LoRA adapter in {ADAPTER_DIR}/ ({key} is set: train it again with it)")
    merged = load_checkpoint(model_dir)
    peft_model = PeftModel.from_pretrained(merged, str(adapter), is_trainable=True)
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                for name in module.active_adapters:
                    if name in module.lora_A:
                        base.weight -= module.get_delta_weight(name).to(base.weight.dtype)
    return peft_model
