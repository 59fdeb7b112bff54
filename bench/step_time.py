"""Step time of the distillation methods against SFT and the FLOP-bound ideal (issue 5 targets).

    OMP_NUM_THREADS=1 .venv/bin/python bench/step_time.py [--sizes small medium] [--reps 3] [--steps 12]
    # on a GPU: GPT-2-small student, GPT-2-medium teacher, bf16, optionally through DeepSpeed (under torchrun)
    python bench/step_time.py --sizes gpu --batch 32 --precision bf16 [--deepspeed infra/deepspeed/zero2.json]

Every run goes through `kd_core.training.trainer.train` (the DistillationTrainer with the method, as the distill
stage calls it), timing the interval between consecutive optimizer steps (logging every step) and dropping
the first. Within one repetition the methods run back to back in a rotating order (the machine is shared:
A/B pairs are interleaved, and each ratio is computed inside a repetition); the figures are medians over
repetitions.

Figures (targets from issue 5):
- KD (forward KL) step / SFT step, against the FLOP-bound ideal (3·S + T) / (3·S), S and T the student's and
  teacher's forward FLOPs = 2 · N · tokens (N: parameters that do matmuls per token, i.e. without position
  embeddings; tied embeddings counted once, as the LM head; attention scores ignored). Target ≤ 1.10 × ideal.
- OKD step / KD step (LoRA r = 32 online module, trained through the teacher). Target ≤ 1.5.
- GKD (λ = 0.5, default divergence JSD(0.5)) epoch / KD epoch: sums of step times over the same steps
  (on-policy steps generate `response` tokens with the student, KV-cached). Target ≤ 2.5.

Data: random token sequences (prompt 32 + response 96 tokens incl. EOS, vocabulary 8192); compute does not
depend on the content, and an untrained student rarely samples EOS, so GKD generates full-length responses.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kd_core  # noqa: E402,F401  (offline defaults)
from kd_core.config import ArchConfig, StudentConfig, TrainingConfig  # noqa: E402
from kd_core.data.tokenize import IGNORE_INDEX, EncodedDataset, EncodedExample  # noqa: E402
from kd_core.methods import get_method  # noqa: E402
from kd_core.models.build import build_from_config  # noqa: E402
from kd_core.teachers.source import LiveTeacher  # noqa: E402
from kd_core.training.trainer import train  # noqa: E402

VOCAB = 8192
PROMPT, RESPONSE = 32, 96
SIZES = {  # name: (student, teacher)
    "small": (ArchConfig(n_layer=2, hidden=128, n_head=4), ArchConfig(n_layer=4, hidden=256, n_head=4)),
    "medium": (ArchConfig(n_layer=4, hidden=256, n_head=4), ArchConfig(n_layer=8, hidden=512, n_head=8)),
    "gpu": (ArchConfig(n_layer=12, hidden=768, n_head=12), ArchConfig(n_layer=24, hidden=1024, n_head=16)),
}
METHODS = {  # label: student config fields
    "sft": {"method": "sft"},
    "kd": {"method": "kd", "divergence": "fkl"},
    "okd": {"method": "okd"},
    "gkd": {"method": "gkd", "method_args": {"lmbda": 0.5, "max_new_tokens": RESPONSE}},
}


def word_tokenizer(vocab_size: int):
    """A tokenizer with `vocab_size` ids (pad 0, eos 1): the benchmark only needs ids and special tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1} | {f"t{i}": i for i in range(2, vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
                                   pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")


def random_dataset(n: int, seed: int = 0) -> EncodedDataset:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (PROMPT + RESPONSE - 1,), generator=g).tolist() + [1]  # response ends in EOS
        examples.append(EncodedExample(ids, [IGNORE_INDEX] * PROMPT + ids[PROMPT:]))
    return EncodedDataset(examples)


def machine() -> str:
    """The GPU's name, or the CPU with its cores and torch threads: the first line of every bench printout."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s)"


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in a matmul per token: all but the position embeddings (tied embeddings once)."""
    return sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)


