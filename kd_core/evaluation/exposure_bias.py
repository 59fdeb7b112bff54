"""Exposure bias as ExAccErr (Arora et al. 2022; OKD paper eqs. 5-7), the teacher p being the oracle for the
student q (x the prompt, t = 1..l generation steps, KL(p || q) in closed form at each context)::

    R(l)   = sum_{t<=l} E_{y<t ~ q(.|x)} [ KL( p(.|y<t,x) || q(.|y<t,x) ) ]          (eq. 6)
    eps(l) = (1/l) sum_{t<=l} E_{y<t ~ p(.|x)} [ KL( p(.|y<t,x) || q(.|y<t,x) ) ]    (eq. 7)
    ExAccErr(l) = (R(l) - l*eps(l)) / (l*eps(l)) * 100                               (eq. 5)

The estimator, its error bar and the sampling details: docs/methods.md, "Exposure bias (ExAccErr)".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from kd_core.data.tokenize import left_pad
from kd_core.models.lm import causal_lm_logits, eval_mode, length_limit, model_device, shared_vocab_size
from kd_core.losses.divergences import fkl
from kd_core.losses.tokens import shared_vocab

__all__ = ["exaccerr", "exaccerr_from_step_kl", "sample_prefixes", "per_step_kl"]


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def _as_id_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _length_sorted_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@contextmanager
def _blank_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily give the model a default ``GenerationConfig`` so checkpoint defaults do not leak in."""
    from transformers import GenerationConfig

    had = hasattr(model, "generation_config")
    old = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        if had:
            model.generation_config = old
        else:  # pragma: no cover
            del model.generation_config


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _mask_processor(vocab_limit: int | None, banned_ids: list[int]):
    from transformers import LogitsProcessor

    class _MaskVocabAndEos(LogitsProcessor):
        """Sets logits of ids >= ``vocab_limit`` and of ``banned_ids`` to -inf."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            scores = scores.clone()
            if vocab_limit is not None and scores.shape[-1] > vocab_limit:
                scores[:, vocab_limit:] = -float("inf")
            for b in banned_ids:
                if 0 <= b < scores.shape[-1]:
                    scores[:, b] = -float("inf")
            return scores

    return _MaskVocabAndEos()


# --------------------------------------------------------------------------------------------------------
# sampling and teacher forcing
# --------------------------------------------------------------------------------------------------------
def sample_prefixes(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    length: int,
    *,
    seed: int = 0,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 16,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Sample one continuation of exactly ``length`` tokens per prompt, at temperature 1 (ancestral
    sampling: ``do_sample=True, temperature=1, top_p=1, top_k=0``; EOS ids and ids ``>= vocab_limit``
    masked, the rest of the distribution renormalised).

    Args:
        prompt_ids: N unpadded, non-empty prompts (token id lists).
        length: tokens to generate per prompt (EOS ids suppressed: every prefix has exactly ``length`` tokens).
        seed: ``torch.manual_seed(seed)`` once before the first batch (caller's RNG state restored after).
        vocab_limit: ids ``>= vocab_limit`` are never sampled (shared vocabulary with another model).

    Returns:
        N lists of ``length`` token ids, in the order of ``prompt_ids``.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample_prefixes: empty prompt (give at least one token, e.g. BOS)")
    from transformers import LogitsProcessorList

    eos = _as_id_list(eos_token_id)
    device = model_device(model)
    out: list[list[int] | None] = [None] * len(prompt_ids)
    gen_kwargs = dict(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=int(length),
        pad_token_id=int(pad_token_id),
        eos_token_id=(eos if eos else None),
        logits_processor=LogitsProcessorList([_mask_processor(vocab_limit, eos)]),
    )
    if eos:
        gen_kwargs["min_new_tokens"] = int(length)
    with eval_mode(model), torch.inference_mode(), _blank_generation_config(model), _seeded(seed, device):
        for idx in _length_sorted_batches(prompt_ids, batch_size):
            ids, mask = left_pad([prompt_ids[i] for i in idx], pad_token_id)
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
            gen = seqs[:, ids.shape[1] :].cpu()
            if gen.shape[1] != length:
                raise RuntimeError(f"generate returned {gen.shape[1]} new tokens, expected {length}")
            for row, i in enumerate(idx):
                out[i] = gen[row].tolist()
    return out  # type: ignore[return-value]


def per_step_kl(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    prefixes: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 16,
) -> torch.Tensor:
    """Per-step forward KL(p || q) along prompt + prefix, teacher-forced.

    Step t (1-based) is the next-token distribution given the prompt and ``prefix[:t-1]``, i.e. the
    distribution that predicts ``prefix[t-1]``.

    Args:
        prompt_ids: N prompts; prefixes: N continuations, all of the same length L.

    Returns:
        ``[N, L]`` float64 CPU tensor of KL values (shared vocabulary, temperature 1).
    """
    if len(prompt_ids) != len(prefixes):
        raise ValueError("per_step_kl: prompt_ids and prefixes differ in length")
    if not prefixes:
        return torch.zeros((0, 0), dtype=torch.float64)
    L = len(prefixes[0])
    if L < 1 or any(len(y) != L for y in prefixes):
        raise ValueError("per_step_kl: all prefixes must have the same length >= 1")
    dev_s, dev_t = model_device(student), model_device(teacher)
    out = torch.empty((len(prefixes), L), dtype=torch.float64)
    with eval_mode(student, teacher), torch.inference_mode():
        for idx in _length_sorted_batches(prompt_ids, batch_size):
            ids, mask = left_pad([prompt_ids[i] for i in idx], pad_token_id)
            pre = torch.as_tensor([list(prefixes[i]) for i in idx], dtype=torch.long)
            seq = torch.cat([ids, pre], dim=1)[:, :-1]  # last token's prediction is not needed
            msk = torch.cat([mask, torch.ones_like(pre)], dim=1)[:, :-1]
            s = causal_lm_logits(student, seq.to(dev_s), msk.to(dev_s), logits_to_keep=L)  # [B, L, V_s]
            t = causal_lm_logits(teacher, seq.to(dev_t), msk.to(dev_t), logits_to_keep=L).to(dev_s)
            s, t = shared_vocab(s, t)
            kl = fkl(torch.log_softmax(s, -1), torch.log_softmax(t, -1))  # KL(p || q): (student, teacher)
            out[idx] = kl.double().cpu()
    return out


# --------------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------------
def exaccerr_from_step_kl(
    kl_student_prefixes: torch.Tensor | np.ndarray,
    kl_teacher_prefixes: torch.Tensor | np.ndarray,
    lengths: Sequence[int],
    *,
    confidence: float = 0.95,
    ci_method: str = "bootstrap",
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """ExAccErr(l) and its error bar from per-step KL values k[i, s, t].

    Per prompt i, a_i(l) = mean over the student samples of sum_{t<=l} k[t] and b_i(l) the same over the
    teacher samples; R(l) = mean_i a_i(l), eps(l) = mean_i b_i(l) / l, ExAccErr(l) = 100 (R / (l eps) - 1), a
    ratio of two means over the same prompts. Error bar over prompts: stderr by the delta method,
    Var(r) ~= sum_i (a_i - r b_i)^2 / (n (n - 1) bbar^2); CI the bootstrap percentile interval over
    ``n_bootstrap`` prompt resamples (``default_rng(seed)``) or, with ``ci_method="delta"``, value +/-
    t_{n-1} stderr. NaN stderr/CI with < 2 prompts; NaN value/stderr/CI and a RuntimeWarning where
    l eps(l) = 0 (e.g. a model against itself).

    Args:
        kl_student_prefixes: ``[n_prompts, n_samples, L]`` KL(p||q) along student-sampled prefixes (for R).
        kl_teacher_prefixes: ``[n_prompts, n_samples', L]`` along teacher-sampled prefixes (for eps).
        lengths: the l values to report, each in 1..L.
        ci_method: ``"bootstrap"`` (percentile, over prompts) or ``"delta"`` (t interval with the
            delta-method stderr).

    Returns:
        ``{l: {"value", "stderr", "ci_low", "ci_high", "n", "R", "epsilon"}}`` with ``value`` in percent,
        ``n`` the number of prompts, ``R`` = R(l) and ``epsilon`` = eps(l).
    """
    from scipy import stats as sps

    if ci_method not in ("bootstrap", "delta"):
        raise ValueError(f"ci_method must be 'bootstrap' or 'delta', got {ci_method!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    kq = np.asarray(kl_student_prefixes, dtype=np.float64)
    kp = np.asarray(kl_teacher_prefixes, dtype=np.float64)
    if kq.ndim != 3 or kp.ndim != 3 or kq.shape[0] != kp.shape[0] or kq.shape[2] != kp.shape[2]:
        raise ValueError(
            f"expected [n_prompts, n_samples, L] arrays with equal n_prompts and L, got {kq.shape} and {kp.shape}"
        )
    n, L = kq.shape[0], kq.shape[2]
    if n == 0:
        raise ValueError("exaccerr_from_step_kl: no prompts")
    for l in lengths:
        if not 1 <= int(l) <= L:
            raise ValueError(f"length {l} outside 1..{L}")
    # a[i, l-1], b[i, l-1]: per-prompt mean (over samples) of the cumulative KL up to step l.
    a_all = kq.cumsum(axis=2).mean(axis=1)  # [n, L]
    b_all = kp.cumsum(axis=2).mean(axis=1)
    rng = np.random.default_rng(seed)
    boot_idx = rng.integers(0, n, size=(n_bootstrap, n)) if (ci_method == "bootstrap" and n >= 2) else None
    alpha = 1.0 - confidence
    nan = float("nan")
    result: dict[int, dict[str, float]] = {}
    for l in sorted({int(x) for x in lengths}):
        a, b = a_all[:, l - 1], b_all[:, l - 1]
        abar, bbar = float(a.mean()), float(b.mean())
        entry: dict[str, float] = {"n": n, "R": abar, "epsilon": bbar / l}
        if not bbar > 0.0:
            warnings.warn(
                f"ExAccErr({l}) undefined: l*eps(l) = {bbar} (student equals teacher on teacher-sampled contexts); "
                "returning NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            entry.update(value=nan, stderr=nan, ci_low=nan, ci_high=nan)
            result[l] = entry
            continue
        r = abar / bbar
        value = 100.0 * (r - 1.0)
        if n >= 2:
            resid = a - r * b
            stderr = 100.0 * math.sqrt(float((resid**2).sum()) / (n * (n - 1))) / bbar
            if ci_method == "delta":
                half = float(sps.t.ppf(1.0 - alpha / 2.0, df=n - 1)) * stderr
                lo, hi = value - half, value + half
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios = a[boot_idx].mean(axis=1) / b[boot_idx].mean(axis=1)
                boot = 100.0 * (ratios - 1.0)
                boot = boot[np.isfinite(boot)]
                if boot.size:
                    lo, hi = (float(v) for v in np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0]))
                else:  # pragma: no cover - every resample had zero denominator
                    lo = hi = nan
        else:
            stderr = lo = hi = nan
        entry.update(value=value, stderr=stderr, ci_low=lo, ci_high=hi)
        result[l] = entry
    return result


def exaccerr(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: list[list[int]],
    lengths: list[int],
    *,
    n_samples: int = 1,
    seed: int = 0,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 16,
    confidence: float = 0.95,
    ci_method: str = "bootstrap",
    n_bootstrap: int = 2000,
) -> dict[int, dict[str, float]]:
    """ExAccErr(l) of ``student`` w.r.t. the oracle ``teacher`` for each l in ``lengths`` (eqs. 5-7).

    Samples ``n_samples`` prefixes of length max(lengths) per prompt from the student (seed ``seed``) and
    from the teacher (seed ``seed + 1``), teacher-forces both models over them, and aggregates with
    :func:`exaccerr_from_step_kl`. Sampling, padding and the error bar: docs/methods.md.

    Args:
        prompt_ids: n unpadded prompts (token id lists, each non-empty).
        lengths: generation steps l at which to report ExAccErr.
        pad_token_id: id used for left padding (any id; padded positions are masked).
        eos_token_id: id(s) suppressed during sampling so every prefix has full length.

    Returns:
        ``{l: {"value", "stderr", "ci_low", "ci_high", "n", "R", "epsilon"}}``; ``value`` in percent.
        NaN value/stderr/CI (with a RuntimeWarning) where l*eps(l) == 0.
    """
    if not prompt_ids:
        raise ValueError("exaccerr: no prompts")
    if not lengths:
        raise ValueError("exaccerr: no lengths")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    L = max(int(x) for x in lengths)
    if min(int(x) for x in lengths) < 1:
        raise ValueError("lengths must be >= 1")
    longest = max(len(p) for p in prompt_ids) + L
    limit = length_limit(student, teacher)
    if limit is not None and longest > limit:
        raise ValueError(f"longest prompt + {L} generated tokens = {longest} exceeds the model's {limit} positions")
    vocab_limit = shared_vocab_size(student, teacher)
    items = [list(p) for p in prompt_ids for _ in range(n_samples)]  # prompt i -> rows i*n_samples + s
    common = dict(pad_token_id=pad_token_id, eos_token_id=eos_token_id, batch_size=batch_size, vocab_limit=vocab_limit)
    y_q = sample_prefixes(student, items, L, seed=seed, **common)
    y_p = sample_prefixes(teacher, items, L, seed=seed + 1, **common)
    kl_q = per_step_kl(student, teacher, items, y_q, pad_token_id=pad_token_id, batch_size=batch_size)
    kl_p = per_step_kl(student, teacher, items, y_p, pad_token_id=pad_token_id, batch_size=batch_size)
    n = len(prompt_ids)
    return exaccerr_from_step_kl(
        kl_q.reshape(n, n_samples, L),
        kl_p.reshape(n, n_samples, L),
        lengths,
        confidence=confidence,
        ci_method=ci_method,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
