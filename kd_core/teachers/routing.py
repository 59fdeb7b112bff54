"""Per-sample teacher routing (`students.<name>.route`, kd_core/config/routing.py): each training row is distilled
from the teacher of its domain, the value of its `route.field` (a domain not in `route.domains` goes to
`route.default`).

The loss of a micro-batch is, per response position of row b (teacher r(b), divergence D of the method, p = that
teacher, q = the student):

    D_b,t = D(p_r(b)(·|y_<t, x_b) || q(·|y_<t, x_b))          (nothing combined: one teacher per row)

and the method normalises Σ_b,t D_b,t as it does for one teacher. A row's domain is found by its content (the hash
of its token ids and labels, as the teacher cache finds its rows), so any sampler order, micro-batching or
data-parallel sharding routes it the same. Each teacher sees only its rows: a live teacher runs on the sub-batch
of its rows, a cached one has a cache over its own rows (`teacher_cache/<student>/<teacher>/`, keyed by the route).
Methods that read the teacher's signal on their reference batches only (kd, atkd) can be routed. Here: which
rows go to which teacher; the teachers' signal on a batch: :mod:`kd_core.teachers.routed`.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from kd_core.data.tokenize import EncodedDataset
from kd_core.errors import DataError
from kd_core.teachers.cache_key import example_key

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["route", "route_rows", "batch_keys"]


def route(paths, student_cfg, dataset: EncodedDataset) -> tuple[dict[bytes, str], dict[str, EncodedDataset]]:
    """The student's `route` over its training set `dataset`, in one place: ({content key of each training
    example: its teacher} (:func:`route_rows`), {each of its `teachers`: the examples of `dataset` routed to it,
    in order})."""
    routed = route_rows(paths, student_cfg, dataset)
    examples: dict[str, list] = {name: [] for name in student_cfg.teachers}
    for ex in dataset.examples:
        teacher = routed.get(example_key(ex.input_ids, ex.labels))
        if teacher in examples:
            examples[teacher].append(ex)
    return routed, {name: EncodedDataset(rows) for name, rows in examples.items()}


def route_rows(paths, student_cfg, dataset: EncodedDataset) -> dict[bytes, str]:
    """{content key of each example of `dataset`: its teacher}: `dataset` is the student's `train_data` as
    :func:`kd_core.run.load_train_set` encodes it (each example knows its row). DataError for a domain of
    `route.domains` without rows and for rows of another domain when `route.default` is null (the message names the
    student, the domain, a row)."""
    from kd_core.io import read_jsonl

    route, where = student_cfg.route, f"students.{student_cfg.name}.route"
    rows = read_jsonl(paths.split(student_cfg.train_data))
    domains = Counter(str(r.get(route.field, "")) for r in rows)
    for domain in route.domains:
        if not domains.get(domain):
            raise DataError(f"{where}.domains.{domain}: no row of {student_cfg.train_data!r} has {route.field} "
                            f"{domain!r} (its {route.field} values: {', '.join(map(repr, sorted(domains)))})")
    teachers = []
    for row in rows:
        domain = str(row.get(route.field, ""))
        teacher = route.domains.get(domain, route.default)
        if teacher is None:
            raise DataError(f"{where}: rows of {route.field} {domain!r} (e.g. row {row.get('id', '?')!r}) have no "
                            f"teacher: add {domain!r} to {where}.domains or set {where}.default")
        teachers.append(teacher)
    if dataset.rows is None or len(dataset.rows) != len(dataset):
        raise ValueError("route_rows needs the rows each example was encoded from (kd_core.run.load_train_set)")
    routed: dict[bytes, str] = {}
    for ex, row in zip(dataset.examples, dataset.rows):
        routed.setdefault(example_key(ex.input_ids, ex.labels), teachers[row])
    return routed


def batch_keys(batch: dict[str, Tensor]) -> list[bytes]:
    """The content key of each row of a right-padded batch."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    return [example_key(ids[i, :n].tolist(), labels[i, :n].tolist())
            for i, n in enumerate(batch["attention_mask"].sum(1).tolist())]
