"""A teacher served by another process (`teacher.model.endpoint`, kd_core/config/endpoint.py): its top-k log-probs
per response token, asked of an OpenAI-compatible `POST /v1/completions` as vLLM serves it, in the representation of
the teacher-logit cache (:mod:`kd_core.teachers.cache`): top-k log-probs in descending order, their token ids, and the
log of the tail mass, log(1 − Σ_topk p). The cache (`cache_teacher`) and the live `kd` / `atkd` students
(:meth:`ServedTeacher.signal`, a :class:`~kd_core.teachers.signal.TopKTeacherSignal`) read it the same way.

What is sent: the student's token ids as token-id prompts (`prompt: [[ids], ...]`, `endpoint.batch_size` prompts a
request), `max_tokens: 1`, and `prompt_logprobs: k` (vLLM's extension; the answer `choices[i].prompt_logprobs` has one
entry per prompt token, the first None, each a map token id -> {logprob, rank, decoded_token} holding the top-k and
the token itself) or, with `api: echo`, `echo: true, logprobs: k, return_tokens_as_token_ids: true` (the answer's
`choices[i].logprobs.top_logprobs`, keys `token_id:<id>`). Entry j (j >= 1) is the teacher's distribution of token j
given tokens < j: the cache's row of position j − 1. The log-probs are the served model's own, at temperature 1, over
its whole vocabulary; the endpoint must use the run's tokenizer (token ids mean the same on both sides).

It also generates (transfer sets, its evaluation): :meth:`ServedTeacher.generations`. Requests go through
:class:`~kd_core.teachers.served_http.EndpointClient` (key, retries, concurrency, rate limit).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kd_core.data.tokenize import IGNORE_INDEX
from kd_core.errors import EndpointError
from kd_core.teachers.served_http import EndpointClient, api_url, shown
from kd_core.teachers.signal import TopKTeacherSignal
from kd_core.teachers.source import TeacherSource

if TYPE_CHECKING:
    from kd_core.config import PipelineConfig
    from kd_core.generation import Generations
    from kd_core.config.endpoint import EndpointConfig
    from kd_core.data.tokenize import EncodedDataset
    from kd_core.run import RunPaths

__all__ = ["ENDPOINT_FILE", "ServedTeacher", "completions_url", "save_served_teacher", "served_metrics"]

ENDPOINT_FILE = "endpoint.json"  # in models/<teacher>: what the train_teacher stage records of a served teacher
Example = tuple[list[int], list[int]]  # (input_ids, labels), unpadded


def completions_url(base: str) -> str:
    """`<base>/v1/completions` (a base already ending in /v1 gets `/completions`)."""
    return api_url(base, "completions")


class ServedTeacher(TeacherSource):
    """The client of one endpoint, a :class:`~kd_core.teachers.source.TeacherSource` (its top-k per batch, no model
    here) that also generates (:meth:`generations`, what :func:`kd_core.generation.generate` asks of it).
    ``vocab_size``: the vocabulary shared with the student (the rows' normalisation, as the cache's); a returned
    token id outside it is an error."""

    top_k_only = True
    what = "a served teacher's top-k"

    def __init__(self, endpoint: EndpointConfig, vocab_size: int):
        self.endpoint, self.vocab_size = endpoint, int(vocab_size)
        self.client = EndpointClient(endpoint)
        self.url = completions_url(endpoint.url)
        self.shown = shown(self.url)

    def _fail(self, cls: type[Exception], what: str, key: str | None) -> Exception:
        return self.client.fail(cls, self.url, what, key)

    # ---- scoring
    def _request(self, prompts: list[list[int]], k: int) -> dict:
        body = {"model": self.endpoint.model, "prompt": prompts, "max_tokens": 1}
        if self.endpoint.api == "echo":
            return body | {"echo": True, "logprobs": k, "return_tokens_as_token_ids": True}
        return body | {"prompt_logprobs": k}

    def _choices(self, data, n: int) -> list[dict]:
        """The `choices` of an answer to n prompts, in the prompts' order (by `index`)."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != n or any(not isinstance(c, dict) for c in choices):
            got = len(choices) if isinstance(choices, list) else "no"
            raise self._fail(EndpointError, f"{got} choices for {n} prompts", None)
        return sorted(choices, key=lambda c: c.get("index", 0))

    def _entries(self, choice, n: int, i: int) -> list:
        """The n per-token log-prob maps of prompt i's choice (entry 0, the first token's, is None)."""
        where = "prompt_logprobs" if self.endpoint.api == "prompt_logprobs" else "logprobs.top_logprobs"
        entries = choice.get("prompt_logprobs") if self.endpoint.api == "prompt_logprobs" \
            else (choice.get("logprobs") or {}).get("top_logprobs")
        if not isinstance(entries, list):
            raise self._fail(EndpointError, f"choice {i} has no {where} (is it a vLLM server? api: "
                             f"{self.endpoint.api})", None)
        if len(entries) != n and not (self.endpoint.api == "echo" and len(entries) > n):  # echo: + generated
            raise self._fail(EndpointError, f"choice {i} has {len(entries)} {where} entries for a prompt of {n} "
                             f"tokens (the same tokenizer and no prompt truncation are needed)", None)
        return entries[:n]

    def _top(self, entry, k: int, where: str) -> tuple[list[int], list[float], float]:
        """One position's top-k (ids, log-probs descending) and tail log-mass log(1 − Σ p)."""
        if not isinstance(entry, dict) or len(entry) < k:
            raise self._fail(EndpointError, f"{where}: {len(entry) if isinstance(entry, dict) else 'no'} log-probs, "
                             f"asked for {k}", None)
        pairs = []
        for token, value in entry.items():
            value = value.get("logprob") if isinstance(value, dict) else value
            token = token.removeprefix("token_id:")
            if not token.lstrip("-").isdigit() or not isinstance(value, (int, float)) or isinstance(value, bool):
                raise self._fail(EndpointError, f"{where}: entry {token!r}: {value!r} is not a token id and a "
                                 "log-prob (api echo needs vLLM's return_tokens_as_token_ids)", None)
            pairs.append((int(token), float(value)))
        pairs.sort(key=lambda p: -p[1])
        ids, lps = [p[0] for p in pairs[:k]], [p[1] for p in pairs[:k]]
        if bad := [t for t in ids if not 0 <= t < self.vocab_size]:
            raise self._fail(EndpointError, f"{where}: token id {bad[0]} outside the shared vocabulary of "
                             f"{self.vocab_size} (the endpoint must use the run's tokenizer)", None)
        top = max(lps)
        lse = top + math.log(math.fsum(math.exp(x - top) for x in lps))
        tail = math.log(-math.expm1(lse)) if lse < 0 and k < self.vocab_size else -math.inf
        return ids, lps, tail

    def rows(self, examples: list[Example], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The teacher's top-k for the response positions of ``examples`` (position t counts when labels[t + 1] !=
        IGNORE_INDEX), example by example: top_logprobs [N, k] float32, top_ids [N, k] int64, tail_logmass [N]
        float32, and each example's row count. k is capped at the vocabulary."""
        k = min(int(k), self.vocab_size)
        lps, ids, tails, counts = [], [], [], []
        step = self.endpoint.batch_size
        starts = range(0, len(examples), step)
        bodies = [self._request([list(map(int, x)) for x, _ in examples[s:s + step]], k) for s in starts]
        answers = self.client.post_all(self.url, bodies)
        for start, data in zip(starts, answers):
            chunk = examples[start:start + step]
            choices = self._choices(data, len(chunk))
            for i, ((input_ids, labels), choice) in enumerate(zip(chunk, choices)):
                entries = self._entries(choice, len(input_ids), start + i)
                rows = [j for j in range(1, len(input_ids)) if labels[j] != IGNORE_INDEX]
                for j in rows:
                    top_ids, top_lps, tail = self._top(entries[j], k, f"prompt {start + i}, token {j}")
                    ids.append(top_ids)
                    lps.append(top_lps)
                    tails.append(tail)
                counts.append(len(rows))
        return (torch.tensor(lps, dtype=torch.float32).reshape(-1, k), torch.tensor(ids, dtype=torch.int64).reshape(-1, k),
                torch.tensor(tails, dtype=torch.float32), counts)

    def build_cache(self, dataset: EncodedDataset, top_k: int) -> dict[str, torch.Tensor]:
        """:func:`kd_core.teachers.cache.build_cache`'s tensors, from the endpoint."""
        lps, ids, tails, counts = self.rows([(ex.input_ids, ex.labels) for ex in dataset.examples], top_k)
        return {"top_logprobs": lps, "top_ids": ids.to(torch.int32), "tail_logmass": tails,
                "offsets": torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)}

    def signal(self, batch: dict[str, torch.Tensor]) -> TopKTeacherSignal:
        """The served teacher's signal on a right-padded batch: its top-``endpoint.top_k`` at temperature 1, on the
        batch's device."""
        lengths = batch["attention_mask"].sum(1).tolist()
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        lps, top_ids, tails, _ = self.rows([(ids[i, :n].tolist(), labels[i, :n].tolist())
                                            for i, n in enumerate(lengths)], self.endpoint.top_k)
        device = batch["input_ids"].device
        return TopKTeacherSignal(lps.to(device), top_ids.to(device), tails.to(device), self.vocab_size, 1.0)

    # ---- generation
    def generations(self, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, do_sample: bool,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32) -> Generations:
        """The served model's answers to `prompts` (token ids of the run's tokenizer), as
        :func:`kd_core.generation.generate` gives a local model's: greedy (`temperature: 0`) or sampled
        (`temperature`, `top_p`; no top-k cut). `generate_api: completions` sends the token ids to /v1/completions,
        `endpoint.batch_size` prompts a request; a sampled prompt i goes alone with `seed: row_seed(seed, i)` (as
        the in-process row i's stream; vLLM seeds each request's sampler with it) unless `sampling_seed` is off.
        `chat` sends each prompt's text (as the run's template renders it) as the user message to
        /v1/chat/completions, one a request. The texts are stripped; `token_ids` are the texts encoded again by the run
        tokenizer; `new_tokens` is the server's count (`usage.completion_tokens`: vLLM's includes the EOS that ended
        an answer, which the in-process count leaves out), else the count of those ids. `batch_size`, the local
        batch, is not used."""
        from kd_core.generation import Generations, row_seed

        chat = self.endpoint.generate_api == "chat"
        url = api_url(self.endpoint.url, "chat/completions" if chat else "completions")
        seeded = do_sample and self.endpoint.sampling_seed
        step = 1 if chat or seeded else self.endpoint.batch_size
        sampling = {"temperature": float(temperature), "top_p": float(top_p)} if do_sample else {"temperature": 0.0}
        bodies = []
        for start in range(0, len(prompts), step):
            body = {"model": self.endpoint.model, "max_tokens": int(max_new_tokens), **sampling}
            if chat:
                body["messages"] = [{"role": "user", "content": tokenizer.decode(prompts[start],
                                                                                 skip_special_tokens=True)}]
            else:
                body["prompt"] = [list(map(int, p)) for p in prompts[start:start + step]]
            if seeded:
                body["seed"] = row_seed(seed, start)
            bodies.append(body)
        began = time.perf_counter()
        answers = self.client.post_all(url, bodies)
        seconds = time.perf_counter() - began
        texts, counted = [], 0
        for start, data in zip(range(0, len(prompts), step), answers):
            usage = data.get("usage") if isinstance(data, dict) else None
            counted += (usage or {}).get("completion_tokens") or 0
            for i, choice in enumerate(self._choices(data, min(step, len(prompts) - start))):
                text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
                if not isinstance(text, str):
                    where = "message.content" if chat else "text"
                    raise self.client.fail(EndpointError, url, f"choice {start + i} has no {where}")
                texts.append(text.strip())
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return Generations(ids, texts, counted or sum(len(x) for x in ids), seconds)


