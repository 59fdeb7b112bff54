"""Trainable parameters and peak training memory of a LoRA student against the same student trained in full.

    python bench/lora_student.py [--models default smollm2] [--batch 8] [--seq 96] [--steps 3]

The same KD step (`kd`, forward KL, the fused LM-head loss, AdamW over the trainable parameters: what the trainer
does per optimizer step) on each variant of a student, against a frozen teacher:

* `full`: every weight trains (today's students);
* `lora`: `students.<name>.lora: {r: 8, alpha: 16}`, peft's default targets (GPT-2 `c_attn`, Llama `q_proj`,
  `v_proj`);
* `lora-all`: r = 8 on every linear layer and the LM head (untied from the embeddings: its fused loss goes
  through the adapted head, kd_core/models/adapters.py).

Models: `default` is params.yaml's student (GPT-2, 2 layers, hidden 128, vocabulary 2048) with params.yaml's
teacher (4 layers, hidden 256); `smollm2` is SmolLM2-135M's architecture (Llama, 30 layers, hidden 576, 9 heads /
3 key-value heads, MLP 1536, vocabulary 49152, tied embeddings; 134.5M parameters) with random weights, the teacher
a frozen copy (memory and parameter counts do not depend on the weights' values).

Method: each variant runs in a process of its own, with `MALLOC_MMAP_THRESHOLD_=65536` (every large tensor its own
mmap, returned to the OS when freed: RSS tracks the live tensors, as in bench/loss_memory.py). With the models
built, the process's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`); the figure is VmHWM − VmRSS
after `--steps` steps: activations, gradients and the optimizer's state (made on the first step), the models
themselves excluded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = ("full", "lora", "lora-all")
ALL_LINEAR = {"default": ["c_attn", "c_proj", "c_fc", "lm_head"],
              "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}


class _Vocabulary:
    """What `build_from_config` reads of a tokenizer: its size and special ids."""

    def __init__(self, size: int):
        self.size, self.bos_token_id, self.eos_token_id, self.pad_token_id = size, 0, 0, 0

    def __len__(self) -> int:
        return self.size


def _models(name: str):
    """(student, teacher) of the benchmark model `name`, built as the pipeline builds models from a config."""
    import yaml

    from kd_core.config import ArchConfig
    from kd_core.models.build import build_from_config

    if name == "default":
        params = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("params.yaml").read_text())
        vocab = _Vocabulary(params["tokenizer"]["vocab_size"])
        student_arch = ArchConfig.model_validate(params["students"]["sft"]["model"]["config"])
        teacher_arch = ArchConfig.model_validate(params["teacher"]["model"]["config"])
        return build_from_config(student_arch, vocab, 128, 0), build_from_config(teacher_arch, vocab, 128, 1)
    arch = ArchConfig(arch="llama", n_layer=30, hidden=576, n_head=9, n_kv_head=3, intermediate=1536)
    student = build_from_config(arch, _Vocabulary(49152), 2048, 0)
    return student, copy.deepcopy(student)


def child(model_name: str, variant: str, batch: int, seq: int, steps: int) -> dict:
    """One variant's figures (run in a process of its own)."""
    import torch

    from kd_core.config import LoraConfig, StudentConfig
    from kd_core.data.tokenize import IGNORE_INDEX
    from kd_core.methods import StepContext, get_method
    from kd_core.models.adapters import trainable_parameters, with_lora
    from kd_core.models.build import count_parameters

    from bench.loss_memory import _peak_bytes  # (imported with MALLOC_MMAP_THRESHOLD_ set: no re-exec)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    student, teacher = _models(model_name)
    teacher.eval().requires_grad_(False)
    if variant != "full":
        targets = ALL_LINEAR[model_name] if variant == "lora-all" else None
        student = with_lora(student, LoraConfig(r=8, alpha=16, target_modules=targets), "students.bench.lora")
    student.train()
    sc = StudentConfig.model_validate({"name": "bench", "method": "kd", "divergence": "fkl",
                                       "model": {"config": {"arch": "gpt2"}}})
    method = get_method("kd")(sc, sc.method_args)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = student.get_output_embeddings().weight.shape[0]
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = IGNORE_INDEX  # a prompt, then the response
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    def train_steps() -> None:
        for _ in range(steps):
            ctx = StepContext(student=student, batch=inputs, num_items=labels[:, 1:].ne(IGNORE_INDEX).sum(),
                              teacher=teacher)
            method.compute_loss(ctx).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    peak, seconds = _peak_bytes(train_steps)  # (VmHWM − VmRSS around it, the peak counter reset first)
    return {"model": model_name, "variant": variant, "parameters": count_parameters(student),
            "trainable": trainable_parameters(student), "peak_mib": peak / 2**20, "step_s": seconds / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["default", "smollm2"], choices=["default", "smollm2"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.seq, args.steps)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    rows = []
    for model_name in args.models:
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", model_name, variant, "--batch", str(args.batch),
                                  "--seq", str(args.seq), "--steps", str(args.steps)],
                                 env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{os.uname().nodename}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"threads {os.environ.get('OMP_NUM_THREADS', '1')}")
    print("| model | variant | parameters | trainable | trainable % | peak training memory (MiB) | × full | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    full = {r["model"]: r for r in rows if r["variant"] == "full"}
    for r in rows:
        ratio = r["peak_mib"] / full[r["model"]]["peak_mib"]
        print(f"| {r['model']} | {r['variant']} | {r['parameters']:,} | {r['trainable']:,} | "
              f"{100 * r['trainable'] / r['parameters']:.2f} | {r['peak_mib']:.0f} | {ratio:.2f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
