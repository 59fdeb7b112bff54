"""Teacher-forced token statistics: top-1 agreement (OKD eq. 3: per sentence, then averaged over sentences; and
token-pooled), teacher uncertainty UNC (eq. 4), per-token
forward KL(p || q) (p = teacher, q = student), logit standard deviations, and UNC-bucketed summaries (OKD
Figures 2 and 5), over the response tokens (labels[:, 1:] != IGNORE_INDEX) of right-padded batches. Logits
are sliced to the shared vocabulary when the models differ by padded rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.models.lm import causal_lm_logits, eval_mode, model_device, target_logprobs
from kd_core.losses.divergences import fkl
from kd_core.losses.sparse import sparse_token_divergence
from kd_core.losses.tokens import shared_vocab

if TYPE_CHECKING:
    from kd_core.teachers.signal import TopKTeacherSignal

__all__ = ["TokenStats", "collect_token_stats", "collect_topk_token_stats", "top1_agreement", "top1_agreement_tokens",
           "unc_buckets"]


# --------------------------------------------------------------------------------------------------------
# token statistics
# --------------------------------------------------------------------------------------------------------
@dataclass
class TokenStats:
    """Per-response-token statistics, each a 1-D float32 CPU tensor ``[N]`` over all response tokens
    (batches concatenated in order; within a batch, row-major over ``[B, T-1]``).

    Attributes:
        unc: teacher uncertainty (OKD eq. 4) ``1 - p(g_t)`` = sum of teacher softmax mass off the
            ground-truth token, at temperature 1.
        kl: forward KL(p || q) at the requested temperature (both distributions divided by it).
        agree: 1.0 where ``argmax p == argmax q`` (OKD eq. 3), else 0.0.
        student_logit_std: std over the (shared) vocabulary of the student's raw logits (population std,
            ddof=0) - the "STD" of OKD Figures 2/5.
        teacher_logit_std: same for the teacher.
        student_nll: ``-log q(g_t)`` at temperature 1.
        sentence: int64, the index of the sentence (batch row) the token belongs to, 0-based in collection
            order (``cat`` renumbers its parts consecutively); rows without response tokens have no tokens.

    Against a teacher known by its top-k log-probs only (``collect_topk_token_stats``): ``kl`` is the top-k + tail
    approximation, ``unc`` and ``teacher_logit_std`` are NaN (not known).
    """

    unc: torch.Tensor
    kl: torch.Tensor
    agree: torch.Tensor
    student_logit_std: torch.Tensor
    teacher_logit_std: torch.Tensor
    student_nll: torch.Tensor
    sentence: torch.Tensor

    def __post_init__(self) -> None:
        n = None
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor) or v.dim() != 1:
                raise ValueError(f"TokenStats.{f.name} must be a 1-D tensor")
            if n is None:
                n = v.numel()
            elif v.numel() != n:
                raise ValueError(f"TokenStats fields differ in length ({f.name}: {v.numel()} vs {n})")

    def __len__(self) -> int:
        return int(self.unc.numel())

    @classmethod
    def empty(cls) -> "TokenStats":
        z = torch.zeros(0, dtype=torch.float32)
        return cls(*(z.clone() for _ in fields(cls)[:-1]), sentence=torch.zeros(0, dtype=torch.long))

    @classmethod
    def cat(cls, parts: Iterable["TokenStats"]) -> "TokenStats":
        parts = list(parts)
        if not parts:
            return cls.empty()
        offsets, start = [], 0
        for p in parts:  # sentence indices of each part follow those of the parts before it
            offsets.append(start)
            start += int(p.sentence.max()) + 1 if len(p) else 0
        out = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls) if f.name != "sentence"}
        return cls(**out, sentence=torch.cat([p.sentence + o for p, o in zip(parts, offsets)]))


def _batch_token_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
    sentence: torch.Tensor,
) -> TokenStats:
    """``[N, V_s]``, ``[N, V_t]`` logits at response positions, ``[N]`` targets and sentence indices -> TokenStats."""
    s, t = shared_vocab(student_logits, teacher_logits)
    if int(targets.max()) >= s.shape[-1]:
        raise ValueError(f"a label id ({int(targets.max())}) is outside the shared vocabulary ({s.shape[-1]})")
    t_logp = F.log_softmax(t, dim=-1)
    # UNC as the sum of off-target mass (no cancellation in 1 - p when p ~ 1).
    unc = t_logp.exp().scatter(-1, targets.long().unsqueeze(-1), 0.0).sum(-1)
    student_nll = -target_logprobs(s, targets.long())
    agree = (t.argmax(-1) == s.argmax(-1)).float()
    if temperature != 1.0:
        t_logp = F.log_softmax(t / temperature, dim=-1)
    s_logp = F.log_softmax(s / temperature, dim=-1)  # (s / 1.0 is s exactly)
    kl = fkl(s_logp, t_logp)  # KL(p || q), arguments are (student, teacher)
    return TokenStats(
        unc=unc.cpu(),
        kl=kl.cpu(),
        agree=agree.cpu(),
        student_logit_std=s.std(-1, correction=0).cpu(),
        teacher_logit_std=t.std(-1, correction=0).cpu(),
        student_nll=student_nll.cpu(),
        sentence=sentence.long().cpu(),
    )


def collect_token_stats(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    temperature: float = 1.0,
) -> TokenStats:
    """Teacher-force both models over ``batches`` and collect per-response-token statistics.

    Args:
        student, teacher: HF causal LMs (may sit on different devices; may differ in vocab size by padded
            rows). They are put in ``eval()`` for the call and their training flags restored afterwards.
        batches: iterable of dicts with ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B, T]``.
            Positions with ``labels == -100`` (prompt, padding) are excluded.
        temperature: applied to both distributions for ``kl`` only (UNC, NLL, agreement and STDs use raw
            logits).

    Returns:
        ``TokenStats`` with 1-D tensors of length N = number of response tokens over all batches.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dev_s, dev_t = model_device(student), model_device(teacher)
    parts: list[TokenStats] = []
    with eval_mode(student, teacher), torch.inference_mode():
        for batch in batches:
            input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            if input_ids.shape != labels.shape or input_ids.shape != mask.shape:
                raise ValueError("input_ids, attention_mask and labels must have the same [B, T] shape")
            targets = labels[:, 1:]
            sel = targets != IGNORE_INDEX  # [B, T-1]
            if not bool(sel.any()):
                continue
            s_logits = causal_lm_logits(student, input_ids.to(dev_s), mask.to(dev_s))[:, :-1]
            s_logits = s_logits[sel.to(dev_s)]  # [N, V_s]
            t_logits = causal_lm_logits(teacher, input_ids.to(dev_t), mask.to(dev_t))[:, :-1]
            t_logits = t_logits[sel.to(dev_t)].to(dev_s)  # [N, V_t]
            rows = sel.nonzero()[:, 0]  # each response token's row, in the row-major order of `sel`
            parts.append(_batch_token_stats(s_logits, t_logits, targets[sel].to(dev_s), float(temperature),
                                            torch.unique(rows, return_inverse=True)[1]))
    return TokenStats.cat(parts)