def served_metrics(cfg: PipelineConfig) -> dict:
    """What the evaluate stage knows of a served teacher besides its generation metrics: that it is served, where,
    and no parameter count (its weights are not here)."""
    endpoint = cfg.teacher.model.endpoint
    return {"served": True, "endpoint": shown(endpoint.url), "model": endpoint.model, "parameters": None}


def save_served_teacher(cfg: PipelineConfig, paths: RunPaths) -> dict:
    """The train_teacher stage of a served teacher: `models/<teacher>` holds what it is (`endpoint.json`: URL, model
    name, api; no key) and the run's tokenizer, so that the stages after it (and DVC) see the teacher change."""
    from kd_core.io import atomic_dir, write_json_atomic
    from kd_core.run import load_run_tokenizer

    endpoint = cfg.teacher.model.endpoint
    tokenizer = load_run_tokenizer(paths)
    described = {"url": shown(endpoint.url), "model": endpoint.model, "api": endpoint.api}
    with atomic_dir(paths.model(cfg.teacher.name)) as tmp:
        write_json_atomic(Path(tmp) / ENDPOINT_FILE, described)
        tokenizer.save_pretrained(str(tmp))
    info = {"name": cfg.teacher.name, "trained": False, "served": described, "train_time_s": 0.0, "steps": 0}
    write_json_atomic(paths.train_info(cfg.teacher.name), info)
    return info
