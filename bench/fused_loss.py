"""The fused LM-head KD loss against unfused cross-entropy and the peers: peak memory and time of loss + backward
from the last hidden states, at vocabularies 32k, 128k and 256k, and the values they agree on.

    python bench/fused_loss.py [--batch 4] [--seq 128] [--hidden 576] [--vocab 32000 131072 262144] [--rounds 1]

Cases (student hidden states ``[B, T, H]`` and LM head ``[V, H]`` with gradients, teacher hidden states and head
without; the last 2/3 of each row are response positions; everything from the hidden states on is measured):

* `ce`: unfused cross-entropy, as `sft` computes it: the logits of every position ``h W^T``, `F.cross_entropy` on
  the response tokens, token mean;
* `ours-fkl`, `ours-jsd`: `kd_core.losses.fused.fused_token_divergence` (forward KL = KL(teacher || student), JSD
  beta 0.5) on the response positions, token mean; `ours-cache`: `fused_sparse_divergence` (fkl) on the teacher's
  cached top-64 + tail (no teacher head at all);
* `trl-fused-fkl`, `trl-fused-jsd`: TRL's `ChunkedDivergenceFunction` (`trl/kernels/chunked_divergence.py`, the loss
  of `DistillationTrainer`; its torch path here) on the response rows (beta 0 = forward KL, 0.5 = JSD), token mean;
* `trl-gjsd`: TRL's `GKDTrainer.generalized_jsd_loss` (beta 0.5) on both models' full logits;
* `torch-fkl`: plain torch forward KL on both models' full logits (`F.kl_div(log_softmax(s), log_softmax(t))`).

Memory: the peak-RSS method of `bench/loss_memory.py` (its `_peak_bytes`; importing it re-runs this script with
`MALLOC_MMAP_THRESHOLD_=65536`): the extra resident memory of a case, its gradient buffers included. Time: wall
clock and this process's CPU time (`time.process_time`, less sensitive to other processes on a shared machine) of
the same call. Cases are interleaved, rotated each round; reported are medians and, for ratios, the median over
rounds of the ratio within a round. Every case runs once on a small vocabulary first (kernel and thread-pool
start-up are not measured). Values: the loss of every case, which must agree in pairs (fkl: ours, TRL fused,
torch; JSD: ours, TRL fused, TRL generalized_jsd_loss).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_memory import _peak_bytes  # noqa: E402  (re-executes this script with the malloc setting)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kd_core.losses.fused import fused_sparse_divergence, fused_token_divergence  # noqa: E402
from kd_core.losses.sparse import top_k_with_tail  # noqa: E402
from kd_core.losses.tokens import logprobs  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")
from trl.experimental.gkd import GKDTrainer  # noqa: E402
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402


def make_inputs(batch: int, seq: int, hidden: int, vocab: int, top_k: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, : seq // 3] = -100  # the prompt
    positions = F.pad(labels[:, 1:].ne(-100), (0, 1), value=False)  # over the unshifted hidden states
    x = {"hidden": torch.randn(batch, seq, hidden, generator=g),
         "weight": torch.randn(vocab, hidden, generator=g) / hidden ** 0.5,
         "t_hidden": torch.randn(batch, seq, hidden, generator=g) * 1.5,
         "t_weight": torch.randn(vocab, hidden, generator=g) / hidden ** 0.5,
         "labels": labels, "positions": positions}
    with torch.no_grad():
        rows = x["t_hidden"][positions] @ x["t_weight"].T
        x["cache"] = top_k_with_tail(logprobs(rows), top_k)
    return x


def run_case(case: str, x: dict) -> float:
    """One loss + backward from the hidden states; returns the loss value."""
    h = x["hidden"].detach().requires_grad_(True)
    w = x["weight"].detach().requires_grad_(True)
    pos, labels = x["positions"], x["labels"]
    n = pos.sum()
    if case == "ce":
        logits = h @ w.T
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
    elif case in ("ours-fkl", "ours-jsd"):
        params = {"beta": 0.5} if case == "ours-jsd" else {}
        div = fused_token_divergence(h, w, x["t_hidden"], x["t_weight"], case[5:], mask=pos, **params)
        loss = div.sum() / n
    elif case == "ours-cache":
        loss = fused_sparse_divergence(h, w, *x["cache"], "fkl", mask=pos).sum() / n
    elif case.startswith("trl-fused"):
        beta = 0.0 if case.endswith("fkl") else 0.5
        div, _ = ChunkedDivergenceFunction.apply(h[pos], w, None, x["t_hidden"][pos], x["t_weight"], None, beta)
        loss = div.sum() / n
    else:  # dense on both models' full logits
        s_logits = (h @ w.T)[:, :-1]
        with torch.no_grad():
            t_logits = (x["t_hidden"] @ x["t_weight"].T)[:, :-1]
        if case == "trl-gjsd":
            loss = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels[:, 1:], beta=0.5)
        else:  # torch-fkl
            kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), reduction="none",
                          log_target=True).sum(-1)
            loss = kl[labels[:, 1:].ne(-100)].sum() / n
    loss.backward()
    return float(loss)


CASES = ["ce", "ours-fkl", "ours-jsd", "ours-cache", "trl-fused-fkl", "trl-fused-jsd", "trl-gjsd", "torch-fkl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 131072, 262144])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cases = args.cases
    small = make_inputs(args.batch, args.seq, args.hidden, 1000)
    for case in cases:  # start-up of kernels and thread pools, not measured
        run_case(case, small)
    print(f"batch {args.batch} x seq {args.seq} ({int(small['positions'].sum())} response positions), hidden "
          f"{args.hidden}, fp32, torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    for vocab in args.vocab:
        x = make_inputs(args.batch, args.seq, args.hidden, vocab)
        peaks: dict[str, list[int]] = {c: [] for c in cases}
        times: dict[str, list[float]] = {c: [] for c in cases}
        cpu: dict[str, list[float]] = {c: [] for c in cases}
        values: dict[str, float] = {}
        loads = []
        for r in range(args.rounds):
            for case in cases[r % len(cases):] + cases[: r % len(cases)]:
                box = {}
                loads.append(os.getloadavg()[0])
                c0 = time.process_time()
                peak, seconds = _peak_bytes(lambda: box.setdefault("v", run_case(case, x)))
                cpu[case].append(time.process_time() - c0)
                peaks[case].append(peak)
                times[case].append(seconds)
                values[case] = box["v"]
        print(f"\nvocab {vocab} (load average {min(loads):.1f}-{max(loads):.1f}); one B×T×V fp32 copy "
              f"{args.batch * args.seq * vocab * 4 / 2**20:.0f} MiB")
        print("| case | loss | peak MiB | / ce | / trl-fused | wall s | / ce | / trl-fused | CPU s | / ce | / trl-fused |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")

        def ratio(series: dict, a: str, b: str) -> str:  # median over rounds of the ratio within a round
            return f"{statistics.median(x / y for x, y in zip(series[a], series[b])):.2f}" if b in series else "-"

        for c in cases:
            ref = "trl-fused-jsd" if "jsd" in c else "trl-fused-fkl"  # the same divergence
            print(f"| {c} | {values[c]:.6f} | {statistics.median(peaks[c]) / 2**20:.0f} | {ratio(peaks, c, 'ce')} | "
                  f"{ratio(peaks, c, ref)} | {statistics.median(times[c]):.2f} | {ratio(times, c, 'ce')} | "
                  f"{ratio(times, c, ref)} | {statistics.median(cpu[c]):.2f} | {ratio(cpu, c, 'ce')} | "
                  f"{ratio(cpu, c, ref)} |", flush=True)
        del x


if __name__ == "__main__":
    main()
