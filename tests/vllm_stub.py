"""A stand-in for a vLLM server on loopback (tests and bench/served_generation.py only), over a small model of this
project:

* `POST /v1/completions` with `prompt_logprobs: k` or `echo: true, logprobs: k` (scoring): the served model's top-k
  log-probs per prompt token as vLLM answers them, `prompt_logprobs` (one entry per prompt token, the first None,
  each {token_id: {logprob, rank, decoded_token}} with the top-k and the token itself) or, with
  `return_tokens_as_token_ids`, `logprobs.top_logprobs` (keys `token_id:<id>`, one more entry for the generated
  token);
* `POST /v1/completions` otherwise (generation): token-id prompts, `max_tokens`, `temperature` (0: greedy), `top_p`,
  `seed`; the texts decoded as vLLM does (special tokens skipped, stopped at EOS, the EOS not in the text). Greedy
  decoding is the in-process one (kd_core.generation.new_tokens, the prompts of a request as one batch); a seeded
  sample draws from the generator seeded with `seed` (kd_core.generation.RowSeededSampling: the in-process row
  whose row_seed it is, draws the same tokens);
* `POST /v1/chat/completions`: one user message, its text encoded with the model's tokenizer, generated as above.

    python -m tests.vllm_stub MODEL_DIR NAME [API_KEY_ENV]

prints `PORT <n>` once listening (`serving` runs it so for a test and gives its URL). Model names other than NAME,
for the error tests: `no-logprobs` (a response without them), `short` (one entry too few), `http500` (a server
error), `flaky-*` (its first request answered 503, its second 429 with Retry-After: 0, then served as NAME);
anything else is 404, as in vLLM. With API_KEY_ENV, requests must carry `Authorization: Bearer $API_KEY_ENV`
(else 401)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from kd_core.data.tokenize import load_tokenizer
from kd_core.generation import RowSeededSampling, new_tokens

FAULTS = ("no-logprobs", "short", "http500")
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serving(model_dir, name: str, key_env: str | None = None):
    """The stub serving `model_dir` as `name` in a process of its own on loopback (key from the environment
    variable `key_env`, when given): yields its base URL, stops it after."""
    args = [str(Path(model_dir).resolve()), name, *filter(None, [key_env])]
    proc = subprocess.Popen([sys.executable, "-m", "tests.vllm_stub", *args], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()  # the stub prints its port once listening
        assert line.startswith("PORT "), f"stub server did not start (exit {proc.poll()})"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def score(model, ids: list[int], k: int, echo: bool) -> list:
    """vLLM's per-token log-prob entries of one prompt (teacher at temperature 1, over all its output rows)."""
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    entries: list = [None]
    for j in range(1, len(ids)):
        row = lp[j - 1]
        top = row.topk(k)
        chosen = {int(t): float(v) for t, v in zip(top.indices, top.values)}
        chosen.setdefault(ids[j], float(row[ids[j]]))
        if echo:
            entries.append({f"token_id:{t}": v for t, v in chosen.items()})
        else:
            entries.append({str(t): {"logprob": v, "rank": int((row > v).sum()) + 1, "decoded_token": f"<{t}>"}
                            for t, v in chosen.items()})
    return entries


def generate(model, tokenizer, prompts: list[list[int]], body: dict) -> list[tuple[str, int]]:
    """Per prompt, (its generated text, its new-token count) for one request's sampling parameters."""
    temperature, top_p = float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0))
    processors = None
    if temperature > 0:
        processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(RowSeededSampling([int(body.get("seed") or 0)] * len(prompts), torch.device("cpu")))
    with torch.inference_mode():
        rows = new_tokens(model, prompts, max_new_tokens=int(body.get("max_tokens", 16)),
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          static_cache=False, logits_processor=processors, do_sample=False)
    out = []
    for row in rows:
        ids = row[:-1] if row and row[-1] == tokenizer.eos_token_id else row
        out.append((tokenizer.decode(ids, skip_special_tokens=True), len(row)))
    return out


def main() -> None:
    folder, name = sys.argv[1], sys.argv[2]
    key = os.environ[sys.argv[3]] if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = load_tokenizer(folder)
    requests: dict[str, int] = {}  # model name -> requests so far (the flaky-* names)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for header, value in (headers or {}).items():
                self.send_header(header, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
                return self._send(401, {"error": {"message": "Unauthorized"}})
            served = body.get("model")
            if served == "http500":
                return self._send(500, {"error": {"message": "engine dead"}})
            if str(served).startswith("flaky-"):
                with lock:
                    requests[served] = seen = requests.get(served, 0) + 1
                if seen == 1:
                    return self._send(503, {"error": {"message": "warming up"}})
                if seen == 2:
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                served = name
            if served != name and served not in FAULTS:
                return self._send(404, {"error": {"message": f"The model `{served}` does not exist."}})
            if self.path == "/v1/chat/completions":
                prompt = tokenizer(body["messages"][-1]["content"])["input_ids"]
                (text, count), = generate(model, tokenizer, [prompt], body)
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                return self._send(200, {"object": "chat.completion", "model": served, "choices": [choice],
                                        "usage": {"completion_tokens": count}})
            if "prompt_logprobs" not in body and not body.get("echo"):
                texts = generate(model, tokenizer, body["prompt"], body)
                choices = [{"index": i, "text": text, "finish_reason": "stop"} for i, (text, _) in enumerate(texts)]
                return self._send(200, {"object": "text_completion", "model": served, "choices": choices[::-1],
                                        "usage": {"completion_tokens": sum(c for _, c in texts)}})
            echo = bool(body.get("echo"))
            k = body["logprobs"] if echo else body["prompt_logprobs"]
            choices = []
            for i, ids in enumerate(body["prompt"]):
                entries = score(model, ids, k, echo)
                if served == "short":
                    entries = entries[:-1]
                choice = {"index": i, "text": " x", "finish_reason": "length"}
                if served != "no-logprobs":
                    if echo:  # + the generated token's entry
                        choice["logprobs"] = {"top_logprobs": entries + [{"token_id:0": -1.0}]}
                    else:
                        choice["prompt_logprobs"] = entries
                choices.append(choice)
            choices.reverse()  # the order of choices is given by their index
            self._send(200, {"id": "cmpl-stub", "object": "text_completion", "model": served, "choices": choices})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
