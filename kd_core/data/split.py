"""Deterministic train / val / test split.

The order depends only on the row ids and the seed (a keyed hash per id), not on the file order or on the
process: re-running with the same data gives byte-identical splits, which DVC then versions, and adding
rows does not move existing rows between splits.
"""

from __future__ import annotations

import hashlib


def _unit_interval(row_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_rows(rows: list[dict], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Assign each row by a hash of (seed, id): u < test → test, u < test+val → val, else train."""
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate row ids, e.g. {dupes}")
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for row in sorted(rows, key=lambda r: r["id"]):
        u = _unit_interval(row["id"], seed)
        name = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        splits[name].append(row)
    return splits