def step_times(label: str, student, teacher, tokenizer, dataset, workdir: Path, args) -> list[float]:
    """Seconds between consecutive optimizer steps of one training run (the first interval dropped)."""
    sc = StudentConfig.model_validate({"name": label, "model": {"config": {"n_layer": 1}}, **METHODS[label]})
    method = get_method(sc.method)(sc, sc.method_args)
    cfg = TrainingConfig(max_steps=args.steps, batch_size=args.batch, learning_rate=1e-3, warmup_ratio=0.0,
                         logging_steps=1, precision=args.precision, deepspeed=args.deepspeed)
    stamps: list[float] = []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        train(student, dataset, tokenizer, cfg, workdir / label, method=method, seed=0,
              teacher=LiveTeacher(teacher) if method.needs_teacher else None, on_log=lambda _: stamps.append(time.perf_counter()),
              save=False)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return intervals[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--deepspeed", help="a DeepSpeed config (run under torchrun)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import transformers

    transformers.logging.set_verbosity_error()
    tokenizer = word_tokenizer(VOCAB)
    dataset = random_dataset(args.batch * (args.steps + 1))
    load_start = os.getloadavg()
    print(f"# step time: {machine()}, torch {torch.__version__}, {args.precision}"
          f"{', DeepSpeed ' + args.deepspeed if args.deepspeed else ''}; batch {args.batch} x {PROMPT}+{RESPONSE} "
          f"tokens, vocab {VOCAB}, {args.steps} steps per run (first interval dropped), {args.reps} interleaved repetitions")
    print(f"# load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="kd-bench-step-") as tmp:
        for size in args.sizes:
            s_arch, t_arch = SIZES[size]
            teacher = build_from_config(t_arch, tokenizer, PROMPT + RESPONSE + 8, seed=0).eval()
            n_s = matmul_params(build_from_config(s_arch, tokenizer, PROMPT + RESPONSE + 8, seed=1))
            n_t = matmul_params(teacher)
            ideal = (3 * n_s + n_t) / (3 * n_s)
            per_rep: dict[str, list[float]] = {m: [] for m in args.methods}  # median step time per repetition
            sums: dict[str, list[float]] = {m: [] for m in args.methods}  # summed step time per repetition
            for rep in range(args.reps):
                order = args.methods[rep % len(args.methods):] + args.methods[:rep % len(args.methods)]
                for label in order:
                    student = build_from_config(s_arch, tokenizer, PROMPT + RESPONSE + 8, seed=1)
                    t = step_times(label, student, copy.deepcopy(teacher), tokenizer, dataset, Path(tmp), args)
                    per_rep[label].append(statistics.median(t))
                    sums[label].append(sum(t))
                    print(f"  {size} rep {rep} {label:>4}: median step {statistics.median(t) * 1e3:7.1f} ms, "
                          f"sum {sum(t):6.2f} s", flush=True)

            def ratio(a: str, b: str, table=per_rep) -> float:
                return statistics.median(x / y for x, y in zip(table[a], table[b]))

            print(f"\n## {size}: student {s_arch.n_layer}x{s_arch.hidden} ({n_s / 1e6:.2f}M matmul params), "
                  f"teacher {t_arch.n_layer}x{t_arch.hidden} ({n_t / 1e6:.2f}M); ideal KD/SFT = (3S+T)/3S = {ideal:.3f}")
            for label in args.methods:
                print(f"  {label:>4}: median step {statistics.median(per_rep[label]) * 1e3:7.1f} ms")
            if {"kd", "sft"} <= set(args.methods):
                r = ratio("kd", "sft")
                print(f"  KD/SFT step = {r:.3f}; / ideal = {r / ideal:.3f}  (target <= 1.10)")
            if {"okd", "kd"} <= set(args.methods):
                okd_ideal = (3 * n_s + 2 * n_t) / (3 * n_s + n_t)  # + the teacher's backward to its activations
                print(f"  OKD/KD step = {ratio('okd', 'kd'):.3f}  (target <= 1.5; FLOP-bound ideal (3S+2T)/(3S+T) = "
                      f"{okd_ideal:.3f})")
            if {"gkd", "kd"} <= set(args.methods):
                print(f"  GKD/KD epoch (sum of step times) = {ratio('gkd', 'kd', sums):.3f}  (target <= 2.5)")
    load_end = os.getloadavg()
    print(f"\n# load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")


if __name__ == "__main__":
    main()