def collect_topk_token_stats(
    student: torch.nn.Module,
    teacher_signal: Callable[[Mapping[str, torch.Tensor]], TopKTeacherSignal],
    batches: Iterable[Mapping[str, torch.Tensor]],
) -> TokenStats:
    """``collect_token_stats`` against a teacher known by its top-k log-probs at temperature 1 (a teacher served by
    another process: ``teacher_signal(batch)``, e.g. :meth:`kd_core.teachers.served.ServedTeacher.signal`, gives the
    batch's response positions in the same order). Agreement compares the student's argmax (over the teacher's
    vocabulary) with the teacher's top-1 id, exact for any k >= 1; ``kl`` is KL(p~ || q~) over the teacher's k
    tokens + one tail bucket (:mod:`kd_core.losses.sparse`: <= the full KL, equal at k = V); ``unc`` and
    ``teacher_logit_std`` are NaN (the teacher's full distribution is not known)."""
    dev = model_device(student)
    parts: list[TokenStats] = []
    with eval_mode(student), torch.inference_mode():
        for batch in batches:
            targets = batch["labels"][:, 1:]
            sel = targets != IGNORE_INDEX  # [B, T-1]
            if not bool(sel.any()):
                continue
            teacher = teacher_signal(batch)
            vocab = teacher.vocab_size
            s = causal_lm_logits(student, batch["input_ids"].to(dev), batch["attention_mask"].to(dev))[:, :-1]
            s = s[sel.to(dev)][:, :vocab].float()  # [N, V]
            top_lp, top_ids, tail = (x.to(dev) for x in (teacher.top_logprobs, teacher.top_ids, teacher.tail_logmass))
            if top_ids.shape[0] != s.shape[0]:
                raise ValueError(f"{top_ids.shape[0]} teacher rows for {s.shape[0]} response tokens")
            kl = sparse_token_divergence(s, top_lp, top_ids, tail, "fkl")
            nan = torch.full((s.shape[0],), float("nan"))
            parts.append(TokenStats(
                unc=nan, kl=kl.float().cpu(), agree=(top_ids[:, 0] == s.argmax(-1)).float().cpu(),
                student_logit_std=s.std(-1, correction=0).cpu(), teacher_logit_std=nan.clone(),
                student_nll=-target_logprobs(s, targets[sel].to(dev).long()).float().cpu(),
                sentence=torch.unique(sel.nonzero()[:, 0], return_inverse=True)[1].cpu()))
    return TokenStats.cat(parts)


