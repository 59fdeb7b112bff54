"""LoRA students (`students.<name>.lora`, kd_core/models/adapters.py): validation, gradients to the adapters only,
the fused LM-head losses through an adapted head, the merged model the pipeline saves and registers, and one run of
the flow with a LoRA student."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from kd_core.config import ArchConfig, LoraConfig, TrainingConfig, parse_config
from kd_core.config.model_source import LORA_TARGETS
from kd_core.errors import ConfigError, ModelError
from kd_core.methods import StepContext, get_method
from kd_core.models.adapters import ADAPTER_DIR, load_for_training, trainable_parameters, with_lora
from kd_core.models.build import build_from_config, count_parameters
from kd_core.models.lm import lm_head_inputs
from kd_core.teachers.source import LiveTeacher
from kd_core.training.trainer import train
from tests.conftest import TINY_MODEL, TINY_TRAINING, copy_prepared, tiny_params
from tests.method_harness import padded_batch, run_method, student_config, tiny_setup

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["c_attn", "lm_head"]}


def _lora_gpt2(vocab: int = 40, seed: int = 0, **lora) -> torch.nn.Module:
    """A float64 GPT-2 (tied head) with LoRA on its attention and LM head, the adapters' B set away from 0 (peft
    starts them at 0, where the adapters change nothing yet)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    peft_model = with_lora(model, LoraConfig(**(LORA | lora)), "students.s.lora").double()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return peft_model


def _untied(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with an LM head of its own (a copy of the tied embeddings), as LoRA on the head needs it for merging:
    merged into a tied weight, the head's adapter would change the input embeddings too."""
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def _tiny_teacher(vocab: int = 40) -> torch.nn.Module:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).double().eval()


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("arch", sorted(LORA_TARGETS))
def test_the_table_of_lora_targets_is_what_transformers_builds(arch):
    """`kd validate` checks targets against LORA_TARGETS: the last names of the linear, Conv1D and embedding
    layers of the model the architecture builds."""
    setup = tiny_setup()
    model = build_from_config(ArchConfig(arch=arch, n_layer=1, hidden=16, n_head=2), setup.tokenizer, 32, 0)
    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    built = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, kinds)}
    assert built == set(LORA_TARGETS[arch])


@pytest.mark.parametrize("student_fields,expected", [
    ({"lora": {"r": 0}}, "students.s.lora.r: Input should be greater than or equal to 1"),
    ({"lora": {"alpha": 0}}, "students.s.lora.alpha: Input should be greater than 0"),
    ({"lora": {"dropout": 1.0}}, "students.s.lora.dropout: Input should be less than 1"),
    ({"lora": {"target_modules": []}}, "students.s.lora.target_modules: List should have at least 1 item"),
    ({"lora": {"target_modules": ["c_attn", "q_proj"]}},
     "students.s.lora.target_modules: q_proj: no such layer in a gpt2 model (allowed: c_attn, c_proj, c_fc, "
     "lm_head, wte, wpe)"),
    ({"lora": {"rank": 8}}, "students.s.lora.rank: unknown key"),
    ({"finetune": "qlora"}, "students.s.finetune: 'qlora': allowed: full, lora (which weights train, as the "
                            "teacher's), or a mapping"),
    ({"finetune": "full", "lora": {"r": 4}}, "students.s.finetune: 'full' trains every weight, but lora settings"),
    ({"lora": {}, "training": dict(TINY_TRAINING, deepspeed="infra/deepspeed/zero3.json")},
     "students.s.lora: LoRA under ZeRO-3 (infra/deepspeed/zero3.json) is not supported"),
])
def test_bad_lora_settings_are_one_line_naming_the_key(student_fields, expected, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)  # (the DeepSpeed config's path is relative to the project)
    params = tiny_params()
    params["students"] = {"s": {"method": "kd", "model": TINY_MODEL, "training": TINY_TRAINING} | student_fields}
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"params.yaml: {expected}"), lines


def test_the_teachers_spelling_finetune_lora_makes_a_lora_student():
    """`finetune: lora` (as the teacher's) is a LoRA student with its `lora` settings or the defaults; `finetune: full`
    is a student whose every weight trains; a mapping stays the post-distillation fine-tuning."""
    params = tiny_params()
    base = {"method": "kd", "model": TINY_MODEL, "training": TINY_TRAINING}
    params["students"] = {"a": base | {"finetune": "lora"}, "b": base | {"finetune": "lora", "lora": {"r": 4}},
                          "c": base | {"finetune": "full"}, "d": base | {"lora": {}, "finetune": {"enabled": True}}}
    students = parse_config(params).students
    assert students["a"].lora == LoraConfig() and students["b"].lora.r == 4 and students["c"].lora is None
    assert students["a"].finetune.enabled is False and students["d"].finetune.enabled and students["d"].lora is not None


