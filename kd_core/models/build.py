"""Models: build from a config, load a checkpoint (or a GGUF file), or cut a student from the teacher.

Everything is a `transformers` causal LM saved with `save_pretrained` (safetensors) and loaded with
`AutoModelForCausalLM.from_pretrained`; `trust_remote_code` stays off unless params say otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase)

from kd_core.config import ArchConfig, ModelSource
from kd_core.errors import ModelError


def build_from_config(arch: ArchConfig, tokenizer: PreTrainedTokenizerBase, n_positions: int, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch.arch == "gpt2":
        cfg = GPT2Config(n_layer=arch.n_layer, n_embd=arch.hidden, n_head=arch.n_head, n_positions=n_positions,
                         n_inner=arch.intermediate, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=arch.n_layer, hidden_size=arch.hidden, num_attention_heads=arch.n_head,
                      num_key_value_heads=arch.n_kv_head or arch.n_head,
                      intermediate_size=arch.intermediate or 4 * arch.hidden,
                      max_position_embeddings=n_positions, tie_word_embeddings=True, **common)
    return LlamaForCausalLM(cfg)


def load_checkpoint(source: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """A local folder or hub name (weights as safetensors only), or a GGUF file dequantised to fp32."""
    source = str(source)
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().exists():
        raise ModelError(f"checkpoint {source!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"checkpoint {source!r}: cannot read a model config ({err})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, trust_remote_code=trust_remote_code, dtype=torch.float32,
            use_safetensors=None if gguf_file else True)
    except ValueError as err:
        raise ModelError(f"checkpoint {source!r} ({type(config).__name__}) is not a causal LM: {err}") from None
    except OSError as err:
        raise ModelError(f"checkpoint {source!r}: cannot load safetensors weights ({err})") from None
    if gguf_file:  # dequantised fp32 weights: drop the quantizer (transformers' own removal: config, flags), else
        # save_pretrained refuses (stack.md) and the Trainer refuses to train a model still marked `is_quantized`
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def student_from_teacher_layers(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A scaled-down teacher: a deep copy keeping only the given decoder layers (in the given order)."""
    student = copy.deepcopy(teacher)
    base = getattr(student, student.base_model_prefix)
    blocks_attr = "h" if hasattr(base, "h") else "layers"
    blocks = getattr(base, blocks_attr)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ModelError(f"from_teacher_layers: indices {bad} out of range (teacher has {len(blocks)} layers)")
    setattr(base, blocks_attr, torch.nn.ModuleList([blocks[i] for i in layers]))
    for new_idx, block in enumerate(getattr(base, blocks_attr)):  # cache indexing uses each layer's own index
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    key = "n_layer" if hasattr(student.config, "n_layer") else "num_hidden_layers"
    setattr(student.config, key, len(layers))
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    return student


def make_model(source: ModelSource, tokenizer: PreTrainedTokenizerBase, n_positions: int, seed: int,
               teacher: PreTrainedModel | None = None) -> PreTrainedModel:
    if source.config is not None:
        return build_from_config(source.config, tokenizer, n_positions, seed)
    if source.checkpoint is not None:
        return load_checkpoint(source.checkpoint, source.gguf_file, source.trust_remote_code)
    if teacher is None:
        raise ModelError("from_teacher_layers needs the teacher")
    return student_from_teacher_layers(teacher, source.from_teacher_layers or [])


def count_parameters(model: torch.nn.Module) -> int:
    """The model's parameters (tied ones once); of a LoRA model (peft) those of the merged model, adapters aside."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)


def set_generation_defaults(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> None:
    """The generation defaults saved with the model (`generation_config.json`): greedy, as the evaluation's
    greedy answers, up to the evaluation's `max_new_tokens`, stopping at the run tokenizer's EOS."""
    gen = model.generation_config
    gen.do_sample, gen.max_new_tokens = False, max_new_tokens
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    for key in ("temperature", "top_p", "top_k"):  # sampling settings of a greedy config only draw warnings
        setattr(gen, key, None)
