"""Tests for the `okd` (online KD, Rao et al.) and `atkd` methods."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kd_core.config import TrainingConfig
from kd_core.losses.atkd import decompose
from kd_core.losses.divergences import fkl, rkl
from kd_core.losses.tokens import logprobs
from kd_core.methods import StepContext, get_method
from kd_core.methods.okd import ARTIFACT_DIR
from kd_core.teachers.source import LiveTeacher
from kd_core.training.trainer import train
from tests.method_harness import assert_student_grads, method_loss, run_method, student_config, tiny_setup

MODULES = ["lora", "prefix", "ptuning"]


def _ctx(method_student, teacher, batch, **kw) -> StepContext:
    return StepContext(student=method_student, batch=batch, num_items=batch["labels"][:, 1:].ne(-100).sum(),
                       teacher=teacher, **kw)


def _is_adapter(name: str) -> bool:
    return "lora_" in name or "prompt_encoder" in name


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


def _grad_norm(params) -> float:
    return float(sum(p.grad.detach().pow(2).sum() for p in params if p.grad is not None) ** 0.5) if any(
        p.grad is not None for p in params) else 0.0


def _train_okd(sc, steps=8):
    """run_method, but keeping snapshots of the online module and student taken right after `setup`."""
    setup = tiny_setup()
    student = setup.student()
    method = get_method("okd")(sc, sc.method_args)
    teacher = copy.deepcopy(setup.teacher)
    teacher_in_use = method.setup(student, teacher)
    online0 = [p.detach().clone() for p in method.online.parameters()]
    student0 = {k: v.detach().clone() for k, v in student.state_dict().items()}
    batches = setup.val_batches()
    before = method_loss(method, student, teacher_in_use, batches, setup.tokenizer)
    cfg = TrainingConfig(max_steps=steps, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0, logging_steps=steps)
    train(student, setup.train_set, setup.tokenizer, cfg, setup.workdir / "student-okd", method=method, seed=0,
          teacher=LiveTeacher(teacher), save=False)
    after = method_loss(method, student, teacher_in_use, batches, setup.tokenizer)
    return method, student, teacher_in_use, before, after, online0, student0


# ----------------------------------------------------------------------------------------------- okd: training
@pytest.mark.parametrize("module", MODULES)
def test_okd_trains_online_module_and_student_keeps_teacher_base(module, tmp_path):
    from peft import PeftModel

    setup = tiny_setup()
    sc = student_config("okd", method_args={"module": module})
    method, student, teacher_in_use, before, after, online0, student0 = _train_okd(sc)
    assert torch.isfinite(torch.tensor([before, after])).all() and after < before

    # base teacher weights bit-identical to the (untouched) cached teacher
    ref = setup.teacher.state_dict()
    compared = 0
    for name, p in teacher_in_use.get_base_model().named_parameters():
        if _is_adapter(name):
            continue
        assert torch.equal(p.detach().cpu(), ref[_base_name(name)]), name
        assert not p.requires_grad
        compared += 1
    assert compared == len(list(setup.teacher.parameters()))

    # online module and student changed
    online1 = list(method.online.parameters())
    assert online1 and any(not torch.equal(a, b.detach().cpu()) for a, b in zip(online0, online1))
    assert any(not torch.equal(v, student.state_dict()[k].cpu()) for k, v in student0.items())
    assert_student_grads(method, student, teacher_in_use)

    # save_artifacts writes an adapter that loads onto a fresh copy of the teacher and reproduces it
    method.save_artifacts(tmp_path)
    assert (tmp_path / ARTIFACT_DIR / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(copy.deepcopy(setup.teacher), str(tmp_path / ARTIFACT_DIR)).eval()
    batch = setup.val_batches()[0]
    teacher_in_use.cpu()  # (trained on the GPU if there is one)
    with torch.no_grad():
        want = teacher_in_use(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = setup.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[:, -plain.shape[1]:], plain, atol=1e-4)  # the adapter does something


def test_okd_lora_defaults_rank_32_on_q_and_v_of_gpt2():
    setup = tiny_setup()
    sc = student_config("okd")
    method = get_method("okd")(sc, sc.method_args)
    peft_model = method.setup(setup.student(), copy.deepcopy(setup.teacher))
    cfg = peft_model.peft_config["default"]
    assert cfg.r == 32 and cfg.lora_alpha == 32 and set(cfg.target_modules) == {"c_attn"}
    # train the LoRA B of c_attn one step: the k rows (fused [q|k|v]) stay exactly zero
    batch = setup.val_batches()[0]
    method.compute_loss(_ctx(setup.student(), peft_model, batch)).loss.backward()
    d = setup.teacher.config.hidden_size
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            assert p.grad[d:2 * d].abs().sum() == 0 and p.grad[:d].abs().sum() > 0 and p.grad[2 * d:].abs().sum() > 0


# ----------------------------------------------------------------------------------------------- okd: gradients
@pytest.mark.parametrize("module,divergence,args", [("lora", "fkl", {}), ("lora", "rkl", {}),
                                                    ("lora", "jsd", {"beta": 0.3}), ("prefix", "fkl", {}),
                                                    ("ptuning", "jsd", {}), ("prefix", "rkl", {})])
def test_okd_gradients_stay_separate(module, divergence, args):
    setup = tiny_setup()
    sc = student_config("okd", divergence=divergence, divergence_args=args, method_args={"module": module})
    method = get_method("okd")(sc, sc.method_args)
    student = setup.student()
    teacher = method.setup(student, copy.deepcopy(setup.teacher))
    online = list(method.online.parameters())
    s_params = list(student.parameters())
    batch = setup.val_batches()[0]
    loss_s, loss_t, logs = method.terms(_ctx(student, teacher, batch))
    assert torch.isfinite(loss_s) and torch.isfinite(loss_t) and loss_s > 0 and loss_t > 0
    assert all(isinstance(v, float) for v in logs.values())

    loss_s.backward(retain_graph=True)  # student loss: student only
    assert _grad_norm(s_params) > 0
    assert _grad_norm(online) == 0
    student.zero_grad(set_to_none=True)
    loss_t.backward()  # teacher loss: online module only
    assert _grad_norm(online) > 0 and all(torch.isfinite(p.grad).all() for p in online if p.grad is not None)
    assert _grad_norm(s_params) == 0
    assert all(p.grad is None for _, p in teacher.named_parameters() if not p.requires_grad)


def test_okd_directions_match_the_paper():
    """eq. 17: student minimises KL(p_ta || q) (our fkl); eq. 16 (swapped): teacher minimises KL(q || p_ta)."""
    setup = tiny_setup()
    batch = setup.val_batches()[0]
    student = setup.student().eval()
    for direction, teacher_fn in (("swapped", rkl), ("same", fkl)):
        sc = student_config("okd", temperature=2.0, method_args={"teacher_direction": direction,
                                                                   "teacher_kl_weight": 0.3})
        method = get_method("okd")(sc, sc.method_args)
        teacher = method.setup(student, copy.deepcopy(setup.teacher))
        with torch.no_grad():
            loss_s, loss_t, logs = method.terms(_ctx(student, teacher, batch))
            s_lp = logprobs(student(input_ids=batch["input_ids"]).logits[:, :-1], 2.0)
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t_lp = logprobs(t_logits, 2.0)
        mask = batch["labels"][:, 1:].ne(-100)
        n = mask.sum()
        student_kd = (fkl(s_lp, t_lp) * mask).sum() / n
        teacher_kd = (teacher_fn(s_lp, t_lp) * mask).sum() / n
        ce = torch.nn.functional.cross_entropy(t_logits.transpose(1, 2), batch["labels"][:, 1:], reduction="sum") / n
        torch.testing.assert_close(loss_s, student_kd, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_t, 0.3 * teacher_kd + 0.7 * ce, rtol=1e-5, atol=1e-6)
        assert logs["okd_teacher_kd"] == pytest.approx(float(teacher_kd), rel=1e-5)


def test_okd_extra_grads_do_not_leak_across_steps(monkeypatch):
    """The trainer clears the online module's gradients after every optimizer step (methods do not): with the
    same examples in every micro-batch and a negligible learning rate, the gradient the optimizer sees is the
    same at every step, and equals one micro-batch's loss gradient (the accumulated micro-batches sum)."""
    from kd_core.training import callbacks as training_callbacks
    from kd_core.data.tokenize import CausalCollator, EncodedDataset

    setup = tiny_setup()
    sc = student_config("okd")
    method = get_method("okd")(sc, sc.method_args)
    student, teacher = setup.student(), copy.deepcopy(setup.teacher)
    same = EncodedDataset([setup.train_set.examples[0]] * 16)
    seen: list[list[torch.Tensor]] = []
    record = training_callbacks.ExtraModulesStep.on_pre_optimizer_step

    def recording(self, args, state, control, **kw):
        seen.append([p.grad.detach().clone() for p in method.online.parameters()])
        return record(self, args, state, control, **kw)

    monkeypatch.setattr(training_callbacks.ExtraModulesStep, "on_pre_optimizer_step", recording)
    cfg = TrainingConfig(max_steps=3, learning_rate=1e-12, batch_size=8, grad_accum=2, warmup_ratio=0.0,
                         logging_steps=1)
    train(student, same, setup.tokenizer, cfg, setup.workdir / "okd-no-leak", method=method, seed=0,
          teacher=LiveTeacher(teacher), save=False)
    assert len(seen) == 3
    assert all(p.grad is None for p in method.online.parameters())  # cleared after the last step too
    for step in seen[1:]:
        torch.testing.assert_close(step, seen[0], rtol=1e-5, atol=1e-9)
    batch = {k: v.to(next(student.parameters()).device)
             for k, v in CausalCollator(setup.tokenizer.pad_token_id)([same[i] for i in range(8)]).items()}
    student.train()
    method.compute_loss(_ctx(student, method.setup(student, teacher), batch)).loss.backward()
    torch.testing.assert_close([p.grad for p in method.online.parameters()], seen[0], rtol=1e-4, atol=1e-8)


