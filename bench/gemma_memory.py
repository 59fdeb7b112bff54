"""Peak memory of one distill step with the Gemma 3 270M teacher (vocabulary 262,144), fused LM-head loss on and off.

    python bench/gemma_memory.py [--batch 4] [--seq 256] [--layers 0 5 11 17] [--steps 2] [--rounds 1]
        [--variants kd-fused kd-unfused sft]

The model: `Gemma3ForCausalLM` with the configuration read from `gemma-3-270m-q4_k_m.gguf` (fetched into .cache/gemma3
as `bench/real_model.py` does: 18 layers, hidden 640, vocabulary 262,144, embeddings tied to the head; 268.1M
parameters), with **random weights** (`torch.manual_seed(0)`; memory does not depend on the values, and random init
skips the GGUF's ~50 s dequantisation). The student: the teacher cut to `--layers` (`from_teacher_layers`, the same
tokenizer: 4 layers keep 190.1M parameters, 167.8M of them the embedding). Variants, each in a fresh process:

* `kd-fused`: `kd` with forward KL = KL(teacher || student), the live teacher, `fused_lm_head: true` (the default: the
  loss from both models' last hidden states and LM heads, `kd_core/losses/fused.py`; no B×T×V logits);
* `kd-unfused`: the same with `fused_lm_head: false` (both models' logits, then the chunked divergence);
* `sft`: plain cross-entropy on the student's logits (what the SFT baseline and the teacher stage compute).

What is measured: `--steps` optimizer steps of `kd_core.training.trainer.train` (the pipeline's Trainer loop: teacher
forward, student forward, loss, backward, gradient clipping, AdamW step) on `--batch` rows of `--seq` random tokens
(the first third prompt, no loss there). Memory: the peak-RSS method of `bench/loss_memory.py` (`_peak_bytes`:
VmHWM - VmRSS with the high-water mark reset before, `MALLOC_MMAP_THRESHOLD_=65536` so that freed tensors leave the
resident set). `last step's peak`: the extra resident memory of the last step over what is resident when it starts
(models, AdamW moments): activations, logits, loss, gradients, the optimizer's temporaries: what the loss changes.
`all steps' peak`: the same over the loaded models for the whole `train` call (the first step also allocates the
AdamW moments, 8 bytes per student parameter). `process peak`: the process's VmHWM (models, Python, torch included).
Variants run one after the other, `--rounds` times (rotated); medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

GGUF_DIR, GGUF_FILE = Path(".cache/gemma3"), "gemma-3-270m-q4_k_m.gguf"
VARIANTS = {"kd-fused": {"method": "kd", "divergence": "fkl", "fused_lm_head": True},
            "kd-unfused": {"method": "kd", "divergence": "fkl", "fused_lm_head": False},
            "sft": {"method": "sft"}}


def one_variant(args) -> dict:
    """Build teacher and student, then time and measure `args.steps` training steps of `args.one`."""
    from loss_memory import _peak_bytes, _status  # noqa: E402  (re-executes with the malloc setting)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from kd_core.config.schema import StudentConfig
    from kd_core.data.tokenize import IGNORE_INDEX, EncodedDataset, EncodedExample
    from kd_core.methods import get_method
    from kd_core.models.build import count_parameters, student_from_teacher_layers
    from kd_core.teachers.source import LiveTeacher
    from kd_core.training.trainer import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config = AutoConfig.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student = student_from_teacher_layers(teacher, args.layers)
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch * args.steps):
        ids = torch.randint(4, config.vocab_size, (args.seq,), generator=g).tolist()
        examples.append(EncodedExample(ids, [IGNORE_INDEX] * (args.seq // 3) + ids[args.seq // 3:]))
    # the Trainer reads the pad id and keeps the tokenizer; the real one (262k entries) takes ~30 s to load
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, "<pad>")),
                                        pad_token="<pad>", eos_token="<eos>")
    sc = StudentConfig(name="student", model={"from_teacher_layers": args.layers}, **VARIANTS[args.one],
                       training={"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 1e-4,
                                 "warmup_ratio": 0.0, "logging_steps": 1})
    method = get_method(sc.method)(sc, sc.method_args)
    source = LiveTeacher(teacher) if method.needs_teacher else None
    box = {"calls": 0}
    plain_loss = method.compute_loss

    def compute_loss(ctx):  # one call per step (grad_accum 1): at the last step's start, reset the high-water mark
        box["calls"] += 1
        if box["calls"] == args.steps:  # resident now: models, AdamW moments (allocated in step 1)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            box["last_base"] = _status("VmRSS")
        return plain_loss(ctx)

    method.compute_loss = compute_loss
    with tempfile.TemporaryDirectory() as tmp:
        base = _status("VmRSS")
        peak, seconds = _peak_bytes(lambda: box.setdefault("r", train(
            student, EncodedDataset(examples), tokenizer, sc.training, Path(tmp) / "s", method=method, seed=0,
            teacher=source, save=False)))
    last_peak = _status("VmHWM") - box["last_base"]
    return {"variant": args.one, "step_peak": peak, "last_step_peak": last_peak, "process_peak": _status("VmHWM"), "models_rss": base,
            "seconds_per_step": seconds / args.steps, "loss": box["r"].final_loss,
            "teacher_params": count_parameters(teacher), "student_params": count_parameters(student),
            "vocab": config.vocab_size, "response_positions": args.batch * (args.seq - args.seq // 3),
            "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 5, 11, 17])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_variant(args)), flush=True)
        return
    if not (GGUF_DIR / GGUF_FILE).is_file():
        from real_model import fetch_gguf

        fetch_gguf(GGUF_DIR, GGUF_FILE)
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        shift = r % len(args.variants)
        for variant in args.variants[shift:] + args.variants[:shift]:
            cmd = [sys.executable, __file__, "--one", variant, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--layers", *map(str, args.layers)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            results[variant].append(res)
            print(f"round {r}: {variant}: step peak {res['step_peak'] / 2**20:.0f} MiB, process peak "
                  f"{res['process_peak'] / 2**20:.0f} MiB, {res['seconds_per_step']:.1f} s/step, load {res['load']:.1f}",
                  flush=True)
    first = results[args.variants[0]][0]
    copy = args.batch * args.seq * first["vocab"] * 4
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}; batch {args.batch} x seq {args.seq} ({first['response_positions']} "
          f"response positions), vocabulary {first['vocab']}, teacher {first['teacher_params'] / 1e6:.1f}M (random "
          f"weights), student layers {args.layers} ({first['student_params'] / 1e6:.1f}M), fp32, {args.steps} steps, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; one B×T×V fp32 copy {copy / 2**20:.0f} MiB")
    print("| variant | last step's peak MiB | / kd-fused | all steps' peak MiB | / kd-fused | process peak MiB | "
          "s / step | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    keys = ("last_step_peak", "step_peak", "process_peak", "seconds_per_step")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in results.items()}
    ref = med.get("kd-fused", med[args.variants[0]])
    for v in args.variants:
        m = med[v]
        print(f"| {v} | {m['last_step_peak'] / 2**20:.0f} | {m['last_step_peak'] / ref['last_step_peak']:.2f} | "
              f"{m['step_peak'] / 2**20:.0f} | {m['step_peak'] / ref['step_peak']:.2f} | {m['process_peak'] / 2**20:.0f} | "
              f"{m['seconds_per_step']:.1f} | {results[v][-1]['loss']:.4f} |")


if __name__ == "__main__":
    main()
