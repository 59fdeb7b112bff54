"""Our distillation step against TRL's `DistillationTrainer` step, off-policy, on the same models, batch and JSD.

    OMP_NUM_THREADS=1 python bench/trl_step.py [--vocab 32000] [--batch 8] [--prompt 32] [--response 96] [--rounds 5]

Models: GPT-2 configurations at random initial weights (student 2 layers x 256, teacher 4 layers x 512), the given
vocabulary; a batch of random token ids, every row a prompt followed by a response (no padding, so that both sides
see exactly the same tokens). One step = the loss (student forward, teacher forward without gradient, the JSD with
beta 0.5 on the response positions, token mean), backward, `torch.optim.AdamW` step and zero_grad:

* `ours` / `ours-unfused`: the `kd` method (`divergence: jsd`, `fused_lm_head` true / false), `compute_loss` on a
  `StepContext` as the training loop builds it;
* `trl`: `DistillationTrainer._compute_loss` (trl 1.16: the student's and teacher's backbones with
  `logits_to_keep`, then `ChunkedDivergenceFunction` on hidden states and LM heads, torch path on CPU) with the same
  batch as `prompt_ids` / `completion_ids`: its training step without the on-policy generation (the trainer has no
  off-policy mode; its generation would be extra cost on its side).

Time: CPU time (`time.process_time`) and wall clock per step; memory: the peak-RSS method of
`bench/loss_memory.py` around one step (after a warm-up step, so the optimizer state exists in both). Interleaved,
rotated each round; medians and the median of the per-round ratios. The losses of the first step must agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_memory import _peak_bytes  # noqa: E402  (re-executes this script with the malloc setting)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402

from kd_core.config import StudentConfig  # noqa: E402
from kd_core.methods import StepContext, get_method  # noqa: E402

warnings.filterwarnings("ignore")
from trl import DistillationConfig, DistillationTrainer  # noqa: E402


def gpt2(vocab: int, layers: int, hidden: int, positions: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=hidden, n_head=4, n_positions=positions,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A stand-in tokenizer (TRL's constructor wants one; the batch is made of token ids directly)."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", pad_token="t0", unk_token="t1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seq = args.prompt + args.response
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, args.vocab, (args.batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : args.prompt] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trl_inputs = {"prompt_ids": ids[:, : args.prompt], "prompt_mask": torch.ones_like(ids[:, : args.prompt]),
                  "completion_ids": ids[:, args.prompt:], "completion_mask": torch.ones_like(ids[:, args.prompt:])}
    n_items = args.batch * args.response

    students = {name: gpt2(args.vocab, 2, 256, seq, 0) for name in ("ours", "ours-unfused", "trl")}
    teacher = gpt2(args.vocab, 4, 512, seq, 1).eval()
    optim = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in students.items()}
    methods = {}
    for name, fused in (("ours", True), ("ours-unfused", False)):
        sc = StudentConfig.model_validate({"name": name, "method": "kd", "divergence": "jsd", "divergence_args":
                                           {"beta": 0.5}, "fused_lm_head": fused, "model": {"config": {}}})
        methods[name] = get_method("kd")(sc, sc.method_args)
    out_dir = tempfile.mkdtemp(prefix="kd-bench-trl-")
    config = DistillationConfig(output_dir=out_dir, use_cpu=True, bf16=False, gradient_checkpointing=False,
                                report_to=[], beta=0.5, temperature=1.0, max_completion_length=args.response)
    trainer = DistillationTrainer(model=students["trl"], teacher_model=teacher, args=config,
                                  train_dataset=Dataset.from_dict({"prompt": ["t2 t3"]}),
                                  processing_class=tokenizer(args.vocab))
    trl_student = trainer.accelerator.unwrap_model(trainer.model)

    def step(name: str) -> float:
        model = students[name]
        model.train()
        if name == "trl":
            loss = trainer._compute_loss(trl_student, trl_inputs, n_items)[0]
        else:
            loss = methods[name].compute_loss(StepContext(student=model, batch=batch, num_items=n_items,
                                                          teacher=teacher)).loss
        loss.backward()
        optim[name].step()
        optim[name].zero_grad(set_to_none=True)
        return float(loss)

    names = list(students)
    first = {name: step(name) for name in names}  # warm-up (optimizer state), and the values to compare
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, list[int]] = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            loads.append(os.getloadavg()[0])
            c0 = time.process_time()
            p, w = _peak_bytes(lambda: step(name))
            cpu[name].append(time.process_time() - c0)
            wall[name].append(w)
            peak[name].append(p)

    def ratio(series: dict, a: str, b: str) -> str:
        return f"{statistics.median(x / y for x, y in zip(series[a], series[b])):.2f}"

    print(f"student GPT-2 2x256, teacher GPT-2 4x512, vocab {args.vocab}, batch {args.batch} x ({args.prompt} prompt "
          f"+ {args.response} response), JSD beta 0.5, fp32, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), load average {min(loads):.1f}-{max(loads):.1f}, {args.rounds} rounds")
    print("| step | first loss | CPU s | / trl | wall s | / trl | peak MiB | / trl |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {first[name]:.6f} | {statistics.median(cpu[name]):.3f} | {ratio(cpu, name, 'trl')} | "
              f"{statistics.median(wall[name]):.3f} | {ratio(wall, name, 'trl')} | "
              f"{statistics.median(peak[name]) / 2**20:.0f} | {ratio(peak, name, 'trl')} |")


if __name__ == "__main__":
    main()
