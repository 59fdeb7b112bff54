"""Where a student's teacher distribution comes from in training: one interface, :class:`TeacherSource`, and its
kinds side by side.

* :class:`LiveTeacher`: a model of this run, run on every batch (its dense logits; the model itself for the methods
  that need it: OKD's online module, hidden states, on-policy sampling).
* :class:`CachedTeacher`: the teacher's top-k log-probs per response token, read from the teacher-logit cache
  (:mod:`kd_core.teachers.cache`).
* :class:`~kd_core.teachers.served.ServedTeacher`: a model served by another process over HTTP (its top-k).
* :class:`~kd_core.teachers.ensemble.TeacherEnsemble`: several teachers of one student, combined.

The trainer takes one source and puts ``source.signal(batch)`` in ``StepContext.teacher_signal``; which kind a
student gets is decided in one place, :func:`kd_core.teachers.factory.teacher_source`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from kd_core.teachers.signal import DenseTeacherSignal, TeacherSignal, TopKTeacherSignal

if TYPE_CHECKING:
    from kd_core.models.lm import HeadInputs
    from kd_core.teachers.cache import TeacherLogitCache

__all__ = ["CachedTeacher", "LiveTeacher", "TeacherSource", "teacher_head_inputs", "teacher_logits"]

Batch = dict[str, torch.Tensor]


class TeacherSource:
    """The teacher of one student in training: its signal for a batch, and the model itself where it is here.

    ``model``: the teacher model a method may use directly (OKD, hidden states, on-policy sampling); None when
    only the teacher's log-probs are here (the cache, a served teacher). ``top_k_only``: the signal is a top-k
    (:class:`~kd_core.teachers.signal.TopKTeacherSignal`), which only the methods that read the teacher through
    its signal can train on (``reads_teacher_cache``). ``several``: several teachers combined."""

    model: torch.nn.Module | None = None
    top_k_only: ClassVar[bool] = False
    several: ClassVar[bool] = False
    what: ClassVar[str] = "the teacher"  # how errors name it

    def signal(self, batch: Batch) -> TeacherSignal:
        """The teacher's signal on a right-padded batch (positions as :class:`~kd_core.teachers.signal.TeacherSignal`)."""
        raise NotImplementedError

    @property
    def live_models(self) -> list[torch.nn.Module]:
        """The models run on every batch (the trainer freezes and places them, and counts their forward passes)."""
        return []

    def using(self, model: torch.nn.Module | None) -> TeacherSource:
        """This source with ``model`` in place of its model: the teacher a method's ``prepare`` returned (OKD wraps
        it) or its ZeRO-3 engine. Kinds without a model here return themselves."""
        return self

    def describe(self) -> dict:
        """What the distill stage records of the teacher in the student's train_info."""
        return {"teacher_cache_top_k": 0}


def teacher_logits(teacher: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The frozen teacher's logits ``[B, T, V]`` on a batch (input_ids, attention_mask), without building a graph."""
    with torch.no_grad():
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def teacher_head_inputs(teacher: torch.nn.Module, batch: Batch) -> HeadInputs | None:
    """The frozen teacher's last hidden states and LM head (`kd_core.models.lm.lm_head_inputs`), without a graph."""
    from kd_core.models.lm import lm_head_inputs

    with torch.no_grad():
        return lm_head_inputs(teacher, batch["input_ids"], batch["attention_mask"])


class LiveTeacher(TeacherSource):
    """A model of this run as the teacher: its dense logits (or hidden states and head, for the fused losses),
    computed on first use, so a method that does not read the signal does not run it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def signal(self, batch: Batch) -> DenseTeacherSignal:
        model = self.model
        return DenseTeacherSignal(lambda: teacher_logits(model, batch),
                                  head_inputs=lambda: teacher_head_inputs(model, batch))

    @property
    def live_models(self) -> list[torch.nn.Module]:
        return [self.model]

    def using(self, model: torch.nn.Module | None) -> TeacherSource:
        return LiveTeacher(model)


class CachedTeacher(TeacherSource):
    """The teacher's cached top-k (:class:`~kd_core.teachers.cache.TeacherLogitCache`, or any object with its
    ``rows_for(batch)``, ``vocab_size``, ``temperature``): a batch's rows, found by content, on the batch's device."""

    top_k_only = True
    what = "the teacher cache"

    def __init__(self, cache: TeacherLogitCache):
        self.cache = cache

    def signal(self, batch: Batch) -> TopKTeacherSignal:
        return TopKTeacherSignal.from_cache(self.cache, batch, batch["input_ids"].device)

    def describe(self) -> dict:
        return {"teacher_cache_top_k": self.cache.key["top_k"]}


class SeveralTeachers(TeacherSource):
    """Several teachers of one student: ``members``, teacher name -> its :class:`TeacherSource` (a live model, the
    cache, a served teacher); how their signals combine is the subclass's (`ensemble`: weighted, `routed`: each
    row its own)."""

    several = True

    def __init__(self, members: dict[str, TeacherSource]):
        self.names, self.members = list(members), list(members.values())

    @property
    def top_k_only(self) -> bool:
        return any(m.top_k_only for m in self.members)

    @property
    def live_models(self) -> list[torch.nn.Module]:
        """The live teachers (the trainer freezes and places them)."""
        return [model for m in self.members for model in m.live_models]
