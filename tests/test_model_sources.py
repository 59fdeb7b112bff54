"""Teacher and student sources: LoRA teacher SFT (merged on save), a checkpoint teacher used as is (its
tokenizer becomes the run's), and a student cut from the teacher's layers."""

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
