"""Which transfer-set keys go with which strategy (`transfer_sets.<name>`), checked by `TransferSetConfig`.

A key that only one strategy reads is an error under another strategy when params give it (a setting that
would be silently ignored), as are the combinations the stage cannot honour. Messages start with the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kd_core.config.schema import TransferSetConfig

# the instruction the source model gets to paraphrase a prompt's instruction (strategy `paraphrase`)
PARAPHRASE_INSTRUCTION = ("Rewrite the following instruction in different words, keeping its meaning. "
                          "Reply with the rewritten instruction only.\n\n{instruction}")

# key -> the strategies that read it
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "keep_fraction": ("confidence", "hard_examples"),
    "rank": ("confidence",),
    "answers": ("hard_examples",),
    "hardness": ("hard_examples",),
    "n_paraphrases": ("paraphrase",),
    "paraphrase_instruction": ("paraphrase",),
}


def check_transfer_set(ts: TransferSetConfig) -> None:
    """ValueError for a strategy-specific key given under another strategy, or a combination the transfer
    stage cannot honour."""
    for key, strategies in STRATEGY_KEYS.items():
        if key in ts.model_fields_set and ts.strategy not in strategies:
            raise ValueError(f"{key}: only with strategy {' or '.join(map(repr, strategies))} "
                             f"(strategy is {ts.strategy!r})")
    ranks_labeled = ts.strategy == "hard_examples" or (ts.strategy == "confidence" and ts.rank != "generated")
    if ranks_labeled and ts.prompts != "train":
        what = "strategy 'hard_examples'" if ts.strategy == "hard_examples" else f"rank {ts.rank!r}"
        raise ValueError(f"prompts: {what} ranks the labeled train rows by their references (allowed: train; "
                         f"got {ts.prompts!r})")
    if ts.strategy == "paraphrase":
        if ts.greedy and ts.n_paraphrases > 1:
            raise ValueError(f"n_paraphrases: {ts.n_paraphrases} with greedy: true would repeat one paraphrase "
                             f"(allowed with greedy: 1; or set greedy: false to sample)")
        if ts.paraphrase_instruction.count("{instruction}") != 1:
            raise ValueError("paraphrase_instruction: must contain '{instruction}' exactly once (where the "
                             "prompt's instruction goes)")
