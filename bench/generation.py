"""Generation throughput: batched vs unbatched `kd_core.generation.generate` (KV cache, left padding, EOS stop).

    OMP_NUM_THREADS=1 .venv/bin/python bench/generation.py [--reps 3] [--prompts 32] [--new-tokens 64]
    python bench/generation.py --models 12x768 --decoders   # on a GPU: per-token time of the decoders

`--decoders` compares, at batch = all prompts, sampled, the decoders of the code base per new token: the
on-policy sampler (`rollouts.sample`, GKD/ImitKD/MiniLLM/DistiLLM) with its own KV-cached loop (mixtures
of models) and with its static-cache path (one model; the default on a GPU), and `transformers`'
`generate` (evaluation, transfer sets) with its dynamic cache and with a static cache (compiled decode step
on CUDA); the first call of each is a warm-up.

The same prompts (random token ids, lengths 16–48, so batches are left-padded) are generated with batch size
1 and with batch sizes 8 and 32, greedy and sampled (T = 1), A/B runs interleaved within each repetition;
tokens/s = new tokens / wall seconds (as `Generations.tokens_per_second`), medians over repetitions. The
models are randomly initialised GPT-2 shapes at vocabulary 8192; an untrained model rarely samples EOS,
so every response has the full `--new-tokens` length and the token counts are equal across runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kd_core  # noqa: E402,F401  (offline defaults)
from bench.step_time import VOCAB, machine, word_tokenizer  # noqa: E402
from kd_core.config import ArchConfig  # noqa: E402
from kd_core.generation import generate  # noqa: E402
from kd_core.models.build import build_from_config  # noqa: E402

MODELS = {"2x128": ArchConfig(n_layer=2, hidden=128, n_head=4),
          "4x256": ArchConfig(n_layer=4, hidden=256, n_head=4),
          "12x768": ArchConfig(n_layer=12, hidden=768, n_head=12)}  # GPT-2 small (GPU)
BATCH_SIZES = (1, 8, 32)


def generation_args(description: str) -> argparse.ArgumentParser:
    """The options every generation bench takes: repetitions, prompts, new tokens, model sizes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=["2x128", "4x256"], choices=list(MODELS))
    return ap


def main() -> None:
    ap = generation_args(__doc__.split("\n")[0])
    ap.add_argument("--decoders", action="store_true", help="compare the decoders instead of batch sizes")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tokenizer = word_tokenizer(VOCAB)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 49, (args.prompts,), generator=g)]
    load0 = os.getloadavg()
    print(f"# generation: {machine()}, torch {torch.__version__}; {args.prompts} prompts of 16-48 tokens, "
          f"{args.new_tokens} new tokens each, {args.reps} interleaved repetitions; load average at start {load0[0]:.2f}")
    for label in args.models:
        model = build_from_config(MODELS[label], tokenizer, 48 + args.new_tokens + 8, seed=0).eval()
        if torch.cuda.is_available():
            model.cuda()
        if args.decoders:
            compare_decoders(label, model, tokenizer, prompts, args)
            continue
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.reps):
            for mode in ("greedy", "sampled"):
                for bs in BATCH_SIZES:
                    gen = generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, do_sample=mode == "sampled",
                                   seed=0, batch_size=bs)
                    rates.setdefault((mode, bs), []).append(gen.tokens_per_second)
        print(f"\n## {label}")
        for mode in ("greedy", "sampled"):
            base = statistics.median(rates[(mode, 1)])
            cells = ", ".join(f"batch {bs}: {statistics.median(rates[(mode, bs)]):7.0f} tok/s "
                              f"({statistics.median(rates[(mode, bs)]) / base:4.1f}x)" for bs in BATCH_SIZES)
            print(f"  {mode:>7}: {cells}")
    load1 = os.getloadavg()
    print(f"\n# load average at end {load1[0]:.2f}")


def compare_decoders(label: str, model, tokenizer, prompts: list[list[int]], args) -> None:
    """Milliseconds per decode step (all prompts in one batch, sampled, no EOS stop: an untrained model)."""
    from kd_core.data.tokenize import left_pad
    from kd_core.methods.rollouts import sample

    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, tokenizer.pad_token_id))
    hf = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    decoders = {
        "onpolicy.sample, loop": lambda: sample([(model, 1.0)], prompts, max_new_tokens=args.new_tokens,
                                                eos_token_id=-1, pad_token_id=tokenizer.pad_token_id, static_cache=False),
        "onpolicy.sample, static cache": lambda: sample([(model, 1.0)], prompts, max_new_tokens=args.new_tokens,
                                                        eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                                                        static_cache=True),
        "generate (dynamic cache)": lambda: model.generate(**hf),
        "generate (static cache)": lambda: model.generate(**hf, cache_implementation="static"),
        "kd_core.generation.generate": lambda: generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens,
                                                        do_sample=True, batch_size=len(prompts)),
    }
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for rep in range(args.reps + 1):
        for name, decode in decoders.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                decode()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if rep:  # the first round warms up (and compiles the static-cache decode step)
                times[name].append((time.perf_counter() - start) / args.new_tokens)
    print(f"\n## {label}, batch {len(prompts)}, {args.new_tokens} new tokens")
    for name, t in times.items():
        print(f"  {name:>30}: {statistics.median(t) * 1e3:6.2f} ms per token")


if __name__ == "__main__":
    main()
