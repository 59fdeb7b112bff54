"""The routed teachers of a student for training and their signal on a micro-batch: each row's own teacher
(`students.<name>.route`; the rows and the formula: :mod:`kd_core.teachers.routing`)."""

from __future__ import annotations

import torch
from torch import Tensor

from kd_core.errors import DataError
from kd_core.models.lm import HeadInputs
from kd_core.teachers.routing import batch_keys
from kd_core.teachers.signal import TeacherSignal
from kd_core.teachers.source import SeveralTeachers, TeacherSource

__all__ = ["RoutedTeachers", "RoutedTeacherSignal"]

Batch = dict[str, Tensor]


class RoutedTeachers(SeveralTeachers):
    """A student's routed teachers for training: ``members`` (teacher name -> its
    :class:`~kd_core.teachers.source.TeacherSource`: a live model, a cache over its own rows, a served teacher) and
    each training example's teacher by content (``routed``: example key -> teacher name).
    ``signal(batch)`` is each row's own teacher's signal, put in place (:class:`RoutedTeacherSignal`)."""

    def __init__(self, members: dict[str, TeacherSource], routed: dict[bytes, str], route: dict | None = None):
        super().__init__(members)
        self.routed, self.route = routed, route

    def signal(self, batch: Batch) -> RoutedTeacherSignal:
        owners = []
        for i, key in enumerate(batch_keys(batch)):
            if key not in self.routed:
                raise DataError(f"a training example (batch row {i}) is not among the routed rows: the route was "
                                "made from other data")
            owners.append(self.names.index(self.routed[key]))
        owners_t = torch.tensor(owners, device=batch["input_ids"].device)
        groups = []
        for k, member in enumerate(self.members):
            rows = (owners_t == k).nonzero(as_tuple=True)[0]
            if rows.numel():
                sub = {name: value[rows] for name, value in batch.items()
                       if isinstance(value, Tensor) and value.shape[:1] == owners_t.shape}
                groups.append((rows, member.signal(sub)))
        return RoutedTeacherSignal(groups, len(owners))

    def describe(self) -> dict:
        return self.members[0].describe() | ({"route": self.route} if self.route is not None else {})


class RoutedTeacherSignal(TeacherSignal):
    """Each row's own teacher: ``groups`` of (batch rows ``[b_k]`` ascending, that teacher's signal on the
    sub-batch of those rows); every call is each group's on its rows, put back in place (module docstring)."""

    def __init__(self, groups: list[tuple[Tensor, TeacherSignal]], batch_size: int):
        self.groups, self.batch_size = groups, batch_size

    def _placed(self, positions: Tensor, call) -> Tensor:
        out = None
        for rows, signal in self.groups:
            part = call(signal, rows)
            full = part.new_zeros((self.batch_size, *part.shape[1:])).index_add(0, rows, part)
            out = full if out is None else out + full
        return out if out is not None else positions.new_zeros(positions.shape, dtype=torch.float32)

    def _per_position(self, positions: Tensor, rows: Tensor) -> Tensor:
        """Which of the N positions (row-major order of positions.nonzero()) lie in `rows`: a bool ``[N]``."""
        row_of = positions.bool().nonzero(as_tuple=True)[0]
        return torch.isin(row_of, rows)

    def divergence(self, student_logits, positions, name, temperature=1.0, **params):
        return self._placed(positions, lambda s, rows: s.divergence(student_logits[rows], positions[rows], name,
                                                                    temperature, **params))

    def fused_divergence(self, student: HeadInputs, positions, name, temperature=1.0, **params):
        def call(signal: TeacherSignal, rows: Tensor) -> Tensor:
            sub = HeadInputs(student.hidden[rows], student.weight, student.bias)
            return signal.fused_divergence(sub, positions[rows], name, temperature, **params)

        return self._placed(positions, call)

    def decoupled_divergence(self, student_logits, positions, targets, name, temperature=1.0, tkd_weight=1.0,
                             dkd_weight=1.0, **params):
        def call(signal: TeacherSignal, rows: Tensor) -> Tensor:
            inside = self._per_position(positions, rows)
            weight = tkd_weight[inside] if isinstance(tkd_weight, Tensor) and tkd_weight.dim() else tkd_weight
            return signal.decoupled_divergence(student_logits[rows], positions[rows], targets[inside], name,
                                               temperature, weight, dkd_weight, **params)

        return self._placed(positions, call)

    def target_uncertainty(self, student_logits, positions, targets, temperature=1.0):
        out = torch.zeros(int(positions.sum()), device=student_logits.device)
        for rows, signal in self.groups:
            inside = self._per_position(positions, rows)
            out[inside] = signal.target_uncertainty(student_logits[rows], positions[rows], targets[inside],
                                                    temperature).to(out.dtype)
        return out

    def _check(self, positions, temperature):
        for rows, signal in self.groups:
            signal._check(positions[rows], temperature)

    def shared_vocab_size(self, student_vocab: int) -> int:
        return min(signal.shared_vocab_size(student_vocab) for _, signal in self.groups)
