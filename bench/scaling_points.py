"""Measured points for the formulas of docs/scaling.md: each formula evaluated at a small size and set beside what
this machine measures at that size (CPU, fp32, one thread).

    OMP_NUM_THREADS=1 python bench/scaling_points.py [--only train decode wire comm cache] [--reps 3]

Each point prints what is measured, what the formula predicts and their ratio (the median over rounds of the ratio
within a round). Peaks: the FLOP/s of a 1024³ fp32 matmul (the FLOP formulas' peak) and the bytes/s read by a sum over
256 MiB (the decode formula's), measured again in each round just before the timed call. Times
are this process's CPU time on one thread, less sensitive than wall time to other processes on a shared machine;
the load average is printed with each timed point.

* `train`: a Llama-architecture student (transformers' `LlamaForCausalLM`, untied head), AdamW, batch B × T:
  - model state: weights + gradients + AdamW's two moments = 16 bytes per parameter (fp32 here; also the
    project's bf16, which keeps fp32 master weights under autocast), counted tensor by tensor and as the rise of
    the process's resident memory (RSS);
  - activations: the bytes autograd saves for backward (counted by `torch.autograd.graph.saved_tensors_hooks`,
    each storage once, parameters excluded) against B·T·[L·(11h + 4i) + 3h + V]·4 bytes (per layer: the two
    RMSNorms 3h each, attention's q and k after RoPE, v, its output and o_proj's input 5h, SwiGLU 4i; then the
    final norm and the log-softmax of the logits);
  - the peak of a whole step (RSS high-water mark; malloc's mmap threshold at 64 KiB so that freed tensors leave
    RSS, as bench/loss_memory.py) against 16·N + activations + 2 logits copies (the logits and their gradient);
  - the time of a step against (6·N_mm + 12·L·h·T)·B·T / (matmul FLOP/s), and of a no-grad forward (the live
    teacher's and the cache's work) against (2·N_mm + 4·L·h·T)·B·T / (matmul FLOP/s); N_mm: the parameters of
    the matmuls (all but the input embedding). predicted / measured is the MFU against the matmul peak.
* `decode`: one linear layer holding as many weights as the model's matmuls, and greedy generation with a KV
  cache (`generate`, batch 1 and 8) of 30 M and 111 M-parameter Llamas: time per new token against
  max(weight bytes / read bandwidth, 2·N_mm·batch / matmul FLOP/s).
* `wire`: the bytes per token of a vLLM `prompt_logprobs` answer (tests/vllm_stub.py's `score` writes vLLM's
  format) at k = 20 and 64 against (k + 1) entries × bytes per entry, and how many tokens/s the project's client
  (`ServedTeacher.rows`) parses on one core.
* `comm`: an all-gather and an all-reduce of 256 MiB between two gloo processes on loopback: the bytes each rank
  sends (Linux's loopback counter) against S·(d − 1)/d and 2·S·(d − 1)/d, the volumes of ZeRO-3's weight gathers
  and of a ring all-reduce (DDP's gradients; ZeRO-2's reduce-scatter is its first half).
* `cache`: a real teacher-logit cache written by the `cache_teacher` stage (params.yaml's teacher architecture at
  its initial weights, built-in data; k = 16 and 64): file bytes against tokens·(8k + 4) + 8·(examples + 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # each large tensor its own mmap: freed memory leaves RSS
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.loss_memory import _peak_bytes, _status  # noqa: E402

MiB = 2 ** 20


def line(what: str, measured: float, predicted: float, unit: str, note: str = "") -> None:
    """One point: measured, predicted, ratio."""
    print(f"| {what} | {measured:,.3g} {unit} | {predicted:,.3g} {unit} | {measured / predicted:.2f} | {note} |",
          flush=True)


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def cpu_seconds(fn) -> float:
    """This process's CPU time of one call (one thread: the time it ran, not the time other processes took)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def timed(fn, reps: int) -> float:
    """Median CPU seconds of `reps` calls (after one warm-up call)."""
    fn()
    return statistics.median(cpu_seconds(fn) for _ in range(reps))


