"""The teacher's signal for one micro-batch: dense logits (a live teacher) or the cached sparse top-k.

Methods read the teacher through this one interface (``ctx.teacher_signal``), so a method written against it
trains on the live teacher and on the teacher-logit cache alike. Divergence arguments follow
:mod:`kd_core.losses.divergences`: p = teacher, q = student, ``fkl`` = KL(p || q), ``rkl`` = KL(q || p).

Positions: every call takes ``positions`` ``[B, T]`` (bool) over the student's *unshifted* logits ``[B, T, V_s]``
(position t predicts token t + 1: :func:`kd_core.methods.base.prediction_positions`). With N = positions.sum(),
per-position inputs (``targets`` ``[N]``, weights ``[N]``) and outputs ``[N]`` are in the row-major order of
``positions.nonzero()``; outputs ``[B, T]`` are 0 off the positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from kd_core.losses.atkd import decompose, target_uncertainty
from kd_core.losses.chunked import chunk_rows_for, chunked_rows, chunked_sparse_divergence, chunked_token_divergence
from kd_core.losses.divergences import get_divergence
from kd_core.losses.fused import fused_logits_divergence, fused_sparse_divergence, fused_token_divergence
from kd_core.losses.tokens import logprobs
from kd_core.losses.sparse import coarsen_with_target

if TYPE_CHECKING:
    from kd_core.models.lm import HeadInputs
    from kd_core.teachers.cache import TeacherLogitCache

__all__ = ["TeacherSignal", "DenseTeacherSignal", "TopKTeacherSignal"]


class TeacherSignal:
    """What a method gets from the teacher for one micro-batch (the teacher is frozen: no graph into it).

    Subclasses give :meth:`divergence` and :meth:`_categories` (teacher and student on common categories,
    the target token g among them); ATKD's pieces are built on the latter.
    """

    def divergence(self, student_logits: Tensor, positions: Tensor, name: str, temperature: float = 1.0,
                   **params: float) -> Tensor:
        """Per-position divergence ``name`` between teacher p and student q, both at ``temperature``:
        ``[B, T, V_s]`` (with grad), ``[B, T]`` -> ``[B, T]``. Computed in chunks of positions."""
        raise NotImplementedError

    def fused_divergence(self, student: HeadInputs, positions: Tensor, name: str, temperature: float = 1.0,
                         **params: float) -> Tensor:
        """:meth:`divergence` from the student's last hidden states ``[B, T, H]`` and LM head
        (:func:`kd_core.models.lm.lm_head_inputs`) instead of its logits: ``[B, T]``, gradients to the hidden states and
        the head, the batch's logits never formed (:mod:`kd_core.losses.fused`)."""
        raise NotImplementedError

    def _categories(self, student_logprobs: Tensor | None, rows: slice, where: tuple[Tensor, Tensor],
                    targets: Tensor, vocab_size: int, temperature: float) -> tuple[Tensor | None, Tensor, Tensor]:
        """For n of the N positions (``rows``: their slice of the N; ``where``: their (b, t) indices): student
        and teacher log-probs on common categories ``[n, C]`` and the index ``[n]`` of the target category.
        ``student_logprobs`` ``[n, V]`` is at ``temperature`` and sliced to the shared vocabulary ``vocab_size``
        (None: the teacher side only)."""
        raise NotImplementedError

    def _check(self, positions: Tensor, temperature: float) -> None:
        """Raise if this signal cannot serve these positions at this temperature."""

    def shared_vocab_size(self, student_vocab: int) -> int:
        """The vocabulary both distributions are normalised over, given the student's output rows."""
        raise NotImplementedError

    def target_uncertainty(self, student_logits: Tensor, positions: Tensor, targets: Tensor,
                           temperature: float = 1.0) -> Tensor:
        """ATKD's UNC = 1 − p_g per position (g = ``targets``, the reference token): ``[N]``, no grad.
        ``student_logits`` only give the shared vocabulary size (their values are not read)."""
        self._check(positions, temperature)
        vocab = self.shared_vocab_size(student_logits.shape[-1])
        rows_b, rows_t = positions.bool().nonzero(as_tuple=True)
        step = chunk_rows_for(vocab)
        out = []
        with torch.no_grad():
            for i in range(0, rows_b.numel(), step):
                sl = slice(i, i + step)
                _, teacher, g = self._categories(None, sl, (rows_b[sl], rows_t[sl]), targets[sl], vocab, temperature)
                out.append(target_uncertainty(teacher, g))
        return torch.cat(out) if out else torch.zeros(0, device=student_logits.device)

    def decoupled_divergence(self, student_logits: Tensor, positions: Tensor, targets: Tensor, name: str,
                             temperature: float = 1.0, tkd_weight: float | Tensor = 1.0, dkd_weight: float = 1.0,
                             **params: float) -> Tensor:
        """ATKD's weighted parts per position, ``w_t · TKD + w_d · DKD`` (:func:`kd_core.losses.atkd.decompose`:
        TKD = D on the binary target / non-target distributions, DKD = D on the renormalised non-target
        distributions; D = divergence ``name``, teacher p, student q, both at ``temperature``).

        ``tkd_weight``: a float or ``[N]`` (ATKD: tkd_weight on hard positions, 0 on easy ones; where it is 0
        the TKD term is left out, not multiplied). ``[B, T, V_s]`` (with grad) -> ``[B, T]``.
        """
        self._check(positions, temperature)
        resolved = get_divergence(name).resolve_params(**params)
        vocab = self.shared_vocab_size(student_logits.shape[-1])
        rows_b, rows_t = positions.bool().nonzero(as_tuple=True)
        w_t = torch.as_tensor(tkd_weight, dtype=torch.float32, device=student_logits.device)
        w_t = w_t.expand(rows_b.numel()) if w_t.dim() == 0 else w_t

        def row_fn(x: Tensor, sl: slice) -> Tensor:
            s, t, g = self._categories(logprobs(x[..., :vocab], temperature), sl, (rows_b[sl], rows_t[sl]),
                                       targets[sl], vocab, temperature)
            tkd, dkd, _ = decompose(s, t, g, name, **resolved)
            w = w_t[sl].to(tkd.dtype)
            return torch.where(w != 0, w * tkd, 0.0) + dkd_weight * dkd

        return chunked_rows(student_logits, positions, row_fn)


