"""`progressive`: the `intermediate` objective with a layer-by-layer schedule.

The layer pairs (from `layer_map`, sorted by student layer, then teacher layer: shallowest first) are
switched on over training in equal phases. With P pairs and training progress π ∈ [0, 1]
(`ctx.progress` = global_step / max_steps), the phase is k = min(P − 1, ⌊π · P⌋) and the active pairs are

* `accumulate: true` (default): pairs 0..k (earlier targets stay on while deeper ones are added),
* `accumulate: false`: pair k only.

The hidden-state and attention terms average over the active pairs (see `intermediate`). The logit KD term
is on from the start (`kd_schedule: always`, default) or only in the last phase (`last_phase`, when every
pair is active); the CE term (`alpha`) is always on. Projections of pairs that are not yet active receive
no gradient.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kd_core.methods.base import register_method
from kd_core.methods.intermediate import IntermediateArgs, IntermediateKD, phase_of


class ProgressiveArgs(IntermediateArgs):
    kd_schedule: Literal["always", "last_phase"] = Field("always", description="when the logit KD term is on")
    accumulate: bool = Field(True, description="keep earlier pairs on when deeper ones are added")


@register_method("progressive")
class ProgressiveKD(IntermediateKD):
    needs_teacher = True
    Args = ProgressiveArgs

    def order_pairs(self, pairs, weights):
        order = sorted(range(len(pairs)), key=lambda i: pairs[i])
        return [pairs[i] for i in order], [weights[i] for i in order]

    def phase(self, progress: float) -> int:
        return phase_of(progress, len(self.pairs))

    def active_pairs(self, progress: float) -> list[int]:
        k = self.phase(progress)
        return list(range(k + 1)) if self.args.accumulate else [k]

    def kd_active(self, progress: float) -> bool:
        return self.args.kd_schedule == "always" or self.phase(progress) == len(self.pairs) - 1