def top1_agreement(stats: TokenStats) -> float:
    """Top-1 agreement as OKD eq. 3: per sentence s with N_s response tokens,
    TA_s = (1 / N_s) * sum_i 1(argmax p_i^t = argmax p_i^s), then the mean of TA_s over the sentences (each
    sentence weighs the same, however long). NaN if there is no token."""
    if len(stats) == 0:
        return float("nan")
    _, sentence = torch.unique(stats.sentence, return_inverse=True)
    n = int(sentence.max()) + 1
    agreed = torch.zeros(n, dtype=torch.float64).index_add_(0, sentence, stats.agree.double())
    tokens = torch.bincount(sentence, minlength=n).double()
    return float((agreed / tokens).mean())


def top1_agreement_tokens(stats: TokenStats) -> float:
    """Top-1 agreement pooled over all response tokens: sum_tokens 1(argmax p^t = argmax p^s) / #tokens (long
    sentences weigh more than in ``top1_agreement``); NaN if there are none."""
    if len(stats) == 0:
        return float("nan")
    return float(stats.agree.double().mean())


def unc_buckets(stats: TokenStats, n_buckets: int = 3) -> list[dict[str, float]]:
    """Split tokens into ``n_buckets`` equal-count groups by teacher UNC (easy -> hard) and summarise each.

    Tokens are sorted by UNC (stable sort, so ties keep their collection order) and cut into
    ``n_buckets`` contiguous groups whose sizes differ by at most one (``torch.tensor_split``), i.e. the
    empirical UNC quantiles are the edges. Groups therefore partition all tokens and are ordered by UNC;
    tokens with equal UNC may fall on both sides of an edge. Because UNC depends on the teacher and the
    data only, every student evaluated against the same teacher and data gets the same buckets.

    Returns:
        A list (easy first) of dicts with ``bucket, unc_low, unc_high, unc_mean, count, logit_std``
        (mean student logit STD), ``teacher_logit_std, kl, top1_agreement, student_nll`` (means).

    Raises:
        ValueError: if there are fewer tokens than buckets.
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    if len(stats) < n_buckets:
        raise ValueError(f"unc_buckets: {len(stats)} tokens cannot fill {n_buckets} buckets")
    order = torch.argsort(stats.unc, stable=True)
    out: list[dict[str, float]] = []
    for i, idx in enumerate(torch.tensor_split(order, n_buckets)):
        unc = stats.unc[idx].double()
        out.append(
            {
                "bucket": i,
                "unc_low": float(unc.min()),
                "unc_high": float(unc.max()),
                "unc_mean": float(unc.mean()),
                "count": int(idx.numel()),
                "logit_std": float(stats.student_logit_std[idx].double().mean()),
                "teacher_logit_std": float(stats.teacher_logit_std[idx].double().mean()),
                "kl": float(stats.kl[idx].double().mean()),
                "top1_agreement": float(stats.agree[idx].double().mean()),
                "student_nll": float(stats.student_nll[idx].double().mean()),
            }
        )
    return out
