"""``generate_builtin(n, seed)``: n Dolly-schema rows, a pure function of ``(n, seed)``."""

from __future__ import annotations

import random

from kd_core.data.builtin.families import FAMILIES
from kd_core.data.builtin.world import FactCycle, build_world

ID_PREFIX = "builtin-"


def _quotas(n: int) -> list[tuple[str, int]]:
    """Exact per-family counts for n rows (largest remainder; ties by FAMILIES order)."""
    total = sum(f.weight for f in FAMILIES.values())
    raw = [(name, n * f.weight / total) for name, f in FAMILIES.items()]
    counts = {name: int(x) for name, x in raw}
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i][1] - int(raw[i][1])), i))
    for i in order[: n - sum(counts.values())]:
        counts[raw[i][0]] += 1
    return list(counts.items())


def generate_builtin(n_examples: int, seed: int = 0) -> list[dict]:
    """Generate ``n_examples`` Dolly-schema rows, deterministically from ``seed``.

    Rows have keys instruction, context ("" when unused), response, category
    and id ("builtin-000123", the row's position). Family counts follow the
    weights in :data:`FAMILIES` exactly (largest remainder) and rows are
    shuffled across families. open_qa facts come from :func:`build_world`
    (seed only), cycled so that every fact is asked about equally often.
    """
    if not isinstance(n_examples, int) or isinstance(n_examples, bool) or n_examples < 0:
        raise ValueError(f"n_examples must be a non-negative int, got {n_examples!r}")
    rng = random.Random(seed)
    facts = FactCycle(build_world(seed))
    categories = [name for name, k in _quotas(n_examples) for _ in range(k)]
    rng.shuffle(categories)
    rows = []
    for i, name in enumerate(categories):
        row = FAMILIES[name].make(rng, facts)
        row["category"] = name
        row["id"] = f"{ID_PREFIX}{i:06d}"
        rows.append(row)
    return rows
