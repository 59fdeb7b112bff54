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


# ------------------------------------------------------------------------------ field maps, several references
SNI_ROWS = [  # Super-NaturalInstructions' layout: instruction / input / output (a list of references)
    {"instruction": "Write a headline.", "input": "Markets rallied as fear eased.",
     "output": ["Cuts fear for markets", "  Stocks rally as fear eases "]},
    {"instruction": "Answer yes or no.", "input": "", "output": ["yes"]},
    {"instruction": "Name a colour.", "input": "", "output": "red"},  # one reference as a plain string
]


def test_own_field_map_loads_a_multi_reference_file_as_it_is(tmp_path):
    path = _write(tmp_path / "sni.jsonl", SNI_ROWS)
    params = tiny_params()
    params["data"]["field_map"] = {"response": "answer"}  # the main data's map is not the eval set's
    params["data"]["eval_sets"] = {"sni": {"path": path, "field_map": {"context": "input", "response": "output"}}}
    rows, reports = _eval_sets(parse_config(params))
    got = rows["sni"]
    assert [r["context"] for r in got] == ["Markets rallied as fear eased.", "", ""]
    # a list stays a list of references (stripped), never the string of the list
    assert got[0]["response"] == ["Cuts fear for markets", "Stocks rally as fear eases"]
    assert got[1]["response"] == ["yes"] and got[2]["response"] == "red"
    assert reports["sni"]["kept"] == 3


def test_without_its_own_field_map_an_eval_set_uses_the_main_one(tmp_path):
    path = _write(tmp_path / "e.jsonl", [{"question": "q", "answer": "a"}])
    params = tiny_params()
    params["data"]["field_map"] = {"instruction": "question", "response": "answer"}
    params["data"]["eval_sets"] = {"e": {"path": path}}
    rows, _ = _eval_sets(parse_config(params))
    assert (rows["e"][0]["instruction"], rows["e"][0]["response"]) == ("q", "a")


def test_an_empty_reference_list_is_a_bad_row_not_an_error(tmp_path):
    rows = SNI_ROWS + [{"instruction": "x", "input": "", "output": ["", "  "]}]
    path = _write(tmp_path / "sni.jsonl", rows)
    params = tiny_params()
    params["data"] |= {"max_bad_fraction": 0.5,
                       "eval_sets": {"sni": {"path": path, "field_map": {"context": "input", "response": "output"}}}}
    out, reports = _eval_sets(parse_config(params))
    assert len(out["sni"]) == 3 and reports["sni"]["bad"] == {"missing or empty field(s) 'response' (column 'output')": 1}


BAD_VALUES = [  # (field changed in row 2, its value, how the message names the type)
    ("instruction", 5, "is a int; allowed: a string"),
    ("instruction", ["Write", "a headline"], "is a list of str; allowed: a string"),
    ("input", {"text": "x"}, "is a dict; allowed: a string"),
    ("output", ["fine", 3], "is a list of int, str; allowed: a string or a list of strings (several references)"),
    ("output", 42.5, "is a float; allowed: a string or a list of strings (several references)"),
]


@pytest.mark.parametrize("column, value, message", BAD_VALUES)
def test_a_value_of_the_wrong_type_names_file_line_and_field(tmp_path, column, value, message):
    rows = [dict(r) for r in SNI_ROWS]
    rows[1][column] = value
    path = _write(tmp_path / "sni.jsonl", rows)
    field = {"input": "context", "output": "response"}.get(column, column)
    with pytest.raises(DataError) as err:
        _eval_sets(_cfg({"sni": {"path": path, "field_map": {"context": "input", "response": "output"}}}))
    assert str(err.value) == f"{path}:2: field {field!r} (column {column!r}) {message}"


def test_several_references_are_for_eval_sets_only():
    from kd_core.data.sources import RawRow, normalize_rows

    raw = [RawRow({"instruction": "q", "response": ["a", "b"]}, "train.jsonl:4")]
    with pytest.raises(DataError, match=r"^train.jsonl:4: field 'response' \(column 'response'\) is a list of str; "
                                        r"allowed: a string$"):
        normalize_rows(raw, field_map={}, max_chars=4000, template="minimal", id_prefix="row")


def test_bad_eval_set_exits_2_with_one_line(project):
    from typer.testing import CliRunner

    from kd_core.cli import app
    from tests.conftest import write_params

    rows = [dict(r) for r in SNI_ROWS]
    rows[2]["instruction"] = 7
    _write(project / "sni.jsonl", rows)
    params = tiny_params()
    params["data"]["eval_sets"] = {"sni": {"path": "sni.jsonl", "field_map": {"context": "input",
                                                                             "response": "output"}}}
    write_params(project, params)
    result = CliRunner().invoke(app, ["stage", "prepare"])
    assert result.exit_code == 2
    assert "error: sni.jsonl:3: field 'instruction' (column 'instruction') is a int; allowed: a string" in result.stderr


@pytest.mark.parametrize("flag", ["false", 1, "yes"])
def test_a_filter_field_that_is_not_a_boolean_is_an_error_naming_the_line(tmp_path, flag):
    """`"false"` was read as true (a non-empty string) and the row kept; a flag is true or false."""
    rows = _rows(3, {0, 1, 2}, with_ids=False)
    rows[1]["pinned"] = flag
    path = _write(tmp_path / "e.jsonl", rows)
    with pytest.raises(DataError) as err:
        _eval_sets(_cfg({"pin": {"path": path, "filter_field": "pinned"}}))
    assert str(err.value) == (f"{path}:2: field 'pinned' (data.eval_sets.pin.filter_field) must be true or false, "
                              f"got {type(flag).__name__} {flag!r}")
