"""Teacher-logit cache: run the teacher once over a student's training set, keep its top-k per response token.

Stage `cache_teacher` (`kd stage cache_teacher --model STUDENT`, a DVC stage per student) writes
`<run_dir>/teacher_cache/<student>/`:

* `top_k.safetensors`: for every response token of the training set (`train` or a transfer set), in data
  set order, the teacher's k largest log-probabilities at the student's temperature (`top_logprobs`
  float32 [N, k]), their token ids (`top_ids` int32 [N, k]), the log of the remaining mass
  (`tail_logmass` float32 [N], -inf when k = V), and `offsets` int64 [E + 1] (example e owns rows
  offsets[e]:offsets[e + 1]). Log-probabilities are normalised over the vocabulary shared by teacher and
  student (padded embedding rows sliced off, as :func:`kd_core.losses.divergences.shared_vocab`).
* `manifest.json`: the key, i.e. what produced it: teacher weights hash, tokenizer hash, data file hash,
  template, max_length / overlong / loss_on_prompt (which tokens are response tokens), temperature, k and
  the shared vocabulary size. A cache is used only when its key equals the one the current config and files
  give; otherwise it is rebuilt (and the fields that changed are logged). A match is reused across epochs
  and methods, and across students: a student whose key equals another's links that cache instead of
  running the teacher again.

Students with `teacher_cache.enabled: false` get a folder with a manifest saying so (DVC needs the output).
The distill stage calls :func:`cache_teacher` itself (a no-op when the cache is current), then reads rows
per batch by content: each batch row is looked up by a hash of its token ids and labels, so any sampler
order, micro-batching or data-parallel sharding finds its rows, and a row missing from the cache is an
error rather than a silent misalignment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from kd_core.data.tokenize import IGNORE_INDEX, EncodedDataset, batches
from kd_core.io import atomic_dir, write_json_atomic
from kd_core.losses.divergences import logprobs
from kd_core.losses.sparse import top_k_with_tail

if TYPE_CHECKING:  # stages imports this module
    from kd_core.config import PipelineConfig, StudentConfig
    from kd_core.stages import RunPaths

log = logging.getLogger("kd")

FORMAT = 1
TENSORS = "top_k.safetensors"
MANIFEST = "manifest.json"


class CacheError(ValueError):
    """A teacher cache that does not fit the data or the models it is used with."""


# ----------------------------------------------------------------------------------------------- keys
def tree_hash(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under `path` (a file or a folder)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


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


def cache_key(cfg: PipelineConfig, paths: RunPaths, student_name: str) -> dict:
    """What a student's cache must have been produced from, given the config and the files on disk now."""
    sc = cfg.student(student_name)
    teacher_dir = paths.model(sc.teacher)
    if not teacher_dir.is_dir():
        raise FileNotFoundError(f"{teacher_dir}: no model {sc.teacher!r} yet; run its training stages first")
    data = paths.split(sc.train_data)
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no data {sc.train_data!r}; run the prepare (or transfer) stage first")
    from kd_core.data.tokenize import load_tokenizer

    tokenizer_size = len(load_tokenizer(paths.tokenizer))
    teacher_vocab = _vocab_of_checkpoint(teacher_dir)
    return {
        "format": FORMAT,
        "teacher": sc.teacher, "teacher_hash": tree_hash(teacher_dir), "teacher_vocab": teacher_vocab,
        "tokenizer_hash": tree_hash(paths.tokenizer),
        "data": sc.train_data, "data_hash": tree_hash(data),
        "template": cfg.data.template, "max_length": cfg.tokenizer.max_length, "overlong": cfg.tokenizer.overlong,
        "loss_on_prompt": sc.training.loss_on_prompt,
        "temperature": sc.temperature,
        "vocab_size": min(teacher_vocab, _student_vocab(sc, tokenizer_size, teacher_vocab)),
        "top_k": min(sc.teacher_cache.top_k, teacher_vocab),
    }