class DenseTeacherSignal(TeacherSignal):
    """The teacher's full logits ``[B, T, V_t]`` (unshifted, like the student's), or a function computing them
    on first use (a live teacher runs only if the method reads its signal). Padded embedding rows beyond the
    student's vocabulary are sliced off (:func:`kd_core.losses.tokens.shared_vocab`).

    ``head_inputs``: the teacher's last hidden states and LM head (or a function computing them on first use,
    None when its head is not a plain projection), which :meth:`fused_divergence` reads instead of the logits."""

    def __init__(self, logits: Tensor | Callable[[], Tensor],
                 head_inputs: HeadInputs | Callable[[], HeadInputs | None] | None = None):
        self._logits = logits
        self._head_inputs = head_inputs

    @property
    def logits(self) -> Tensor:
        if callable(self._logits):
            self._logits = self._logits()
        return self._logits

    def divergence(self, student_logits, positions, name, temperature=1.0, **params):
        return chunked_token_divergence(student_logits, self.logits, positions, name, temperature=temperature,
                                        **params)

    def fused_divergence(self, student, positions, name, temperature=1.0, **params):
        if callable(self._head_inputs):
            self._head_inputs = self._head_inputs()
        teacher = self._head_inputs
        if teacher is None:  # the teacher's logits, the student's still fused
            return fused_logits_divergence(student.hidden, student.weight, self.logits, name, temperature,
                                           student_bias=student.bias, mask=positions, **params)
        return fused_token_divergence(student.hidden, student.weight, teacher.hidden, teacher.weight, name,
                                      temperature, student_bias=student.bias, teacher_bias=teacher.bias,
                                      mask=positions, **params)

    def shared_vocab_size(self, student_vocab: int) -> int:
        return min(student_vocab, self.logits.shape[-1])

    def _categories(self, student_logprobs, rows, where, targets, vocab_size, temperature):
        teacher = logprobs(self.logits[where[0], where[1], :vocab_size], temperature)
        return student_logprobs, teacher, targets


class TopKTeacherSignal(TeacherSignal):
    """The teacher's cached top-k (:mod:`kd_core.teachers.cache`) for the N positions of a micro-batch:
    top_logprobs ``[N, k]``, top_ids ``[N, k]`` (int64), tail_logmass ``[N]`` (log of the mass outside the
    top-k, -inf when k = V), normalised over ``vocab_size`` tokens at ``temperature``. Divergences are taken
    between the teacher and the student coarsened to the k tokens + one tail bucket
    (:mod:`kd_core.losses.sparse`: exact when k = V); ATKD's target split uses
    :func:`kd_core.losses.sparse.coarsen_with_target` (exact when k = V; the estimate used for a target
    outside the top-k is documented there).
    """

    def __init__(self, top_logprobs: Tensor, top_ids: Tensor, tail_logmass: Tensor, vocab_size: int,
                 temperature: float):
        self.top_logprobs, self.top_ids, self.tail_logmass = top_logprobs, top_ids.long(), tail_logmass
        self.vocab_size, self.temperature = int(vocab_size), float(temperature)

    @classmethod
    def from_cache(cls, cache: TeacherLogitCache, batch: dict[str, Tensor],
                   device: torch.device | str) -> TopKTeacherSignal:
        """The cached rows of ``batch``'s response positions (found by content), moved to ``device``."""
        top_lp, top_ids, tail = cache.rows_for(batch)
        return cls(top_lp.to(device), top_ids.to(device), tail.to(device), cache.vocab_size, cache.temperature)

    def _check(self, positions: Tensor, temperature: float) -> None:
        if temperature != self.temperature:
            raise ValueError(f"the teacher cache holds log-probs at temperature {self.temperature}, the method asks "
                             f"for {temperature}")
        n = int(positions.sum())
        if self.top_logprobs.shape[0] != n:
            raise ValueError(f"{self.top_logprobs.shape[0]} cached teacher rows for {n} masked positions")

    def divergence(self, student_logits, positions, name, temperature=1.0, **params):
        self._check(positions, temperature)
        return chunked_sparse_divergence(student_logits, positions, self.top_logprobs, self.top_ids,
                                         self.tail_logmass, name, temperature=temperature,
                                         vocab_size=self.vocab_size, **params)

    def fused_divergence(self, student, positions, name, temperature=1.0, **params):
        self._check(positions, temperature)
        self.shared_vocab_size(student.weight.shape[0])
        return fused_sparse_divergence(student.hidden, student.weight, self.top_logprobs, self.top_ids,
                                       self.tail_logmass, name, temperature=temperature, vocab_size=self.vocab_size,
                                       student_bias=student.bias, mask=positions, **params)

    def shared_vocab_size(self, student_vocab: int) -> int:
        if student_vocab < self.vocab_size:
            raise ValueError(f"the student has {student_vocab} output rows, the cache a vocabulary of {self.vocab_size}")
        return self.vocab_size

    def _categories(self, student_logprobs, rows, where, targets, vocab_size, temperature):
        return coarsen_with_target(student_logprobs, self.top_logprobs[rows], self.top_ids[rows],
                                   self.tail_logmass[rows], targets, vocab_size)