def matmul_flops(n: int = 1024, reps: int = 3) -> float:
    """FLOP/s of an n³ fp32 matmul: the FLOP formulas' peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, reps)


def read_bandwidth(nbytes: int = 256 * MiB, reps: int = 3) -> float:
    """Bytes/s read by a sum over a tensor larger than the caches: the decode formula's peak."""
    src = torch.ones(nbytes // 4)
    return nbytes / timed(src.sum, reps)


def against(measure, predict, reps: int) -> tuple[float, float, float]:
    """`measure()` (seconds) against `predict(flops, bandwidth)`, the peaks measured again in each round just before
    it (the machine is shared: a ratio within a round is steadier than two medians). Returns the medians of the
    measured seconds, the predicted seconds and their ratio per round."""
    measure()  # warm-up
    rounds = []
    for _ in range(reps):
        predicted = predict(matmul_flops(), read_bandwidth())
        rounds.append((measure(), predicted))
    return (statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds),
            statistics.median(r[0] / r[1] for r in rounds))


def timed_line(what: str, fn, predict, reps: int, unit: float, unit_name: str, note: str, measure=None) -> float:
    """Time `fn` (or call `measure`, which returns seconds) against `predict` (see :func:`against`) and print its
    line; returns the measured seconds."""
    result = against(measure or (lambda: cpu_seconds(fn)), predict, reps)
    print(f"| {what} | {result[0] * unit:,.3g} {unit_name} | {result[1] * unit:,.3g} {unit_name} | {result[2]:.2f} | "
          f"{note}; {load()} |", flush=True)
    return result[0]


