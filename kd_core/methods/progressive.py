"""`progressive`: the `intermediate` objective with a layer-by-layer schedule.

Source: "Layer-by-Layer Distillation: start by training the initial layers of the student to match the initial
layers of the teacher, then gradually add more student layers and corresponding distillation targets from
deeper teacher layers" (large-to-small notes, `/work/shared/seeds/large-to-small-distillation.txt`).

Targets. The layer pairs (from `layer_map`, sorted by student layer, then teacher layer: shallowest first) are
switched on over training in equal phases. With P pairs and training progress π ∈ [0, 1]
(`ctx.progress` = global_step / max_steps), the phase is k = min(P − 1, ⌊π · P⌋) and the active pairs are

* `accumulate: true` (default): pairs 0..k (earlier targets stay on while deeper ones are added),
* `accumulate: false`: pair k only.

The hidden-state and attention terms average over the active pairs (see `intermediate`). The logit KD term
is on from the start (`kd_schedule: always`, default) or only in the last phase (`last_phase`, when every
pair is active); the CE term (`alpha`) is always on. Projections of pairs that are not yet active receive
no gradient.

Student layers (`train_layers`):

* `active` (default, the source's variant): in phase k only the student layers up to the deepest student
  layer of the pairs 0..k train, S_k = max_{j ≤ k} s_j; the deeper ones are frozen and join when their
  phase begins; in the last phase the whole student trains (also the blocks below no pair). Layers are
  numbered like `output_hidden_states` (:func:`student_layer_of_params`): 0 = the embeddings (token and
  position embeddings, and a tied LM head: always trainable), l = decoder block l, L = everything after the
  last block (final norm, untied LM head: it shapes hidden_states[L] and the logits), which trains from the
  phase where S_k = L.
* `all`: the whole student trains from step 0 and only the loss targets switch on in phases (the behaviour
  before `train_layers` existed).

How layers are frozen. The Trainer builds its optimizer once, from the parameters that require grad at
that time, and DDP expects the same parameters to get gradients on every step, so `requires_grad` is not
toggled. Instead `prepare` registers a gradient hook on every student parameter above layer 0; while the
parameter's layer is frozen the hook returns zeros (the gradient still flows *through* a frozen layer to
the trainable layers below it: only the parameter's own gradient is zeroed). With AdamW a zero gradient
keeps both moments at 0 from the start, so a frozen parameter does not move, with two differences from a
parameter outside the optimizer, handled or stated here:

* AdamW's per-parameter step counter still advances, so when the layer is unfrozen its bias correction
  would already be spent and, after a long frozen phase, its first updates would be up to ~6x a normal Adam
  step (the first moment warms up in ~10 steps, the second in ~1000). So when a phase unfreezes layers,
  their optimizer state is dropped (`ctx.trainer.optimizer.state`) and AdamW starts them afresh, as if they
  had just joined the optimizer (skipped when no trainer is given, e.g. in unit tests).
* Decoupled weight decay is still applied: with `training.weight_decay` w > 0 a frozen weight shrinks by the
  factor (1 − lr · w) per optimizer step (the default weight decay is 0; norms and biases are in the
  Trainer's no-decay group).

The hooks stay on the student object for the rest of the process and pass gradients through unchanged
once the last phase has begun. Under DeepSpeed ZeRO-3 (partitioned parameters) the hooks are untested.
"""

from __future__ import annotations

import functools

import torch

from kd_core.methods.base import LossOutput, StepContext, register_method
from kd_core.methods.intermediate import IntermediateKD, num_layers, phase_of


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks: the first `ModuleList` with `num_hidden_layers` entries (GPT-2
    `transformer.h`, Llama `model.layers`)."""
    n = num_layers(model)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"progressive: no list of {n} decoder blocks found in {type(model).__name__}")


def student_layer_of_params(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, int]]:
    """Every trainable parameter of `model` with its layer, numbered like `output_hidden_states`: 0 = any
    `nn.Embedding` (token / position embeddings; a tied LM head is the token embedding), l = decoder block l
    (1..L), L = every other parameter (final norm, untied LM head)."""
    n = num_layers(model)
    layer: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            for p in module.parameters(recurse=False):
                layer[id(p)] = 0
    for i, block in enumerate(decoder_blocks(model), start=1):
        for p in block.parameters():
            layer.setdefault(id(p), i)
    return [(p, layer.get(id(p), n)) for p in model.parameters() if p.requires_grad]


@register_method("progressive")
class ProgressiveKD(IntermediateKD):
    def __init__(self, student_cfg, method_args=None):
        super().__init__(student_cfg, method_args)
        self.n_student_layers = 0
        self.trainable_upto: int | None = None  # student layers <= this train (None: not set yet)
        self._layer_params: list[tuple[torch.nn.Parameter, int]] = []
        self._hooks: list = []

    def order_pairs(self, pairs, weights):
        order = sorted(range(len(pairs)), key=lambda i: pairs[i])
        return [pairs[i] for i in order], [weights[i] for i in order]

    def prepare(self, student, teacher):
        teacher = super().prepare(student, teacher)
        self.n_student_layers = num_layers(student)
        if self.args.train_layers == "active":
            self._layer_params = student_layer_of_params(student)
            self._hooks = [p.register_hook(functools.partial(self._mask_grad, layer=layer))
                           for p, layer in self._layer_params if layer > 0]
        return teacher

    def phase(self, progress: float) -> int:
        return phase_of(progress, len(self.pairs))

    def active_pairs(self, progress: float) -> list[int]:
        k = self.phase(progress)
        return list(range(k + 1)) if self.args.accumulate else [k]

    def kd_active(self, progress: float) -> bool:
        return self.args.kd_schedule == "always" or self.phase(progress) == len(self.pairs) - 1

    # ---- frozen layers (train_layers: active)
    def trainable_layers(self, progress: float) -> int:
        """S_k: the student layers 0..S_k train in the phase of `progress` (the whole student in the last)."""
        k = self.phase(progress)
        if self.args.train_layers == "all" or k == len(self.pairs) - 1:
            return self.n_student_layers
        return max(self.pairs[j][0] for j in range(k + 1))

    def _mask_grad(self, grad: torch.Tensor, layer: int) -> torch.Tensor:
        """Gradient hook: zeros while `layer` is frozen, the gradient itself otherwise."""
        if self.trainable_upto is None or layer <= self.trainable_upto:
            return grad
        return torch.zeros_like(grad)

    def _enter_phase(self, ctx: StepContext) -> None:
        upto = self.trainable_layers(ctx.progress)
        previous, self.trainable_upto = self.trainable_upto, upto
        if previous is None or upto <= previous:
            return
        optimizer = getattr(ctx.trainer, "optimizer", None)
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):  # unfrozen now: AdamW restarts their moments and step count
            for p, layer in self._layer_params:
                if previous < layer <= upto:
                    state.pop(p, None)

    def compute_loss(self, ctx: StepContext) -> LossOutput:
        if self.args.train_layers == "active":
            self._enter_phase(ctx)
        return super().compute_loss(ctx)