def test_a_checkpoint_student_without_the_target_is_one_line_naming_the_key():
    """A checkpoint's layers are known once it is loaded: the stage says which target is missing (peft alone would
    say so with a traceback)."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_layer=1, n_embd=16, n_head=2, n_positions=32))
    with pytest.raises(ModelError, match=r"^students\.s\.lora\.target_modules: q_proj: no such layer in "
                                         r"GPT2LMHeadModel \(allowed: c_attn, c_fc, c_proj, lm_head, wpe, wte\)$"):
        with_lora(model, LoraConfig(target_modules=["q_proj"]), "students.s.lora")


# ----------------------------------------------------------------------------------------------- fused LM-head losses
@pytest.mark.parametrize("method_name,fields", [("kd", {"divergence": "fkl"}), ("kd", {"divergence": "jsd", "alpha": 0.3}),
                                                ("gkd", {"method_args": {"lmbda": 0.0}})])
def test_fused_loss_sees_the_adapted_head(method_name, fields):
    """With LoRA on the (tied) LM head, the fused loss projects through W + s·B A: its value and its gradients
    (every adapter, the head's included) equal those of the loss on the model's own logits."""
    student, teacher = _lora_gpt2(), _tiny_teacher()
    batch = padded_batch(torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(5)))
    head = lm_head_inputs(student, batch["input_ids"], batch["attention_mask"])
    base = student.get_output_embeddings().get_base_layer().weight
    assert head is not None and not torch.allclose(head.weight, base)  # the adapted head, not the base one
    adapters = [p for p in student.parameters() if p.requires_grad]
    results = []
    for fused in (True, False):
        sc = student_config(method_name, fused_lm_head=fused, temperature=1.5, **fields)
        method = get_method(method_name)(sc, sc.method_args)
        out = method.compute_loss(StepContext(student=student, batch=batch, num_items=17, teacher=teacher))
        results.append((out.loss, torch.autograd.grad(out.loss, adapters)))
    (fused_loss, g_fused), (plain_loss, g_plain) = results
    tol = 1e-6 if fields.get("alpha") else 1e-10  # (the CE term is taken in fp32)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=tol, atol=tol)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert all(float(g.abs().sum()) > 0 for g in g_fused)  # the head's adapters get their gradient too


def test_a_head_with_adapter_dropout_falls_back_to_the_logits():
    """Dropout on the adapters' input is not one projection: while training the fused path gives way (None) to the
    logits; in evaluation mode (no dropout) the adapted head is used."""
    student = _lora_gpt2(dropout=0.1)
    batch = padded_batch(torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1)))
    student.train()
    assert lm_head_inputs(student, batch["input_ids"], batch["attention_mask"]) is None
    student.eval()
    assert lm_head_inputs(student, batch["input_ids"], batch["attention_mask"]) is not None


# ----------------------------------------------------------------------------------------------- adapters only
@pytest.mark.parametrize("method_name,fields", [
    ("kd", {"divergence": "jsd", "alpha": 0.2}),
    ("intermediate", {"method_args": {"attention_weight": 0.5}}),
    ("okd", {"method_args": {"lora_r": 4}}),
    ("gkd", {"method_args": {"lmbda": 1.0, "max_new_tokens": 4}}),
])
def test_training_changes_the_adapters_and_the_methods_own_parts_only(method_name, fields):
    """Through the trainer, a LoRA student's base weights stay as they were; its adapters and the method's own
    trainable parts (hidden-state projections, OKD's online module) change."""
    setup = tiny_setup()
    student = with_lora(setup.student(hidden=48), LoraConfig(**LORA), "students.s.lora")
    base_before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    assert set(adapters_before) and all(".lora_" in n for n in adapters_before)
    sc = student_config(method_name, model={"config": {"n_layer": 1, "hidden": 48, "n_head": 2}}, **fields)
    method, student, _, _, _ = run_method(sc, steps=3, student=student)
    params = dict(student.named_parameters())
    for name, before in base_before.items():
        assert torch.equal(params[name].detach().cpu(), before), name
    assert all(not torch.equal(params[n].detach().cpu(), before) for n, before in adapters_before.items()
               if "lora_B" in n)
    if method_name == "intermediate":  # its hidden-state projections (width 48 to the teacher's 64) train as well
        assert [p for m in method.trainable_modules() for p in m.parameters() if p.requires_grad]
    if method_name == "okd":  # and OKD's online module, inside the teacher
        assert any(p.requires_grad for p in method.teacher_in_use.parameters())


# ----------------------------------------------------------------------------------------------- saved merged
def test_the_saved_model_is_the_merged_lora_model_and_loads_back_for_more_training(tmp_path):
    """`train` saves a LoRA student merged (a plain causal LM, head untied) with its adapter in `adapter/`; the folder
    loaded with AutoModelForCausalLM gives the logits of the trained peft model, and of the base model with the
    saved adapter merged by hand; `load_for_training` recovers the base and the same adapter."""
    setup = tiny_setup()
    base = setup.student(hidden=48)
    pristine = copy.deepcopy(base)
    student = with_lora(base, LoraConfig(**LORA), "students.s.lora")
    n_base, n_adapters = count_parameters(student), trainable_parameters(student)
    sc = student_config("kd", divergence="fkl")
    cfg = TrainingConfig(max_steps=3, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0, logging_steps=3)
    teacher = copy.deepcopy(setup.teacher)
    train(student, setup.train_set, setup.tokenizer, cfg, tmp_path / "s", method=get_method("kd")(sc, sc.method_args),
          seed=0, teacher=LiveTeacher(teacher))
    batch = {k: v for k, v in setup.val_batches(8)[0].items() if k != "labels"}
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert not (tmp_path / "s" / "adapter_config.json").exists()  # a plain model at the top
    assert json.loads((tmp_path / "s" / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == 4
    from peft import PeftModel

    by_hand = PeftModel.from_pretrained(_untied(copy.deepcopy(pristine)), str(tmp_path / "s" / ADAPTER_DIR)).eval()
    with torch.no_grad():
        peft_logits = by_hand(**batch).logits
        merged_logits = by_hand.merge_and_unload()(**batch).logits
        saved_logits = saved(**batch).logits
        tied = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "s" / ADAPTER_DIR))
        tied_merged = tied.merge_and_unload().eval()(**batch).logits
    assert not torch.allclose(tied_merged, peft_logits, atol=1e-3)  # (what untying the head avoids)
    assert not torch.allclose(peft_logits, pristine.eval()(**batch).logits, atol=1e-4)  # training changed it
    torch.testing.assert_close(saved_logits, peft_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(saved_logits, merged_logits, rtol=1e-5, atol=1e-5)
    # the untied head: the input embeddings are the base's, the head its own merged weight
    torch.testing.assert_close(saved.get_input_embeddings().weight, pristine.get_input_embeddings().weight)
    assert count_parameters(saved) == n_base and n_adapters < n_base / 10
    again = load_for_training(tmp_path / "s", "students.s.lora")
    restored = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in again.named_parameters() if ".lora_" not in n}
    for name, p in pristine.named_parameters():
        torch.testing.assert_close(restored[name], p, rtol=0, atol=1e-5)
    assert trainable_parameters(again) == n_adapters
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**batch).logits, saved_logits, rtol=1e-5, atol=1e-5)


