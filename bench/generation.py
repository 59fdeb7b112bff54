"""Generation throughput: batched vs unbatched `kd_core.generation.generate` (KV cache, left padding, EOS stop).

    OMP_NUM_THREADS=1 .venv/bin/python bench/generation.py [--reps 3] [--prompts 32] [--new-tokens 64]

The same prompts (random token ids, lengths 16–48, so batches are left-padded) are generated with batch size
1 and with batch sizes 8 and 32, greedy and sampled (T = 1), A/B runs interleaved within each repetition;
tokens/s = new tokens / wall seconds (as `Generations.tokens_per_second`), medians over repetitions. The
models are randomly initialised GPT-2 shapes at vocabulary 8192; an untrained model rarely samples EOS,
so every response has the full `--new-tokens` length and the token counts are equal across runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kd_core  # noqa: E402,F401  (offline defaults)
from bench.step_time import VOCAB, word_tokenizer  # noqa: E402
from kd_core.config import ArchConfig  # noqa: E402
from kd_core.generation import generate  # noqa: E402
from kd_core.models import build_from_config  # noqa: E402

MODELS = {"2x128 (1.5M)": ArchConfig(n_layer=2, hidden=128, n_head=4),
          "4x256 (5.3M)": ArchConfig(n_layer=4, hidden=256, n_head=4)}
BATCH_SIZES = (1, 8, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tokenizer = word_tokenizer(VOCAB)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 49, (args.prompts,), generator=g)]
    load0 = os.getloadavg()
    print(f"# generation: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {args.prompts} prompts of 16-48 tokens, {args.new_tokens} new tokens "
          f"each, {args.reps} interleaved repetitions; load average at start {load0[0]:.2f}")
    for label, arch in MODELS.items():
        model = build_from_config(arch, tokenizer, 48 + args.new_tokens + 8, seed=0).eval()
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


if __name__ == "__main__":
    main()
