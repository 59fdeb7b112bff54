"""The teacher-logit cache's key and manifest (:mod:`kd_core.teachers.cache` has the format and the cache itself):
what a student's cache must have been produced from, and what a cache folder says it was. No torch here, so that
the `cache_teacher` stage of a student without a cache (a manifest only) starts light."""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

from kd_core.io import tree_hash

if TYPE_CHECKING:
    from kd_core.config import PipelineConfig, StudentConfig
    from kd_core.run import RunPaths


FORMAT = 1  # the tensors' names and layout; their dtypes are the manifest's `encoding` (kd_core/teachers/cache_encoding.py)
OLD_LOGPROBS = "float32"  # what a manifest without `logprobs` in its key holds
TENSORS = "top_k.safetensors"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------- keys
def example_key(input_ids: list[int], labels: list[int]) -> bytes:
    """Content key of one training example (its token ids and labels, unpadded): how the cache and the routing
    (kd_core/teachers/routing.py) find a row of any batch, in any sampler order or sharding."""
    return hashlib.blake2b(array("q", input_ids).tobytes() + b"|" + array("q", labels).tobytes(),
                           digest_size=16).digest()


def _vocab_of_checkpoint(source: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(source), gguf_file=gguf_file, trust_remote_code=trust_remote_code).vocab_size)


def _student_vocab(sc: StudentConfig, tokenizer_size: int, teacher_vocab: int) -> int:
    """Rows of the student's output layer, from its model source (the distill stage checks the built model)."""
    src = sc.model
    if src.config is not None:
        return tokenizer_size  # models built from a config have exactly the tokenizer's vocabulary
    if src.from_teacher_layers is not None:
        return teacher_vocab
    return _vocab_of_checkpoint(src.checkpoint, src.gguf_file, src.trust_remote_code)


def cache_key(cfg: PipelineConfig, paths: RunPaths, student_name: str, teacher: str | None = None) -> dict:
    """What a student's cache must have been produced from, given the config and the files on disk now
    (`teacher`: one of the student's several `teachers`; default its `teacher`)."""
    sc = cfg.student(student_name)
    from kd_core.run import load_run_tokenizer, require

    teacher = teacher or sc.teacher
    teacher_dir = require(paths.model(teacher), f"model {teacher!r}", "training stages of that model")
    data = require(paths.split(sc.train_data), f"data {sc.train_data!r}", "prepare (or transfer)")
    tokenizer_size = len(load_run_tokenizer(paths))
    served = cfg.is_served(teacher)  # (its tokenizer's vocabulary)
    teacher_vocab = tokenizer_size if served else _vocab_of_checkpoint(teacher_dir)
    return {
        "format": FORMAT,
        "teacher": teacher, "teacher_hash": tree_hash(teacher_dir), "teacher_vocab": teacher_vocab,
        "tokenizer_hash": tree_hash(paths.tokenizer),
        "data": sc.train_data, "data_hash": tree_hash(data),
        "template": cfg.data.template, "max_length": cfg.tokenizer.max_length, "overlong": cfg.tokenizer.overlong,
        "loss_on_prompt": sc.training.loss_on_prompt,
        "temperature": sc.temperature,
        "vocab_size": min(teacher_vocab, _student_vocab(sc, tokenizer_size, teacher_vocab)),
        "top_k": min(sc.teacher_cache.top_k, teacher_vocab),
        "logprobs": sc.teacher_cache.logprobs,
    } | ({"route": sc.route.model_dump(mode="json")} if sc.route is not None else {})  # (over its own rows)


def stale_fields(manifest: dict | None, key: dict) -> list[str]:
    """Key fields whose value differs between a stored manifest and the expected key (all if none stored). A
    manifest without `logprobs` was written before the compact cache: float32 log-probs (`OLD_LOGPROBS`)."""
    stored = (manifest or {}).get("key") or {}
    stored = {"logprobs": OLD_LOGPROBS, **stored} if stored else stored
    return [k for k in key if stored.get(k) != key[k]] + [k for k in stored if k not in key]  # (e.g. a route)


def is_old_format(manifest: dict | None) -> bool:
    """A cache written before the compact format (float32 log-probs, int32 ids, no `logprobs` in its key)."""
    stored = (manifest or {}).get("key") or {}
    return bool(stored) and "logprobs" not in stored


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
