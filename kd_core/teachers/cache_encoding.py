"""How the teacher-logit cache stores its rows on disk: the top-k log-probabilities at `teacher_cache.logprobs`
precision (float16 by default, or float32) and the token ids in the narrowest integer type the vocabulary allows
(uint16 for V <= 65536, else int32); the tail log-mass and the offsets stay float32 and int64.

Bytes per response token at k = 64: float32 + int32 (the format before) 64 · 4 + 64 · 4 + 4 = 516; float16 +
uint16 64 · 2 + 64 · 2 + 4 = 260.

Decoding (:func:`decode_rows`, per batch): ids to int64; float16 log-probs to float32, then renormalised together
with the tail, ``lp_i - logsumexp(lp_1..lp_k, tail)``, so that the k + 1 buckets are a distribution again (rounding
to float16 moves their total mass by ~1e-4). float32 rows are returned as stored (as before: exact at k = V).
The decoded distribution's KL to the float32 one over the k + 1 buckets is :func:`bucket_kl` (measured on
SmolLM2-135M's cache of Dolly: docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOGPROB_DTYPES", "id_dtype_name", "encode", "decode_rows", "encoding_of", "bucket_kl"]

LOGPROB_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_ID_DTYPES = {"uint16": torch.uint16, "int32": torch.int32}
UINT16_VOCAB = 2 ** 16  # ids 0 .. 65535


def id_dtype_name(vocab_size: int) -> str:
    """The narrowest id type for a vocabulary of `vocab_size` tokens: uint16 up to 65536, else int32."""
    return "uint16" if vocab_size <= UINT16_VOCAB else "int32"


def encode(tensors: dict[str, Tensor], logprobs: str, vocab_size: int) -> dict[str, Tensor]:
    """The built cache's float32 / int32 tensors (:func:`kd_core.teachers.cache.build_cache`) in the stored types."""
    out = dict(tensors)
    out["top_logprobs"] = tensors["top_logprobs"].to(LOGPROB_DTYPES[logprobs])
    ids = tensors["top_ids"]
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"a cached token id {int(ids.max())} is outside the vocabulary of {vocab_size}")
    out["top_ids"] = ids.to(_ID_DTYPES[id_dtype_name(vocab_size)])
    return out


def encoding_of(tensors: dict[str, Tensor]) -> dict[str, str]:
    """What the stored tensors are (the manifest's `encoding`): {tensor name: dtype name}."""
    return {name: str(t.dtype).removeprefix("torch.") for name, t in sorted(tensors.items())}


def decode_rows(top_logprobs: Tensor, top_ids: Tensor, tail_logmass: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stored rows as the losses read them: (log-probs float32 [N, k], ids int64 [N, k], tail float32 [N]);
    reduced-precision log-probs renormalised with the tail (module docstring)."""
    ids = top_ids.long()
    if top_logprobs.dtype == torch.float32:
        return top_logprobs, ids, tail_logmass
    lp, tail = top_logprobs.float(), tail_logmass.float()
    norm = torch.logsumexp(torch.cat([lp, tail.unsqueeze(-1)], -1), -1)
    return lp - norm.unsqueeze(-1), ids, tail - norm


def bucket_kl(ref_logprobs: Tensor, ref_tail: Tensor, logprobs: Tensor, tail: Tensor) -> Tensor:
    """KL(ref || decoded) per row over the k + 1 buckets (the top-k tokens, same ids, and the tail), nats: [N];
    both normalised in float64 first (a float32 row's own rounding is ~1e-7)."""
    ref = torch.log_softmax(torch.cat([ref_logprobs.double(), ref_tail.double().unsqueeze(-1)], -1), -1)
    dec = torch.log_softmax(torch.cat([logprobs.double(), tail.double().unsqueeze(-1)], -1), -1)
    p = ref.exp()
    terms = torch.where(p > 0, p * (ref - dec), torch.zeros_like(p))
    return terms.sum(-1)