def stale_fields(manifest: dict | None, key: dict) -> list[str]:
    """Key fields whose value differs between a stored manifest and the expected key (all if none stored)."""
    stored = (manifest or {}).get("key") or {}
    return [k for k in key if stored.get(k) != key[k]]


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------- build
@torch.inference_mode()
def build_cache(teacher: torch.nn.Module, dataset: EncodedDataset, pad_token_id: int, vocab_size: int,
                temperature: float, top_k: int, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Run the teacher over `dataset` in order; top-k log-probs, ids and tail log-mass per response token.

    Position t of an example predicts token t + 1; the response tokens are those with labels[t + 1] !=
    IGNORE_INDEX, exactly the positions the training losses use.
    """
    device = next(teacher.parameters()).device
    top_lp, top_ids, tails, counts = [], [], [], []
    for batch in batches(dataset, pad_token_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:].ne(IGNORE_INDEX)
        lp, ids, tail = top_k_with_tail(logprobs(logits[:, :-1][mask][:, :vocab_size], temperature), top_k)
        top_lp.append(lp.float().cpu())
        top_ids.append(ids.to(torch.int32).cpu())
        tails.append(tail.float().cpu())
        counts += mask.sum(1).tolist()
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    return {"top_logprobs": torch.cat(top_lp), "top_ids": torch.cat(top_ids), "tail_logmass": torch.cat(tails),
            "offsets": offsets}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def cache_teacher(cfg: PipelineConfig, paths: RunPaths, student_name: str) -> dict:
    """The stage: make `teacher_cache/<student>` current (reuse, link another student's, or run the teacher)."""
    sc = cfg.student(student_name)
    out = paths.teacher_cache(sc.name)
    if not sc.teacher_cache.enabled:
        if read_manifest(out) != {"enabled": False}:
            with atomic_dir(out) as tmp:
                write_json_atomic(tmp / MANIFEST, {"enabled": False})
        return {"student": sc.name, "enabled": False}
    key = cache_key(cfg, paths, sc.name)
    info = {"student": sc.name, "enabled": True, "top_k": key["top_k"], "vocab_size": key["vocab_size"]}
    current = read_manifest(out)
    changed = stale_fields(current, key)
    if not changed and (out / TENSORS).is_file():
        return info | {"source": "current"}
    for other in sorted(out.parent.glob("*/")):
        manifest = read_manifest(other)
        if other != out and manifest and not stale_fields(manifest, key) and (other / TENSORS).is_file():
            with atomic_dir(out) as tmp:
                for name in (TENSORS, MANIFEST):
                    _link_or_copy(other / name, tmp / name)
            log.info("teacher cache of %s: reusing %s's (same key)", sc.name, other.name)
            return info | {"source": f"linked from {other.name}"}
    if current is not None:
        log.info("teacher cache of %s is stale (%s changed): rebuilding", sc.name, ", ".join(changed))
    from kd_core.data.tokenize import load_tokenizer
    from kd_core.stages import _train_set, load_model

    tokenizer = load_tokenizer(paths.tokenizer)
    teacher = load_model(paths, sc.teacher).eval()
    if torch.cuda.is_available():
        teacher.cuda()
    rows = teacher.get_output_embeddings().weight.shape[0]
    if rows != key["teacher_vocab"]:
        raise CacheError(f"{paths.model(sc.teacher)}: output layer has {rows} rows, config says {key['teacher_vocab']}")
    ds, _ = _train_set(cfg, paths, tokenizer, sc.train_data, loss_on_prompt=sc.training.loss_on_prompt)
    start = time.perf_counter()
    tensors = build_cache(teacher, ds, tokenizer.pad_token_id, key["vocab_size"], sc.temperature, key["top_k"],
                          sc.teacher_cache.batch_size)
    seconds = time.perf_counter() - start
    stats = {"examples": len(ds), "tokens": int(tensors["offsets"][-1]), "seconds": round(seconds, 3)}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        write_json_atomic(tmp / MANIFEST, {"enabled": True, "key": key, "stats": stats})
    stats["bytes"] = (out / TENSORS).stat().st_size
    log.info("teacher cache of %s: %d tokens, k=%d, %.1f s", sc.name, stats["tokens"], key["top_k"], seconds)
    return info | {"source": "built"} | stats


# ----------------------------------------------------------------------------------------------- read
def example_key(input_ids: list[int], labels: list[int]) -> bytes:
    """Content key of one training example (its token ids and labels, unpadded)."""
    return hashlib.blake2b(array("q", input_ids).tobytes() + b"|" + array("q", labels).tobytes(),
                           digest_size=16).digest()


class TeacherLogitCache:
    """A student's cache in memory, indexed by example content; `rows_for(batch)` feeds the sparse losses."""

    def __init__(self, folder: Path, dataset: EncodedDataset):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if not manifest or not manifest.get("enabled"):
            raise CacheError(f"{self.folder}: no teacher cache; run `kd stage cache_teacher` first")
        self.key = manifest["key"]
        self.vocab_size = int(self.key["vocab_size"])
        self.temperature = float(self.key["temperature"])
        t = load_file(str(self.folder / TENSORS))
        self.top_logprobs, self.top_ids, self.tail, self.offsets = (t["top_logprobs"], t["top_ids"], t["tail_logmass"],
                                                                    t["offsets"])
        if len(self.offsets) != len(dataset) + 1:
            raise CacheError(f"{self.folder}: cache has {len(self.offsets) - 1} examples, the data set {len(dataset)}")
        self._index: dict[bytes, int] = {}
        for i, ex in enumerate(dataset.examples):
            n = sum(1 for label in ex.labels[1:] if label != IGNORE_INDEX)
            if int(self.offsets[i + 1] - self.offsets[i]) != n:
                raise CacheError(f"{self.folder}: example {i} has {n} response tokens, the cache "
                                 f"{int(self.offsets[i + 1] - self.offsets[i])}")
            self._index.setdefault(example_key(ex.input_ids, ex.labels), i)

    def rows_for(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached rows for the response positions of a right-padded batch, in row-major order (as
        ``labels[:, 1:] != IGNORE_INDEX`` nonzero): top_logprobs [N, k], top_ids [N, k] int64, tail [N]."""
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        lengths = batch["attention_mask"].sum(1).tolist()
        pieces = []
        for i, n in enumerate(lengths):
            e = self._index.get(example_key(ids[i, :n].tolist(), labels[i, :n].tolist()))
            if e is None:
                raise CacheError(f"{self.folder}: a training example (batch row {i}) is not in the teacher cache: "
                                 "it was built from other data; run `kd stage cache_teacher` again")
            pieces.append(torch.arange(int(self.offsets[e]), int(self.offsets[e + 1])))
        rows = torch.cat(pieces)
        device = batch["input_ids"].device
        return (self.top_logprobs[rows].to(device), self.top_ids[rows].long().to(device), self.tail[rows].to(device))


def load_for_training(cfg: PipelineConfig, paths: RunPaths, student_name: str, dataset: EncodedDataset,
                      student: torch.nn.Module) -> TeacherLogitCache:
    """Make the student's cache current (see :func:`cache_teacher`) and load it for `dataset` and `student`."""
    cache_teacher(cfg, paths, student_name)
    cache = TeacherLogitCache(paths.teacher_cache(student_name), dataset)
    rows = student.get_output_embeddings().weight.shape[0]
    shared = min(rows, cache.key["teacher_vocab"])
    if shared != cache.vocab_size:
        raise CacheError(f"{cache.folder}: cached over a vocabulary of {cache.vocab_size}, but teacher and student "
                         f"share {shared} ({cache.key['teacher_vocab']} and {rows} output rows)")
    return cache
