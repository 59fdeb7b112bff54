"""The compact teacher cache (kd_core/teachers/cache_encoding.py): float16 log-probs and ids in the narrowest integer
type, their bytes per token, the decoded distribution's KL to the float32 one, the KD loss and gradient on it, the
manifest's encoding and size, and caches of the format before (float32 / int32) read as they are or rebuilt."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd_core.pipeline.console import note
from kd_core.io import write_checksums
from kd_core.teachers.cache import TeacherLogitCache
from kd_core.teachers.cache_encoding import bucket_kl, decode_rows, encode, id_dtype_name
from kd_core.teachers.cache_key import MANIFEST, TENSORS, cache_key, read_manifest, stale_fields
from kd_core.losses.sparse import sparse_token_divergence, top_k_with_tail
from kd_core.losses.tokens import logprobs
from kd_core.run import load_train_set
from kd_core.stages.cache_teacher import cache_teacher
from tests.test_logit_cache import _cached_student, _cfg, prepared  # noqa: F401  (the module's fixture)


def _rows(n: int = 300, vocab: int = 49152, k: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float32 cache of n positions of peaked next-token distributions (a few likely tokens, a long tail)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 2.0
    logits[:, :8] += 10 * torch.rand(n, 8, generator=g)  # a handful of strong candidates per position
    lp, ids, tail = top_k_with_tail(logprobs(logits, 1.0), k)
    return {"top_logprobs": lp.float(), "top_ids": ids.to(torch.int32), "tail_logmass": tail.float(),
            "offsets": torch.tensor([0, n], dtype=torch.int64)}


def test_ids_take_the_narrowest_integer_type_the_vocabulary_allows():
    assert id_dtype_name(49152) == id_dtype_name(65536) == "uint16" and id_dtype_name(65537) == "int32"
    rows = _rows(n=3, vocab=40, k=4)
    rows["top_ids"][0, 0] = 65535
    stored = encode(rows, "float16", 65536)
    assert stored["top_ids"].dtype == torch.uint16 and int(decode_rows(*_parts(stored))[1][0, 0]) == 65535
    assert encode(rows, "float16", 262144)["top_ids"].dtype == torch.int32  # e.g. Gemma 3's vocabulary
    with pytest.raises(ValueError, match="a cached token id 65535 is outside the vocabulary of 40"):
        encode(rows, "float16", 40)


def _parts(t: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t["top_logprobs"], t["top_ids"], t["tail_logmass"]


def _bytes_per_token(t: dict) -> float:
    n = t["top_logprobs"].shape[0]
    return sum(t[name].nbytes for name in ("top_logprobs", "top_ids", "tail_logmass")) / n


def test_bytes_per_token_at_k_64_and_the_decoded_distribution():
    """float32 + int32: 64·4 + 64·4 + 4 = 516 bytes; float16 + uint16: 64·2 + 64·2 + 4 = 260. Decoded: the same
    ids, a distribution over the k + 1 buckets again, KL to the float32 one far below 1e-3 nats per token."""
    rows = _rows()
    assert _bytes_per_token(rows) == 516
    compact = encode(rows, "float16", 49152)
    assert _bytes_per_token(compact) == 260 and _bytes_per_token(encode(rows, "float32", 49152)) == 388
    lp, ids, tail = decode_rows(*_parts(compact))
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64 and torch.equal(ids, rows["top_ids"].long())
    torch.testing.assert_close(lp.exp().sum(-1) + tail.exp(), torch.ones(len(lp)), rtol=0, atol=1e-6)
    kl = bucket_kl(rows["top_logprobs"], rows["tail_logmass"], lp, tail)
    assert float(kl.min()) >= -1e-12 and float(kl.max()) < 1e-5
    assert float(kl.mean()) > 0  # (not the float32 rows themselves)
    # float32 rows are read as stored
    exact = decode_rows(*_parts(encode(rows, "float32", 49152)))
    assert torch.equal(exact[0], rows["top_logprobs"]) and torch.equal(exact[2], rows["tail_logmass"])


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
def test_kd_loss_and_gradient_on_the_compact_rows_equal_the_float32_ones(name):
    rows = _rows(n=64, vocab=4096)
    decoded = decode_rows(*_parts(encode(rows, "float16", 4096)))
    student = (torch.randn(64, 4096, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_(True)
    results = []
    for lp, ids, tail in ((rows["top_logprobs"], rows["top_ids"].long(), rows["tail_logmass"]), decoded):
        loss = sparse_token_divergence(student, lp, ids, tail, name).mean()
        (grad,) = torch.autograd.grad(loss, student)
        results.append((float(loss.detach()), grad))
    assert results[0][0] > 0.1
    assert abs(results[0][0] - results[1][0]) < 1e-4  # nats per token (the target: KL <= 1e-3)
    assert float((results[0][1] - results[1][1]).norm()) < 1e-3 * float(results[0][1].norm())


def test_the_stage_writes_the_compact_format_and_says_its_size(prepared):  # noqa: F811
    tmp, cfg, paths = prepared
    result = cache_teacher(cfg, paths, "cached")
    folder = paths.teacher_cache("cached")
    stored = load_file(str(folder / TENSORS))
    manifest = read_manifest(folder)
    assert manifest["key"]["logprobs"] == "float16"
    assert manifest["encoding"] == {"offsets": "int64", "tail_logmass": "float32", "top_ids": "uint16",
                                    "top_logprobs": "float16"}
    assert {k: str(v.dtype) for k, v in stored.items()} == {
        "offsets": "torch.int64", "tail_logmass": "torch.float32", "top_ids": "torch.uint16",
        "top_logprobs": "torch.float16"}
    stats = manifest["stats"]
    assert stats["bytes"] == (folder / TENSORS).stat().st_size
    assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / stats["tokens"], abs=0.05)
    assert 2 * 16 + 2 * 16 + 4 < stats["bytes_per_token"] < 2 * 16 + 2 * 16 + 4 + 12  # k = 16; + offsets, header
    assert result["bytes_per_token"] == stats["bytes_per_token"]  # built or current: the stage's result says it
    line = note("cache_teacher", result, "val/ppl")
    assert line.endswith(f"KiB, {stats['bytes_per_token']:.0f} bytes per token") and "MiB" not in line
    assert stale_fields(manifest, cache_key(_cfg(tmp, cached=_cached_student(logprobs="float32")), paths,
                                            "cached")) == ["logprobs"]


def _as_old_format(folder) -> None:
    """Rewrite a cache folder as the format before the compact one wrote it: float32 log-probs, int32 ids, and a
    key without `logprobs`."""
    stored = load_file(str(folder / TENSORS))
    lp, ids, tail = decode_rows(stored["top_logprobs"], stored["top_ids"], stored["tail_logmass"])
    save_file({"top_logprobs": lp, "top_ids": ids.to(torch.int32), "tail_logmass": tail,
               "offsets": stored["offsets"]}, str(folder / TENSORS))
    manifest = read_manifest(folder)
    del manifest["key"]["logprobs"], manifest["encoding"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    write_checksums(folder)


def test_a_cache_of_the_format_before_is_read_as_it_is_or_rebuilt_with_a_clear_message(prepared, caplog):  # noqa: F811
    tmp, cfg, paths = prepared
    cache_teacher(cfg, paths, "cached")
    folder = paths.teacher_cache("cached")
    _as_old_format(folder)
    old = load_file(str(folder / TENSORS))
    cfg32 = _cfg(tmp, cached=_cached_student(logprobs="float32"))
    assert cache_teacher(cfg32, paths, "cached")["source"] == "current"  # float32: the old cache is that format
    from kd_core.data.tokenize import CausalCollator, load_tokenizer

    tok = load_tokenizer(paths.tokenizer)
    ds, _ = load_train_set(cfg32, paths, tok, "train")
    batch = CausalCollator(tok.pad_token_id)([ds[3], ds[1]])
    lp, ids, _ = TeacherLogitCache(folder, ds).rows_for(batch)
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64
    with caplog.at_level(logging.INFO, logger="kd"):
        assert cache_teacher(cfg, paths, "cached")["source"] == "built"
    assert "in the format before the compact one (float32 log-probs, int32 ids): rebuilding it with float16" \
        in caplog.text
    new = load_file(str(folder / TENSORS))
    assert new["top_logprobs"].dtype == torch.float16 and torch.equal(new["top_ids"].long(), old["top_ids"].long())
    lp16, ids16, _ = TeacherLogitCache(folder, ds).rows_for(batch)
    torch.testing.assert_close(lp16, lp, rtol=1e-3, atol=1e-3)
    assert torch.equal(ids16, ids)