# ------------------------------------------------------------------------------------------------ models
def llama(hidden: int, layers: int, inter: int, vocab: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (norm weights are counted,
    they are < 0.1 %)."""
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes autograd keeps for backward in one forward + loss: every saved tensor's storage once, parameters out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def train_points(args) -> None:
    h, L = 256, 4  # hidden, layers
    i, V = 704, 8192  # FFN width, vocabulary
    B, T = args.batch, args.seq
    tiny = llama(16, 1, 32, 64, 2)  # transformers' modules and torch's kernels loaded before the baseline
    tiny(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long)).loss.backward()
    del tiny
    rss0 = _status("VmRSS")
    model = llama(h, L, i, V, heads=4)
    N, n_mm = sum(p.numel() for p in model.parameters()), matmul_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    print(f"\nLlama {L} x {h} (intermediate {i}, vocab {V}, untied head): N = {N / 1e6:.2f} M parameters, "
          f"N_mm = {n_mm / 1e6:.2f} M; batch {B} x {T} tokens; fp32")

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    step()  # AdamW's moments now exist
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    state += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    line("model state (weights + grads + AdamW moments), tensors", state / MiB, 16 * N / MiB, "MiB",
         "16 bytes per parameter")
    line("model state, RSS rise since before the model", (_status("VmRSS") - rss0) / MiB, 16 * N / MiB, "MiB",
         "allocator, kernels' workspaces and the batch included")
    acts = saved_activation_bytes(model, batch)
    act_pred = B * T * (L * (11 * h + 4 * i) + 3 * h + V) * 4
    line("activations saved for backward", acts / MiB, act_pred / MiB, "MiB",
         "B·T·[L(11h+4i) + 3h + V]·4 (no checkpointing)")
    opt.zero_grad(set_to_none=True)
    base = _status("VmRSS") - rss0  # weights + AdamW moments (no grads: set to None)
    peak = _peak_bytes(lambda: (model(**batch).loss.backward(), opt.step()))[0] + base
    logits = B * T * V * 4
    line("peak of a training step (RSS high-water mark)", peak / MiB, (16 * N + act_pred + 2 * logits) / MiB, "MiB",
         f"16N + activations + 2 logits copies ({logits / MiB:.0f} MiB each)")

    train_flop = (6 * n_mm + 12 * L * h * T) * B * T
    step_s = timed_line("training step time", step, lambda f, bw: train_flop / f, args.reps, 1, "s",
                        f"(6·N_mm + 12·L·h·T)·B·T = {train_flop / 1e9:.1f} GFLOP at the matmul rate of the round")
    fwd_flop = (2 * n_mm + 4 * L * h * T) * B * T

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    fwd_s = timed_line("no-grad forward time (teacher, cache)", forward, lambda f, bw: fwd_flop / f, args.reps, 1,
                       "s", f"(2·N_mm + 4·L·h·T)·B·T = {fwd_flop / 1e9:.1f} GFLOP")
    print(f"  step / forward: {step_s / fwd_s:.2f} (FLOP ratio {train_flop / fwd_flop:.2f})")


def decode_points(args) -> None:
    for size in ({"h": 512, "L": 8, "i": 1408}, {"h": 1024, "L": 8, "i": 2816}):
        decode_size(args, **size)


def decode_size(args, h: int, L: int, i: int, V: int = 8192, new: int = 32) -> None:
    model = llama(h, L, i, V, h // 64).eval()
    n_mm = matmul_params(model)
    weights = torch.randn(n_mm // h, h)  # as many weights as the model's matmuls, in one linear layer
    print(f"\nLlama {L} x {h} (intermediate {i}, vocab {V}): N_mm = {n_mm / 1e6:.1f} M "
          f"({n_mm * 4 / MiB:.0f} MiB of fp32 weights read per decode step); {new} new tokens after 16 prompt tokens")
    for batch in (1, 8):
        ids = torch.randint(0, V, (batch, 16), generator=torch.Generator().manual_seed(1))
        x = torch.randn(batch, h)

        def gen(n):
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)

        def bound(f, bw):  # seconds per decode step: the weight stream or the FLOPs, whichever is longer
            return max(n_mm * 4 / bw, 2 * n_mm * batch / f)

        stream = timed_line(f"one linear layer holding all the weights, batch {batch}", lambda: F.linear(x, weights),
                            bound, 2 * args.reps, 1e3, "ms",
                            "max(fp32 weight bytes / read bandwidth, 2·N_mm·batch / matmul rate)")
        # per new token: the difference of two generation lengths (the prefill and generate's set-up cancel)
        per_token = timed_line(f"decode step (`generate`), batch {batch}", None, bound, args.reps, 1e3, "ms",
                               "the same bound", measure=lambda: (cpu_seconds(lambda: gen(new + 1))
                                                                  - cpu_seconds(lambda: gen(1))) / new)
        print(f"  {batch / per_token:.0f} tokens/s; {(per_token - stream) * 1e3:.1f} ms of each step outside the "
              "matmuls", flush=True)


def cache_points(args) -> None:
    from bench.common import one_epoch_student, prepared_run, scratch
    from kd_core.stages.cache_teacher import cache_teacher

    print("\nteacher-logit cache written by the cache_teacher stage (params.yaml's teacher architecture, "
          f"built-in data, {args.examples} examples)")
    with scratch("kd-bench-scaling-") as tmp:
        students = {f"k{k}": one_epoch_student("params.yaml", method="kd", divergence="fkl",
                                               teacher_cache={"enabled": True, "top_k": k}) for k in (16, 64)}
        cfg, paths = prepared_run("params.yaml", tmp, students, **{"data.builtin_examples": args.examples})
        for name in students:
            info = cache_teacher(cfg, paths, name)
            k = info["top_k"]
            tokens, examples = info["tokens"], info["examples"]
            predicted = tokens * (8 * k + 4) + 8 * (examples + 1)
            line(f"cache file, k = {k}", info["bytes"] / tokens, predicted / tokens, "bytes/token",
                 f"{tokens} response tokens of {examples} examples, {info['bytes'] / MiB:.2f} MiB; "
                 f"(8k + 4) per token + 8 per example + the safetensors header")


def wire_points(args) -> None:
    from kd_core.config.endpoint import EndpointConfig
    from kd_core.teachers.served import ServedTeacher
    from tests.vllm_stub import score

    V = 32000
    n, prompts = 128, 8  # scored positions per prompt, prompts per request
    model = llama(128, 2, 352, V, 4).eval()
    ids = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(2)).tolist()
    print(f"\nvLLM `prompt_logprobs` answer (tests/vllm_stub.py's `score`: vLLM's entry format, decoded tokens "
          f"written `<id>`), {prompts} prompts of {n + 1} tokens a request, vocabulary {V}; parsed by the project's "
          "client (`ServedTeacher.rows`, the HTTP call replaced by the answer's bytes)")
    for k in (20, 64):
        entries = score(model, ids, k, echo=False)
        raw = json.dumps({"choices": [{"index": c, "prompt_logprobs": entries} for c in range(prompts)]}).encode()
        per_token = len(raw) / (prompts * n)
        entry = len(json.dumps({"31999": {"logprob": -12.345678329467773, "rank": 64, "decoded_token": "<31999>"}}))
        line(f"wire, k = {k}", per_token, (k + 1) * entry, "bytes/token",
             f"(k + 1) entries of ~{entry} bytes (top-k and the token itself), for every prompt token; "
             f"the cache keeps {8 * k + 4} per response token")
        client = ServedTeacher(EndpointConfig(url="http://127.0.0.1:9", model="m", top_k=k, batch_size=prompts), V)
        client._post = lambda body: json.loads(raw)
        parse_s = timed(lambda: client.rows([(ids, ids)] * prompts, k), args.reps)
        print(f"  client: {prompts * n / parse_s:,.0f} tokens/s on one core ({len(raw) / parse_s / 1e6:.0f} MB/s of "
              f"JSON; {load()})", flush=True)


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far (Linux's /proc/net/dev; every process of the machine)."""
    with open("/proc/net/dev") as fh:
        for row in fh:
            if row.strip().startswith("lo:"):
                return int(row.split(":", 1)[1].split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _collective_rank(rank: int, world: int, port: int, nbytes: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shard = torch.ones(nbytes // 4 // world)
    gathered = [torch.empty_like(shard) for _ in range(world)]
    full = torch.ones(nbytes // 4)
    dist.all_reduce(torch.ones(1024))  # warm-up: connections made
    for op in ("all_gather", "all_reduce"):
        dist.barrier()
        before = loopback_bytes()
        if op == "all_gather":
            dist.all_gather(gathered, shard)
        else:
            dist.all_reduce(full)
        dist.barrier()
        if rank == 0:
            out[op] = loopback_bytes() - before
    dist.destroy_process_group()


def comm_points(nbytes: int = 256 * MiB, world: int = 2) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free loopback port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    print(f"\ncollectives of {nbytes / MiB:.0f} MiB between {world} gloo processes on loopback: the bytes every rank "
          "sends (the loopback counter over all ranks, / ranks; other processes' loopback traffic included)")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_collective_rank, args=(world, port, nbytes, out), nprocs=world)
        sent = dict(out)
    share = (world - 1) / world
    line("all-gather (ZeRO-3's weights), bytes sent per rank", sent["all_gather"] / world / MiB, nbytes * share / MiB,
         "MiB", "S·(d − 1)/d")
    line("all-reduce (DDP's gradients), bytes sent per rank", sent["all_reduce"] / world / MiB,
         2 * nbytes * share / MiB, "MiB", "2·S·(d − 1)/d (reduce-scatter + all-gather)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=["train", "decode", "wire", "comm", "cache"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--examples", type=int, default=1200)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, {load()}")
    print("| point | measured | predicted | measured / predicted | formula, notes |\n|---|---|---|---|---|")
    print(f"| matmul 1024³ fp32 (the FLOP formulas' peak) | {matmul_flops() / 1e9:.1f} GFLOP/s | | | {load()} |")
    print(f"| sum over 256 MiB (the decode's peak) | {read_bandwidth() / 1e9:.1f} GB/s | | | {load()} |")
    if "train" in args.only:
        train_points(args)
    if "decode" in args.only:
        decode_points(args)
    if "wire" in args.only:
        wire_points(args)
    if "comm" in args.only:
        comm_points()
    if "cache" in args.only:
        cache_points(args)
    print(f"\nend: {load()}")


if __name__ == "__main__":
    main()
