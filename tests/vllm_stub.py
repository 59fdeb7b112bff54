"""A stand-in for a vLLM server on loopback (tests only): `POST /v1/completions` on token-id prompts, answering the
served model's top-k log-probs per prompt token as vLLM does, `prompt_logprobs: k` (one entry per prompt token, the
first None, each {token_id: {logprob, rank, decoded_token}} with the top-k and the token itself) or `echo: true,
logprobs: k` with `return_tokens_as_token_ids` (`logprobs.top_logprobs`, keys `token_id:<id>`, one more entry for
the generated token).

    python -m tests.vllm_stub MODEL_DIR NAME [API_KEY_ENV]

prints `PORT <n>` once listening (`serving` runs it so for a test and gives its URL). Model names other than NAME,
for the error tests: `no-logprobs` (a response without them), `short` (one entry too few), `http500` (a server
error); anything else is 404, as in vLLM. With API_KEY_ENV, requests must carry `Authorization: Bearer
$API_KEY_ENV` (else 401)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

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


def main() -> None:
    folder, name = sys.argv[1], sys.argv[2]
    key = os.environ[sys.argv[3]] if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
                return self._send(401, {"error": {"message": "Unauthorized"}})
            served = body.get("model")
            if served == "http500":
                return self._send(500, {"error": {"message": "engine dead"}})
            if served != name and served not in FAULTS:
                return self._send(404, {"error": {"message": f"The model `{served}` does not exist."}})
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
