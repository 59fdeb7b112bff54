"""Tests for the `intermediate` (hidden-state + attention matching) and `progressive` methods."""

from __future__ import annotations

import copy

import pytest
import torch

from kd_core.config import ArchConfig
from kd_core.losses.divergences import fkl
from kd_core.losses.intermediate import (attention_divergence, hidden_state_loss, last_k_pairs, resolve_layer_map,
                                         scaled_position_mean, uniform_pairs)
from kd_core.methods import StepContext, get_method
from kd_core.models.build import build_from_config
from tests.method_harness import MAX_LENGTH, assert_student_grads, run_method, student_config, tiny_setup


def _ctx(student, teacher, batch, progress=0.5) -> StepContext:
    return StepContext(student=student, batch=batch, num_items=batch["labels"][:, 1:].ne(-100).sum(),
                       teacher=teacher, progress=progress)


def _method(name, student, teacher, **method_args):
    sc = student_config(name, method_args=method_args)
    method = get_method(name)(sc, sc.method_args)
    return method, method.setup(student, teacher)


# ----------------------------------------------------------------------------------------------- layer maps
def test_layer_maps():
    assert uniform_pairs(2, 4) == [(1, 2), (2, 4)]
    assert uniform_pairs(3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert uniform_pairs(2, 2) == [(1, 1), (2, 2)]
    assert uniform_pairs(4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert uniform_pairs(1, 2, include_embeddings=True) == [(0, 0), (1, 2)]
    assert last_k_pairs(3, 6, 2) == [(2, 5), (3, 6)]
    assert resolve_layer_map("last_k", 2, 4, last_k=1) == [(2, 4)]
    assert resolve_layer_map([[-1, -1], [0, 0], [1, 3]], 2, 4) == [(2, 4), (0, 0), (1, 3)]
    with pytest.raises(ValueError, match="student layer 3"):
        resolve_layer_map([[3, 1]], 2, 4)
    with pytest.raises(ValueError, match="teacher layer -6"):
        resolve_layer_map([[1, -6]], 2, 4)
    with pytest.raises(ValueError, match="last_k"):
        last_k_pairs(2, 4, 3)
    # the method resolves against the real models: harness student 1 layer, teacher 2 layers
    setup = tiny_setup()
    method, _ = _method("intermediate", setup.student(), copy.deepcopy(setup.teacher))
    assert method.pairs == [(1, 2)]
    with pytest.raises(ValueError, match="pair_weights"):
        _method("intermediate", setup.student(), copy.deepcopy(setup.teacher), pair_weights=[1.0, 2.0])


def test_args_are_checked():
    cls = get_method("intermediate")
    cls.validate_args({"layer_map": [[1, 2], [2, 4]], "hidden_loss": "cosine", "attention_divergence": "jsd"})
    with pytest.raises(ValueError, match="attention_divergence"):
        cls.validate_args({"attention_divergence": "nope"})
    with pytest.raises(ValueError, match="layer_map"):
        cls.validate_args({"layer_map": "every_other"})
    with pytest.raises(ValueError, match="unknown key"):
        get_method("progressive").validate_args({"kd_from_start": True})


# ----------------------------------------------------------------------------------------------- projections
def test_projection_used_when_widths_differ():
    setup = tiny_setup()
    student = setup.student()  # hidden 32, teacher hidden 64
    method, teacher = _method("intermediate", student, copy.deepcopy(setup.teacher), kd_weight=0.0)
    assert method.projections is not None and len(method.projections) == 1
    proj = method.projections[0]
    assert tuple(proj.weight.shape) == (64, 32) and proj.bias is None
    assert method.trainable_modules() == [method.projections]
    batch = setup.val_batches()[0]
    out = method.compute_loss(_ctx(student, teacher, batch))
    out.loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the loss goes through the projection
        proj.weight.mul_(2.0)
        assert float(method.compute_loss(_ctx(student, teacher, batch)).loss) != pytest.approx(float(out.loss))
    # equal widths: no projection (auto), `never` with different widths is an error
    same, _ = _method("intermediate", copy.deepcopy(setup.teacher), copy.deepcopy(setup.teacher))
    assert same.projections is None and same.trainable_modules() == []
    with pytest.raises(ValueError, match="never"):
        _method("intermediate", setup.student(), copy.deepcopy(setup.teacher), projection="never")


# ----------------------------------------------------------------------------------------------- zero for copies
def test_terms_are_zero_for_a_copy_of_the_teacher():
    setup = tiny_setup()
    teacher = copy.deepcopy(setup.teacher).eval()
    student = copy.deepcopy(setup.teacher).eval()
    method, teacher = _method("intermediate", student, teacher, layer_map=[[1, 1], [2, 2], [0, 0]],
                              attention_weight=1.0)
    assert method.projections is None
    batch = setup.val_batches()[0]
    with torch.no_grad():
        out = method.compute_loss(_ctx(student, teacher, batch))
    assert out.logs["hidden"] == 0.0 and out.logs["attention"] == 0.0 and out.logs["kd"] == 0.0
    assert float(out.loss) == 0.0
    # forced identity-initialised projections on equal widths: still exactly zero
    m_id, t_id = _method("intermediate", student, teacher, projection="always",
                         projection_init="identity", layer_map="last_k", last_k=2)
    assert m_id.projections is not None and m_id.pairs == [(1, 1), (2, 2)]
    with torch.no_grad():
        assert m_id.compute_loss(_ctx(student, t_id, batch)).logs["hidden"] == 0.0
    # a different student: both terms clearly positive
    other = setup.student(hidden=64)
    method2, teacher2 = _method("intermediate", other, copy.deepcopy(setup.teacher), layer_map=[[1, 2]],
                                attention_weight=1.0)
    with torch.no_grad():
        out2 = method2.compute_loss(_ctx(other.eval(), teacher2, batch))
    assert out2.logs["hidden"] > 1e-3 and out2.logs["attention"] > 1e-3


def test_attention_divergence_per_head_and_head_averaged():
    g = torch.Generator().manual_seed(0)
    causal = torch.ones(5, 5).tril().bool()

    def maps(heads):
        scores = torch.randn(2, heads, 5, 5, generator=g).masked_fill(~causal, float("-inf"))
        return scores.softmax(-1)

    a_s, a_t = maps(2), maps(2)
    # (these pin the fkl = KL(A_t || A_s) option, the default before the source's rkl became the default)
    assert attention_divergence(a_t, a_t).abs().max() == 0
    per_head = attention_divergence(a_s, a_t, divergence="fkl")
    want = fkl(a_s.log(), a_t.log()).mean(1)  # masked entries are 0 in both: no contribution
    torch.testing.assert_close(per_head, want)
    a_t4 = maps(4)  # head counts differ: head-averaged maps
    mean = attention_divergence(a_s, a_t4, divergence="fkl")
    torch.testing.assert_close(mean, fkl(a_s.mean(1).log(), a_t4.mean(1).log()))
    torch.testing.assert_close(attention_divergence(a_s, a_t, heads="mean", divergence="fkl"),
                               fkl(a_s.mean(1).log(), a_t.mean(1).log()))
    assert torch.isfinite(attention_divergence(a_s * (a_s > 0.05), a_t)).all()  # one-sided zeros stay finite


def test_hidden_state_loss_kinds_and_reduction():
    h = torch.randn(2, 3, 4)
    assert hidden_state_loss(h, h).abs().max() == 0
    assert hidden_state_loss(h, h, "cosine").abs().max() < 1e-6
    torch.testing.assert_close(hidden_state_loss(h, 2 * h), h.pow(2).mean(-1))
    per = torch.tensor([[1.0, 3.0, float("nan")]])
    keep = torch.tensor([[True, True, False]])
    assert float(scaled_position_mean(per, keep, 2, 8)) == pytest.approx(2.0 * 2 / 8)


# ----------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("positions", ["all", "response"])
def test_padding_positions_are_excluded(positions):
    setup = tiny_setup()
    student = setup.student(seed=3).eval()
    method, teacher = _method("intermediate", student, copy.deepcopy(setup.teacher), positions=positions,
                              attention_weight=1.0, hidden_weight=1.0, layer_map=[[0, 0], [1, 2]])
    batch = setup.val_batches()[0]
    pad = batch["attention_mask"] == 0
    assert pad.any()
    g = torch.Generator().manual_seed(0)
    noisy = dict(batch, input_ids=torch.where(pad, torch.randint(0, 300, pad.shape, generator=g), batch["input_ids"]))
    with torch.no_grad():
        a = method.compute_loss(_ctx(student, teacher, batch))
        b = method.compute_loss(_ctx(student, teacher, noisy))
        # sanity: the same change on real tokens does change the loss
        real = batch["attention_mask"].bool() & ~pad
        c = method.compute_loss(_ctx(student, teacher, dict(batch, input_ids=torch.where(
            real, (batch["input_ids"] + 1) % 300, batch["input_ids"]))))
    assert float(a.loss) == float(b.loss)
    assert a.logs == b.logs
    assert abs(float(c.loss) - float(a.loss)) > 1e-4


# ----------------------------------------------------------------------------------------------- progressive
def test_progressive_active_pairs():
    setup = tiny_setup()
    student = setup.student(n_layer=2)
    method, teacher = _method("progressive", student, copy.deepcopy(setup.teacher),
                              layer_map=[[2, 2], [1, 1], [0, 0]], pair_weights=[3.0, 2.0, 1.0],
                              kd_schedule="last_phase")
    assert method.pairs == [(0, 0), (1, 1), (2, 2)] and method.pair_weights == [1.0, 2.0, 3.0]
    active = {p: [method.pairs[k] for k in method.active_pairs(p)] for p in (0.0, 0.5, 1.0)}
    assert active == {0.0: [(0, 0)], 0.5: [(0, 0), (1, 1)], 1.0: [(0, 0), (1, 1), (2, 2)]}
    assert [method.kd_active(p) for p in (0.0, 0.5, 0.7, 1.0)] == [False, False, True, True]

    # in the loss: only the first pair's projection gets a gradient at progress 0, and no KD term
    batch = setup.val_batches()[0]
    out = method.compute_loss(_ctx(student, teacher, batch, progress=0.0))
    out.loss.backward()
    grads = [p.weight.grad for p in method.projections]
    assert grads[0] is not None and grads[0].abs().sum() > 0 and grads[1] is None and grads[2] is None
    assert "kd" not in out.logs and out.logs["active_pairs"] == 1
    out1 = method.compute_loss(_ctx(student, teacher, batch, progress=1.0))
    assert "kd" in out1.logs and out1.logs["active_pairs"] == 3

    # uniform map with 2 student layers, non-accumulating schedule: one pair at a time
    m2, _ = _method("progressive", setup.student(n_layer=2), copy.deepcopy(setup.teacher), accumulate=False)
    assert m2.pairs == [(1, 1), (2, 2)]
    assert [[m2.pairs[k] for k in m2.active_pairs(p)] for p in (0.0, 0.5, 1.0)] == [[(1, 1)], [(2, 2)], [(2, 2)]]
    assert all(m2.kd_active(p) for p in (0.0, 0.5, 1.0))


# ----------------------------------------------------------------------------------------------- training
def test_intermediate_trains():
    sc = student_config("intermediate", alpha=0.1, method_args={"attention_weight": 0.5, "include_embeddings": True})
    method, student, teacher, before, after = run_method(sc, steps=8)
    assert torch.isfinite(torch.tensor([before, after])).all() and after < before
    assert_student_grads(method, student, teacher)
    assert student.config._attn_implementation == "eager" and teacher.config._attn_implementation == "eager"


def test_progressive_trains():
    setup = tiny_setup()
    student = build_from_config(ArchConfig(n_layer=2, hidden=32, n_head=2), setup.tokenizer,
                                n_positions=MAX_LENGTH + 16, seed=1)
    sc = student_config("progressive", method_args={"hidden_loss": "cosine", "attention_weight": 0.5})
    method, student, teacher, before, after = run_method(sc, steps=8, student=student)
    assert method.pairs == [(1, 1), (2, 2)]
    assert torch.isfinite(torch.tensor([before, after])).all() and after < before
    assert_student_grads(method, student, teacher)
