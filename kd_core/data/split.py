"""Deterministic train / val / test split, by prompt.

A row's split depends only on its prompt and the seed (a keyed hash of the prompt, `template.prompt_key`), not on
the file order or on the process: every row of one prompt (several answers to it, or a row given twice) lands in
the same split, so no val or test prompt is also a training prompt; re-running with the same data gives
byte-identical splits, which DVC then versions; adding rows does not move existing rows between splits.
"""

from __future__ import annotations

import hashlib
import json

from kd_core.data.template import prompt_key


def _unit_interval(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_rows(rows: list[dict], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Assign each row by a hash of (seed, its prompt): u < test → test, u < test+val → val, else train; each
    split in the order of the row ids."""
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate row ids, e.g. {dupes}")
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for row in sorted(rows, key=lambda r: r["id"]):
        u = _unit_interval(json.dumps(prompt_key(row)), seed)
        name = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        splits[name].append(row)
    return splits
