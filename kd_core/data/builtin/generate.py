"""``generate_builtin(n, seed)``: n Dolly-schema rows, a pure function of ``(n, seed)``; ``generate_unlabeled``:
a pool of prompts without responses from the same families and world, disjoint from given prompts."""

from __future__ import annotations

import random
from typing import Iterable

from kd_core.data.builtin.families import FAMILIES
from kd_core.data.builtin.world import FactCycle, build_world
from kd_core.data.template import prompt_key

ID_PREFIX = "builtin-"
UNLABELED_ID_PREFIX = "builtin-unlabeled-"
MAX_MISSES = 10_000  # generate_unlabeled: candidates in a row that bring no new prompt before it gives up


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


def generate_unlabeled(n_prompts: int, seed: int = 0, exclude: Iterable[tuple[str, str]] = ()) -> list[dict]:
    """``n_prompts`` distinct prompts without responses, from the families and the world of
    :func:`generate_builtin` (same ``seed``: same open_qa facts), none of them in ``exclude``.

    Rows: instruction, context, category, id ("builtin-unlabeled-000123", the row's position) and
    response "" (unlabeled). Candidates come from their own random stream (``"kd-builtin-unlabeled:<seed>"``),
    each from a family drawn by :data:`FAMILIES` weight; a candidate is kept when its
    :func:`~kd_core.data.template.prompt_key` is neither in ``exclude`` (the caller passes the labeled rows'
    and eval sets' prompts) nor already in the pool. Families with few distinct prompts (brainstorming 32,
    open_qa 480) run out first, so their share of the pool falls below their weight. A pure function of
    ``(n_prompts, seed, set(exclude))``. ValueError when :data:`MAX_MISSES` candidates in a row bring no new
    prompt (the families have no more).
    """
    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or n_prompts < 0:
        raise ValueError(f"n_prompts must be a non-negative int, got {n_prompts!r}")
    rng = random.Random(f"kd-builtin-unlabeled:{seed}")
    facts = FactCycle(build_world(seed))
    names = list(FAMILIES)
    weights = [FAMILIES[name].weight for name in names]
    taken = set(exclude)
    rows: list[dict] = []
    misses = 0
    while len(rows) < n_prompts:
        name = rng.choices(names, weights=weights, k=1)[0]
        row = FAMILIES[name].make(rng, facts)
        key = prompt_key(row)
        if key in taken:
            misses += 1
            if misses == MAX_MISSES:
                raise ValueError(f"only {len(rows)} new distinct prompts: {MAX_MISSES} candidates in a row were "
                                 f"not new (asked for {n_prompts})")
            continue
        misses = 0
        taken.add(key)
        rows.append({"instruction": row["instruction"], "context": row["context"], "response": "",
                     "category": name, "id": f"{UNLABELED_ID_PREFIX}{len(rows):06d}"})
    return rows
