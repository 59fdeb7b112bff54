"""Named eval sets (`data.eval_sets`): `filter_field` and `limit`, with and without an `id` column."""

from __future__ import annotations

import json

import pytest

from kd_core.config import parse_config
from kd_core.errors import DataError
from kd_core.stages.prepare import _eval_sets
from tests.conftest import tiny_params


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n, flagged, with_ids):
    rows = []
    for i in range(n):
        row = {"instruction": f"question {i}", "response": f"answer {i}", "pinned": i in flagged}
        if with_ids:
            row["id"] = f"q{i}"
        rows.append(row)
    return rows


def _cfg(eval_sets):
    params = tiny_params()
    params["data"]["eval_sets"] = eval_sets
    return parse_config(params)


@pytest.mark.parametrize("with_ids", [False, True])
def test_filter_field_keeps_exactly_the_flagged_rows(tmp_path, with_ids):
    # the bug: without an `id` column every row was silently dropped (raw ids were all None)
    flagged = {1, 4, 5, 8}
    path = _write(tmp_path / "e.jsonl", _rows(10, flagged, with_ids))
    rows, reports = _eval_sets(_cfg({"pin": {"path": path, "filter_field": "pinned"}}))
    assert [r["instruction"] for r in rows["pin"]] == [f"question {i}" for i in sorted(flagged)]
    # ids are those of the unfiltered file: the file's own, else `<set>-<position in the file>`
    expected_ids = [f"q{i}" if with_ids else f"pin-{i:06d}" for i in sorted(flagged)]
    assert [r["id"] for r in rows["pin"]] == expected_ids
    assert reports["pin"]["written"] == 4 and reports["pin"]["filtered_out"] == 6


def test_filter_field_ids_match_unfiltered_ids(tmp_path):
    path = _write(tmp_path / "e.jsonl", _rows(6, {0, 3}, with_ids=False))
    everything, _ = _eval_sets(_cfg({"all": {"path": path}}))
    pinned, _ = _eval_sets(_cfg({"all": {"path": path, "filter_field": "pinned"}}))
    by_id = {r["id"]: r for r in everything["all"]}
    assert [by_id[r["id"]] for r in pinned["all"]] == pinned["all"]


def test_filter_field_then_limit_and_bad_unflagged_rows(tmp_path):
    rows = _rows(8, {2, 3, 6, 7}, with_ids=False)
    rows[0]["response"] = ""  # bad but not flagged: does not count against max_bad_fraction
    rows[1]["response"] = ""
    path = _write(tmp_path / "e.jsonl", rows)
    out, reports = _eval_sets(_cfg({"pin": {"path": path, "filter_field": "pinned", "limit": 3}}))
    assert [r["id"] for r in out["pin"]] == ["pin-000002", "pin-000003", "pin-000006"]
    assert reports["pin"]["total"] == 4 and reports["pin"]["kept"] == 4 and reports["pin"]["written"] == 3


def test_filter_field_without_flagged_rows_is_an_error(tmp_path):
    path = _write(tmp_path / "e.jsonl", _rows(3, set(), with_ids=False))
    with pytest.raises(DataError, match="filter_field 'pinned'"):
        _eval_sets(_cfg({"pin": {"path": path, "filter_field": "pinned"}}))


def test_no_filter_keeps_every_valid_row(tmp_path):
    path = _write(tmp_path / "e.jsonl", _rows(5, set(), with_ids=False))
    out, reports = _eval_sets(_cfg({"x": {"path": path}}))
    assert [r["id"] for r in out["x"]] == [f"x-{i:06d}" for i in range(5)]
    assert reports["x"]["filtered_out"] == 0 and reports["x"]["written"] == 5