def test_okd_args_are_checked():
    cls = get_method("okd")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        cls.validate_args({"module": "lora", "num_virtual_tokens": 4})
    with pytest.raises(ValueError, match="lora_r"):
        cls.validate_args({"module": "prefix", "lora_r": 4})
    with pytest.raises(ValueError, match="unknown key"):
        cls.validate_args({"rank": 4})
    cls.validate_args({"module": "ptuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16})


# ----------------------------------------------------------------------------------------------- atkd
def test_atkd_equals_hand_computed_sum_of_parts():
    setup = tiny_setup()
    sc = student_config("atkd", divergence="fkl", temperature=1.5,
                        method_args={"hard_fraction": 1.0, "tkd_weight": 1.0, "dkd_weight": 1.0})
    method = get_method("atkd")(sc, sc.method_args)
    student = setup.student().eval()
    batch = setup.val_batches()[0]
    with torch.no_grad():
        out = method.compute_loss(_ctx(student, setup.teacher, batch))
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = setup.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets.ne(-100)
    tkd, dkd, _ = decompose(logprobs(s[mask], 1.5), logprobs(t[mask], 1.5), targets[mask], "fkl")
    torch.testing.assert_close(out.loss, (tkd + dkd).sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    # hard_fraction = 0: DKD only
    sc0 = student_config("atkd", temperature=1.5, method_args={"hard_fraction": 0.0})
    with torch.no_grad():
        out0 = get_method("atkd")(sc0, sc0.method_args).compute_loss(_ctx(student, setup.teacher, batch))
    torch.testing.assert_close(out0.loss, dkd.sum() / mask.sum(), rtol=1e-5, atol=1e-6)


def test_atkd_trains():
    method, student, teacher, before, after = run_method(student_config("atkd", divergence="rkl", alpha=0.2), steps=8)
    assert torch.isfinite(torch.tensor([before, after])).all() and after < before
    assert_student_grads(method, student, teacher)


def test_bf16_mixed_precision_keeps_trainable_weights_fp32_and_casts_the_frozen_teacher():
    """training.precision: bf16 (the Trainer's autocast; emulated on CPU): the frozen teacher runs in bf16
    with its values unchanged by training, while the student and OKD's online module keep fp32 weights and train."""
    setup = tiny_setup()
    sc = student_config("okd", method_args={"lora_r": 4})
    method = get_method("okd")(sc, sc.method_args)
    student, teacher = setup.student(), copy.deepcopy(setup.teacher)
    student0 = [p.detach().clone() for p in student.parameters()]
    base0 = {k: v.to(torch.bfloat16) for k, v in setup.teacher.state_dict().items()}
    cfg = TrainingConfig(max_steps=3, batch_size=16, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1,
                         precision="bf16")
    result = train(student, setup.train_set, setup.tokenizer, cfg, setup.workdir / "okd-bf16", method=method,
                   seed=0, teacher=LiveTeacher(teacher), save=False)

    losses = [h["loss"] for h in result.history if "loss" in h]
    assert result.steps == 3 and len(losses) == 3 and all(map(math.isfinite, losses))
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(student0, student.parameters()))
    online = [p for p in method.online.parameters() if p.requires_grad]
    assert online and all(p.dtype == torch.float32 for p in online)
    assert any(p.detach().abs().sum() > 0 for p in online)  # LoRA B starts at zero: nonzero once trained
    frozen = {_base_name(k): v for k, v in teacher.state_dict().items() if not _is_adapter(k)}
    assert {v.dtype for v in frozen.values()} == {torch.bfloat16}
    for name, value in base0.items():
        assert torch.equal(frozen[name].cpu(), value), name
