"""Teacher-logit cache: the teacher's top-k log-probabilities per response token of a student's training set.

`<run_dir>/teacher_cache/<student>/` (written by the `cache_teacher` stage, kd_core/stages/cache_teacher.py):

* `top_k.safetensors`: for every response token of the training set, in data set order, the teacher's k
  largest log-probabilities at the student's temperature (`top_logprobs` [N, k], float16 or float32), their token
  ids (`top_ids` [N, k], uint16 or int32: :mod:`kd_core.teachers.cache_encoding`), the log of the remaining mass
  (`tail_logmass` float32 [N], -inf when k = V), and
  `offsets` int64 [E + 1] (example e owns rows offsets[e]:offsets[e + 1]). Log-probabilities are normalised
  over the vocabulary shared by teacher and student (as :func:`kd_core.losses.tokens.shared_vocab`).
* `manifest.json`: the key (what produced it: teacher weights, tokenizer and data hashes, template, which
  tokens are response tokens, temperature, k, shared vocabulary). A cache is used only when its key equals
  the one the current config and files give (the key and the manifest: :mod:`kd_core.teachers.cache_key`).

Rows are read per batch by content (a hash of each row's token ids and labels), so any sampler order,
micro-batching or data-parallel sharding finds its rows, and a row missing from the cache is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kd_core.generation import SHARDS
from kd_core.data.tokenize import IGNORE_INDEX, EncodedDataset, batches
from kd_core.losses.tokens import logprobs
from kd_core.losses.sparse import top_k_with_tail
from kd_core.errors import CacheError
from kd_core.io import checksum_problem
from kd_core.teachers.cache_encoding import decode_rows
from kd_core.teachers.cache_key import TENSORS, example_key, read_manifest


# ----------------------------------------------------------------------------------------------- build
@torch.inference_mode()
def build_cache(teacher: torch.nn.Module, dataset: EncodedDataset, pad_token_id: int, vocab_size: int,
                temperature: float, top_k: int, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Run the teacher over `dataset` in order; top-k log-probs, ids and tail log-mass per response token.

    Position t of an example predicts token t + 1; the response tokens are those with labels[t + 1] !=
    IGNORE_INDEX, exactly the positions the training losses use. Inside a stage that runs on Ray (`execution`),
    the batches are shared out among the stage's workers and their rows merged in order (kd_core/pipeline/cluster/shards.py).
    """
    if (shards := SHARDS.get()) is not None:
        return shards.build_cache(teacher, dataset, pad_token_id, vocab_size, temperature, top_k, batch_size)
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


# ----------------------------------------------------------------------------------------------- read
class TeacherLogitCache:
    """A student's cache in memory, indexed by example content; `rows_for(batch)` gives a batch's rows
    (:class:`kd_core.teachers.signal.TopKTeacherSignal` wraps them for the methods). `vocab_size`: the vocabulary
    the log-probs are normalised over; `temperature`: the one they are at; `key`: what produced the cache."""

    def __init__(self, folder: Path, dataset: EncodedDataset):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if not manifest or not manifest.get("enabled"):
            raise CacheError(f"{self.folder}: no teacher cache; run `kd stage cache_teacher` first")
        self.key = manifest["key"]
        self.vocab_size = int(self.key["vocab_size"])
        self.temperature = float(self.key["temperature"])
        if (problem := checksum_problem(self.folder)) is not None:
            raise CacheError(f"teacher cache damaged: {problem}; run `kd stage cache_teacher` to rebuild it")
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
        ``labels[:, 1:] != IGNORE_INDEX`` nonzero), on the CPU (the trainer places them): top_logprobs [N, k]
        float32, top_ids [N, k] int64, tail_logmass [N] float32, decoded from the stored types
        (:func:`kd_core.teachers.cache_encoding.decode_rows`). A row not in the cache raises CacheError."""
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
        return decode_rows(self.top_logprobs[rows], self.top_ids[rows], self.tail[rows])
