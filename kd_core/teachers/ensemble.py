"""Several teachers of one student (`students.<name>.teachers: {model: weight}`): their signals combined into one
:class:`~kd_core.teachers.signal.TeacherSignal`, so that every method written against ``ctx.teacher_signal`` (and the
on-policy methods' ``ctx.signal_for(batch)``) distills from all of them unchanged.

With weights w_k (> 0, normalised to Σ_k w_k = 1), teacher k's next-token distribution p_k, the student's q (all
at the method's temperature τ) and D the method's divergence (argument order of :mod:`kd_core.losses.divergences`:
``fkl`` = KL(p || q)), per response position:

* ``sum`` (default): ``D_sum = Σ_k w_k D(p_k || q)``, each teacher's own divergence (dense, or sparse on its
  cached top-k + tail: :mod:`kd_core.losses.sparse`); gradients are the weighted sums of the single-teacher ones.
* ``mixture``: ``D_mix = D(p̄ || q)`` with ``p̄ = Σ_k w_k p_k``. Live teachers enter exactly (over the vocabulary
  shared by all models). A cached teacher enters as :func:`~kd_core.losses.sparse.spread_tail` (its top-k, its tail
  mass spread evenly over its other V − k tokens), and p̄ and q are then coarsened to the union U of the cached
  teachers' top-k ids + one tail bucket (:func:`~kd_core.losses.sparse.coarsen_to`): exact when every k = V, and
  with one teacher exactly that teacher's :class:`~kd_core.teachers.signal.TopKTeacherSignal`.

For fkl (live teachers) the two differ by a constant: D_sum − D_mix = Σ_k w_k KL(p_k || p̄) ≥ 0, the teachers'
disagreement, which does not depend on q, so both give the student the same gradient; for other divergences
they differ (e.g. rkl: the sum seeks the teachers' common modes, the mixture covers any teacher's). ATKD's
UNC = 1 − p̄_g under either combine; its TKD/DKD parts are weighted sums (sum) or taken on p̄ (mixture).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import Tensor

from kd_core.losses.chunked import chunked_rows
from kd_core.losses.divergences import get_divergence
from kd_core.losses.fused import fused_rows
from kd_core.losses.sparse import coarsen_to, spread_tail
from kd_core.losses.tokens import logprobs
from kd_core.teachers.signal import DenseTeacherSignal, TeacherSignal, TopKTeacherSignal
from kd_core.teachers.source import SeveralTeachers, TeacherSource

if TYPE_CHECKING:
    from kd_core.models.lm import HeadInputs

__all__ = ["COMBINES", "MultiTeacherSignal", "TeacherEnsemble"]

COMBINES = ("sum", "mixture")
Batch = dict[str, Tensor]


class MultiTeacherSignal(TeacherSignal):
    """Teachers' signals (dense or top-k, any mix) with weights ``[w_k]`` (normalised here) and a combine
    (module docstring). Positions and shapes as :class:`~kd_core.teachers.signal.TeacherSignal`."""

    def __init__(self, signals: list[TeacherSignal], weights: list[float], combine: Literal["sum", "mixture"] = "sum"):
        if not signals or len(signals) != len(weights) or any(not w > 0 for w in weights):
            raise ValueError(f"several teachers need one weight > 0 each: {len(signals)} signals, weights {weights}")
        if combine not in COMBINES:
            raise ValueError(f"unknown teacher combine {combine!r} (allowed: {', '.join(COMBINES)})")
        total = float(sum(weights))
        self.signals, self.weights, self.combine = list(signals), [float(w) / total for w in weights], combine

    # ---- sum: the members' own computations, weighted
    def _weighted(self, call: Callable[[TeacherSignal], Tensor]) -> Tensor:
        out = None
        for signal, w in zip(self.signals, self.weights):
            term = w * call(signal)
            out = term if out is None else out + term
        return out

    def divergence(self, student_logits, positions, name, temperature=1.0, **params):
        if self.combine == "sum":
            return self._weighted(lambda s: s.divergence(student_logits, positions, name, temperature, **params))
        self._check(positions, temperature)
        vocab = self.shared_vocab_size(student_logits.shape[-1])
        div, resolved = self._resolved(name, params)
        rows_b, rows_t = positions.bool().nonzero(as_tuple=True)

        def row_fn(x: Tensor, sl: slice) -> Tensor:
            teacher, inside = self._mixture(sl, (rows_b[sl], rows_t[sl]), vocab, temperature)
            return div.fn(coarsen_to(logprobs(x[..., :vocab], temperature), inside), coarsen_to(teacher, inside),
                          **resolved)

        return chunked_rows(student_logits, positions, row_fn)

    def fused_divergence(self, student: HeadInputs, positions, name, temperature=1.0, **params):
        if self.combine == "sum":
            return self._weighted(lambda s: s.fused_divergence(student, positions, name, temperature, **params))
        self._check(positions, temperature)
        vocab = self.shared_vocab_size(student.weight.shape[0])
        div, resolved = self._resolved(name, params)
        mask = positions.bool()
        rows_b, rows_t = mask.nonzero(as_tuple=True)

        def row_fn(x: Tensor, sl: slice, _: None) -> Tensor:
            teacher, inside = self._mixture(sl, (rows_b[sl], rows_t[sl]), vocab, temperature)
            return div.fn(coarsen_to(logprobs(x, temperature), inside), coarsen_to(teacher, inside), **resolved)

        weight, bias = student.weight, student.bias
        if weight.shape[0] != vocab:  # (sliced only when needed: a slice costs a full-size gradient copy)
            weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
        values = fused_rows(student.hidden[mask], weight, bias, row_fn)
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    def decoupled_divergence(self, student_logits, positions, targets, name, temperature=1.0, tkd_weight=1.0,
                             dkd_weight=1.0, **params):
        if self.combine == "sum":
            return self._weighted(lambda s: s.decoupled_divergence(student_logits, positions, targets, name,
                                                                   temperature, tkd_weight, dkd_weight, **params))
        return super().decoupled_divergence(student_logits, positions, targets, name, temperature, tkd_weight,
                                            dkd_weight, **params)

    def target_uncertainty(self, student_logits, positions, targets, temperature=1.0):
        if self.combine == "sum":  # Σ_k w_k (1 − p_k,g) = 1 − p̄_g
            return self._weighted(lambda s: s.target_uncertainty(student_logits, positions, targets, temperature))
        return super().target_uncertainty(student_logits, positions, targets, temperature)

    # ---- mixture: p̄ per chunk of positions
    def _mixture(self, rows: slice, where: tuple[Tensor, Tensor], vocab: int,
                 temperature: float) -> tuple[Tensor, Tensor | None]:
        """log p̄ ``[n, V]`` of n positions and the tokens kept as categories ``[n, V]`` (the union of the cached
        teachers' top-k ids; None when every teacher is live: all tokens)."""
        parts, inside = [], None
        for signal, w in zip(self.signals, self.weights):
            if isinstance(signal, TopKTeacherSignal):
                ids = signal.top_ids[rows]
                parts.append(spread_tail(signal.top_logprobs[rows], ids, signal.tail_logmass[rows], vocab))
                kept = torch.zeros(parts[-1].shape, dtype=torch.bool, device=ids.device).scatter(-1, ids, True)
                inside = kept if inside is None else inside | kept
            elif isinstance(signal, DenseTeacherSignal):
                parts.append(logprobs(signal.logits[where[0], where[1], :vocab], temperature))
            else:
                raise TypeError(f"teacher_combine 'mixture' reads dense or top-k teachers, not {type(signal).__name__}")
            parts[-1] = parts[-1] + math.log(w)
        return torch.stack(parts).logsumexp(0), inside

    def _categories(self, student_logprobs, rows, where, targets, vocab_size, temperature):
        teacher, inside = self._mixture(rows, where, vocab_size, temperature)
        if inside is not None:  # the target its own category (its mass estimated as in coarsen_with_target)
            inside = inside.scatter(-1, targets.long().unsqueeze(-1), True)
        student = None if student_logprobs is None else coarsen_to(student_logprobs, inside)
        return student, coarsen_to(teacher, inside), targets

    # ---- shared
    @staticmethod
    def _resolved(name: str, params: dict):
        div = get_divergence(name)
        return div, div.resolve_params(**params)

    def _check(self, positions, temperature):
        for signal in self.signals:
            signal._check(positions, temperature)

    def shared_vocab_size(self, student_vocab: int) -> int:
        sizes = {s.shared_vocab_size(student_vocab) for s in self.signals if isinstance(s, TopKTeacherSignal)}
        if len(sizes) > 1:
            raise ValueError(f"the cached teachers are normalised over different vocabularies: {sorted(sizes)}")
        return min(s.shared_vocab_size(student_vocab) for s in self.signals)


class TeacherEnsemble(SeveralTeachers):
    """A student's several teachers, with their weights (normalised by :class:`MultiTeacherSignal`) and the combine:
    ``members``: teacher name -> its :class:`~kd_core.teachers.source.TeacherSource` (a live model, the cache, a
    served teacher).
    ``signal(batch)`` is their combined signal; ``model``: the one of them that samples for on-policy methods
    (`students.<name>.teacher`) when it is a live model, else None."""

    def __init__(self, members: dict[str, TeacherSource], weights: list[float],
                 combine: Literal["sum", "mixture"] = "sum", model: torch.nn.Module | None = None):
        super().__init__(members)
        self.weights, self.combine, self.model = list(weights), combine, model

    def signal(self, batch: Batch) -> MultiTeacherSignal:
        return MultiTeacherSignal([m.signal(batch) for m in self.members], self.weights, self.combine)

    def using(self, model: torch.nn.Module | None) -> TeacherEnsemble:
        return TeacherEnsemble(dict(zip(self.names, self.members)), self.weights, self.combine, model)

    def describe(self) -> dict:
        return self.members[0].describe() | {"teachers": dict(zip(self.names, self.weights)),
                                             "teacher_combine": self.combine}