def test_a_lora_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_ends(tmp_path):
    """The trainer's checkpoints of a LoRA student (the adapters, the optimizer state) resume it: interrupted after
    a checkpoint and restarted, it saves the same merged model and adapter as a run without interruption."""
    from kd_core.training.trainer import last_complete_checkpoint
    from tests.method_harness import Interrupted, interrupt_at

    setup = tiny_setup()
    cfg = TrainingConfig(max_steps=6, save_steps=2, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0,
                         logging_steps=6)
    sc = student_config("kd", divergence="fkl")

    steps: list[int] = []

    def run(out_dir, stop_at=None):
        method = get_method("kd")(sc, sc.method_args)
        compute = method.compute_loss
        method.compute_loss = lambda ctx: steps.append(ctx.trainer.state.global_step) or compute(ctx)
        student = with_lora(setup.student(seed=1), LoraConfig(**LORA), "students.s.lora")
        if stop_at is not None:
            interrupt_at(method, stop_at)
        try:
            train(student, setup.train_set, setup.tokenizer, cfg, out_dir, method=method, seed=0,
                  teacher=LiveTeacher(copy.deepcopy(setup.teacher)))
        except Interrupted:
            assert last_complete_checkpoint(out_dir.parent / f".{out_dir.name}-checkpoints").name == "checkpoint-4"
            return False
        return True

    assert run(tmp_path / "straight" / "s")
    assert not run(tmp_path / "resumed" / "s", stop_at=5)
    steps.clear()
    assert run(tmp_path / "resumed" / "s") and steps == [4, 5]  # from the checkpoint on, not from the start
    batch = {k: v for k, v in setup.val_batches(8)[0].items() if k != "labels"}
    with torch.no_grad():
        straight, resumed = (AutoModelForCausalLM.from_pretrained(tmp_path / run_name / "s").eval()(**batch).logits
                             for run_name in ("straight", "resumed"))
    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_lora_teacher_is_saved_merged_with_its_adapter(project, prepared_project):
    """`teacher.finetune: lora` goes through the same code: the teacher folder is the merged model, its adapter in
    `adapter/`, its card saying LoRA."""
    from kd_core.run import RunPaths
    from kd_core.stages.train_teacher import train_teacher

    params = tiny_params()
    params["teacher"] |= {"finetune": "lora", "lora": {"r": 2, "alpha": 4.0, "target_modules": ["c_attn", "c_fc"]}}
    copy_prepared(prepared_project, project, params)
    cfg = parse_config(params)
    paths = RunPaths.of(cfg)
    info = train_teacher(cfg, paths)
    folder = paths.model("teacher")
    assert 0 < info["trainable_parameters"] < info["parameters"]
    adapter = json.loads((folder / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and set(adapter["target_modules"]) == {"c_attn", "c_fc"}
    AutoModelForCausalLM.from_pretrained(folder)  # a plain causal LM
    assert "LoRA adapters only" in (folder / "README.md").read_text()


# ----------------------------------------------------------------------------------------------- the flow
@pytest.mark.slow
def test_a_lora_student_through_the_flow_is_registered_merged(project, prepared_project, empty_stores):
    """`kd run`'s flow with a LoRA student (KD on the teacher's cache, fine-tuned after distillation): the registered folder is the
    merged model, equal to the student's base built as distill builds it plus the saved adapter merged by hand;
    the card and the version say LoRA's r, α and targets; the adapter is logged beside the registered model."""
    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from flows.pipeline import kd_pipeline
    from kd_core.models.build import make_model
    from kd_core.run import RunPaths, load_run_tokenizer, n_positions, training_seed
    from kd_core.tracking.registry import version_rows
    from tests.conftest import dvc_status, registered_versions

    params = tiny_params()
    params["students"] = {"lora": {"method": "kd", "teacher": "teacher", "train_data": "train", "divergence": "fkl",
                                   "model": TINY_MODEL, "training": TINY_TRAINING, "lora": LORA,
                                   "teacher_cache": {"enabled": True, "top_k": 16},
                                   "finetune": {"enabled": True, "epochs": 0.2, "lr_scale": 0.1}}}
    copy_prepared(prepared_project, project, params)  # data, tokenizer, teacher: made once a run (conftest)
    with empty_stores.prefect_harness():
        kd_pipeline(params_path=str(project / "params.yaml"))
    cfg = parse_config(params)
    paths = RunPaths.of(cfg)
    folder = project / paths.model("lora")
    info = json.loads((project / paths.train_info("lora")).read_text())
    assert 0 < info["trainable_parameters"] < info["parameters"] and info["finetuned"] is True
    assert info["teacher_cache_top_k"] == 16  # (distilled from the teacher's cache, the fused sparse loss)
    student_cfg = cfg.student("lora")
    tokenizer = load_run_tokenizer(paths)
    base = make_model(student_cfg.model, tokenizer, n_positions(cfg), training_seed(cfg, student_cfg.training.seed))
    by_hand = PeftModel.from_pretrained(_untied(base), str(folder / ADAPTER_DIR)).merge_and_unload().eval()
    registered = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer("sort ascending: 4 35 13 33")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(registered(input_ids=ids).logits, by_hand(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert "LoRA adapters only" in card and "r = 4, α = 8" in card and "`c_attn`, `lm_head`" in card
    (version,) = registered_versions("kd-student")
    (row,) = version_rows("kd-student")  # (its tags and its lineage document)
    assert row["tags"]["kd.trainable_parameters"] == str(info["trainable_parameters"])
    logged = [f.path for f in MlflowClient().list_artifacts(version.run_id, "lora/adapter")]
    assert "lora/adapter/adapter_config.json" in logged
    assert dvc_status(project) == {}  # the flow recorded every stage in DVC: `dvc repro` finds nothing to do
