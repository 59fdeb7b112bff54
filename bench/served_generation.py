"""Generation throughput through a served teacher (`teacher.model.endpoint`) against in-process generation of the
same model: `kd_core.generation.generate` on the model here, and on a `ServedTeacher` whose server is
tests/vllm_stub.py (an OpenAI-compatible stand-in that runs the same model with the same decoder, one request at a
time per thread, no continuous batching) on loopback.

    OMP_NUM_THREADS=1 .venv/bin/python bench/served_generation.py [--reps 3] [--prompts 32] [--new-tokens 64]

The same prompts (random token ids, lengths 16-48) are generated greedy and sampled (T = 1): in-process at batch
8 and 32; served greedy with `endpoint.batch_size` 8 prompts a request, 1 and 4 requests in flight
(`max_concurrent`); served sampled with a seed per prompt (one prompt a request, as vLLM's per-request seed needs),
1 and 4 in flight. tokens/s = new tokens / wall seconds (`Generations.tokens_per_second`), medians over
interleaved repetitions. Models: randomly initialised GPT-2 shapes at vocabulary 8192 (no early EOS: every
answer has `--new-tokens` tokens). Client and server share the machine's cores; the server's torch threads are
`OMP_NUM_THREADS` too. The greedy served texts are checked equal to the in-process ones.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kd_core  # noqa: E402,F401  (offline defaults)
from bench.generation import MODELS, generation_args  # noqa: E402
from bench.step_time import VOCAB, machine, word_tokenizer  # noqa: E402
from kd_core.config.endpoint import EndpointConfig  # noqa: E402
from kd_core.generation import generate  # noqa: E402
from kd_core.models.build import build_from_config  # noqa: E402
from kd_core.teachers.served import ServedTeacher  # noqa: E402
from tests.vllm_stub import serving  # noqa: E402


def runs(model, served: dict[int, ServedTeacher]) -> dict:
    """label -> (model or served teacher, generate's keyword arguments)."""
    return {"in-process, batch 8": (model, {"do_sample": False, "batch_size": 8}),
            "in-process, batch 32": (model, {"do_sample": False, "batch_size": 32}),
            "served, 8 a request, 1 in flight": (served[1], {"do_sample": False}),
            "served, 8 a request, 4 in flight": (served[4], {"do_sample": False}),
            "in-process sampled, batch 32": (model, {"do_sample": True, "batch_size": 32}),
            "served sampled, seeded, 1 in flight": (served[1], {"do_sample": True}),
            "served sampled, seeded, 4 in flight": (served[4], {"do_sample": True})}


def main() -> None:
    ap = generation_args(__doc__.split("\n")[0])
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from tokenizers import pre_tokenizers

    tokenizer = word_tokenizer(VOCAB)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # (its texts encode back)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 49, (args.prompts,), generator=g)]
    print(f"# served generation: {machine()}, torch {torch.__version__}; {args.prompts} prompts of 16-48 tokens, "
          f"{args.new_tokens} new tokens each, {args.reps} interleaved repetitions; load average at start "
          f"{os.getloadavg()[0]:.2f}")
    for name in args.models:
        model = build_from_config(MODELS[name], tokenizer, 128, seed=0).eval()
        with tempfile.TemporaryDirectory() as folder, serving(_saved(model, tokenizer, folder), "bench") as url:
            served = {n: ServedTeacher(EndpointConfig(url=url, model="bench", batch_size=8, max_concurrent=n,
                                                      timeout_s=600), VOCAB) for n in (1, 4)}
            table = runs(model, served)
            rates: dict[str, list[float]] = {label: [] for label in table}
            for rep in range(args.reps + 1):  # the first is a warm-up
                texts = {}
                for label, (source, kw) in table.items():
                    gen = generate(source, tokenizer, prompts, max_new_tokens=args.new_tokens, seed=rep, **kw)
                    texts[label] = gen.texts
                    if rep:
                        rates[label].append(gen.tokens_per_second)
                assert texts["served, 8 a request, 1 in flight"] == texts["in-process, batch 8"], "greedy differs"
                assert texts["served sampled, seeded, 4 in flight"] == texts["in-process sampled, batch 32"]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        base = statistics.median(rates["in-process, batch 32"])
        for label, values in rates.items():
            rate = statistics.median(values)
            print(f"| GPT-2 {name.replace('x', ' × ')} ({params:.1f} M) | {label} | {rate:.0f} tok/s | "
                  f"{rate / base:.2f} × |")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


def _saved(model, tokenizer, folder: str) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    main()
