"""The shard pool of the stage running in this thread (kd_core/cluster/shards.py), or None: where `generate` and
`build_cache` look to share their batches out among Ray workers. This module imports nothing heavy (no Ray)."""

from __future__ import annotations

from contextvars import ContextVar

SHARDS: ContextVar = ContextVar("kd_shards", default=None)

