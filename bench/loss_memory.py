"""Peak memory of the KD loss (forward + backward) against plain cross-entropy, at vocabularies 32k and 50k.

    python bench/loss_memory.py [--batch 4] [--seq 256] [--hidden 256] [--vocab 32000 50257] [--rounds 3]

What is measured: the extra resident memory from the student's last hidden states to their gradients, i.e.
the LM head projection, the loss and the whole backward (the gradient buffers of the hidden states and the
head weight included, the same in every case). Cases:

* `ce`: `F.cross_entropy` on the response tokens (what `sft` computes);
* `kd-dense`: the unchunked divergence (`token_divergence` + `reduce_tokens`, the previous `kd` path), with
  the teacher's logits computed inside the measured region (its last projection, without gradient);
* `kd-chunked`: the same loss through `kd_core/losses/chunked.py` (what `kd` computes now);
* `kd-cache`: the sparse loss on cached top-64 teacher rows (`chunked_sparse_divergence`): no teacher logits.

Method: Linux's peak-RSS counter. Before each case the process's high-water mark is reset (`echo 5 >
/proc/self/clear_refs`) and the current RSS read; the figure is VmHWM - VmRSS after the case. The script runs
itself with `MALLOC_MMAP_THRESHOLD_=65536` so every large tensor is its own mmap, returned to the OS when
freed: RSS then tracks the live tensors (checked: a 16 MB tensor reads as 15.1 MiB). Cases are interleaved
(round-robin, `--rounds` times) and the median reported, because the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kd_core.losses.chunked import chunked_sparse_divergence, chunked_token_divergence  # noqa: E402
from kd_core.losses.tokens import logprobs, reduce_tokens, token_divergence  # noqa: E402
from kd_core.losses.sparse import top_k_with_tail  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_bytes(fn) -> tuple[int, float]:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status("VmRSS")
    start = time.perf_counter()
    fn()
    return _status("VmHWM") - base, time.perf_counter() - start


def make_inputs(batch: int, seq: int, hidden: int, vocab: int, top_k: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, : seq // 3] = -100  # the prompt: no loss there
    mask = labels[:, 1:].ne(-100)
    t_hidden = torch.randn(batch, seq, hidden, generator=g)
    t_weight = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    with torch.no_grad():
        t_rows = (t_hidden @ t_weight.T)[:, :-1][mask]
        top_lp, top_ids, tail = top_k_with_tail(logprobs(t_rows), top_k)
    return {"hidden": torch.randn(batch, seq, hidden, generator=g), "weight": torch.randn(vocab, hidden, generator=g)
            / hidden ** 0.5, "t_hidden": t_hidden, "t_weight": t_weight, "labels": labels, "mask": mask,
            "cache": (top_lp, top_ids, tail)}


def run_case(case: str, x: dict) -> None:
    h = x["hidden"].detach().requires_grad_(True)
    w = x["weight"].detach().requires_grad_(True)
    mask = x["mask"]
    logits = h @ w.T
    if case == "ce":
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), x["labels"][:, 1:].clamp(min=0), reduction="none")
        loss = reduce_tokens(per_token, mask)
    elif case == "kd-cache":
        positions = F.pad(mask, (0, 1), value=False)
        loss = reduce_tokens(chunked_sparse_divergence(logits, positions, *x["cache"], "fkl"), positions)
    else:
        with torch.no_grad():
            t_logits = x["t_hidden"] @ x["t_weight"].T
        if case == "kd-dense":
            loss = reduce_tokens(token_divergence(logits[:, :-1], t_logits[:, :-1], "fkl"), mask)
        else:
            positions = F.pad(mask, (0, 1), value=False)
            loss = reduce_tokens(chunked_token_divergence(logits, t_logits, positions, "fkl"), positions)
    loss.backward()


CASES = ["ce", "kd-dense", "kd-chunked", "kd-cache"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 50257])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"batch {args.batch} x seq {args.seq}, hidden {args.hidden}, fp32, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| vocab | one B×T×V fp32 copy | " + " | ".join(f"{c} peak" for c in CASES)
          + " | kd-chunked / ce | kd-dense / ce | kd-cache / ce |")
    print("|---" * (3 + len(CASES) + 2) + "|")
    for vocab in args.vocab:
        x = make_inputs(args.batch, args.seq, args.hidden, vocab)
        run_case("kd-chunked", x)  # warm-up: first-call allocations of the kernels
        peaks: dict[str, list[int]] = {c: [] for c in CASES}
        for r in range(args.rounds):
            order = CASES[r % len(CASES):] + CASES[: r % len(CASES)]  # rotate: no case always runs first
            for case in order:
                peaks[case].append(_peak_bytes(lambda: run_case(case, x))[0])
        med = {c: statistics.median(v) for c, v in peaks.items()}
        copy = args.batch * args.seq * vocab * 4
        mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
        print(f"| {vocab} | {mib(copy)} | " + " | ".join(f"{mib(med[c])} ({med[c] / copy:.2f}×)" for c in CASES)
              + f" | **{med['kd-chunked'] / med['ce']:.2f}** | {med['kd-dense'] / med['ce']:.2f} | "
              f"{med['kd-cache'] / med['ce']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
