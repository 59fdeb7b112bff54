"""Loading and validating instruction data: built-in, local files, or a Hugging Face `datasets` name.

Every source yields rows `{id, instruction, context, response, category}`. Validation counts bad rows
(missing or empty required field, undecodable bytes, over-long text) with where they came from; a file
that cannot be parsed at all (malformed JSON) and a value of the wrong type in a field (a number in a text
field, a list where one text is expected) are errors naming the file and line (and the field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kd_core.data.template import format_prompt
from kd_core.errors import DataError

FIELDS = ("instruction", "context", "response", "category")
REQUIRED = ("instruction", "response")


@dataclass
class RawRow:
    values: dict[str, Any]
    where: str  # "file.jsonl:12" or "row 12": used in error messages


@dataclass
class ValidationReport:
    total: int = 0
    kept: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # first few "where: why"

    def add_bad(self, reason: str, where: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    @property
    def bad_fraction(self) -> float:
        return (self.total - self.kept) / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "bad": self.bad, "examples": self.examples}


# ----------------------------------------------------------------------------------------------- readers
def _read_jsonl(path: Path) -> Iterable[RawRow]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RawRow({"__bad__": f"not valid UTF-8 ({err.reason} at byte {err.start})"}, where)
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield RawRow(obj, where)


def _read_json(path: Path) -> Iterable[RawRow]:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of objects (or {{'data': [...]}})")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i}: expected an object, got {type(item).__name__}")
        yield RawRow(item, f"{path}: item {i}")


def _read_table(path: Path) -> Iterable[RawRow]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False) if path.suffix == ".csv" else pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start}") from None
    except Exception as err:  # pandas raises many parser types; report them uniformly
        raise DataError(f"{path}: cannot parse as {path.suffix[1:]}: {err}") from None
    # csv line = header + 1-based row
    offset = 2 if path.suffix == ".csv" else 0
    for i, rec in enumerate(frame.to_dict(orient="records")):
        yield RawRow(rec, f"{path}:{i + offset}" if offset else f"{path}: row {i}")


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_table, ".parquet": _read_table}


def read_file(path: str | Path) -> Iterable[RawRow]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (allowed: {', '.join(READERS)})")
    return reader(path)


def read_hub(name: str, split: str) -> Iterable[RawRow]:
    """A Hugging Face `datasets` name (needs network or a populated HF cache)."""
    import datasets

    ds = datasets.load_dataset(name, split=split)
    for i, rec in enumerate(ds):
        yield RawRow(dict(rec), f"{name}[{split}] row {i}")


# ----------------------------------------------------------------------------------------------- validation
def _field_value(values: dict, field: str, column: str, where: str,
                 multi_reference: bool) -> str | list[str] | None:
    """Our `field` of a source row (read from `column`), stripped: a string; None when missing (None, NaN); with
    `multi_reference`, a list of strings in the response column is several references (the non-empty ones; None
    if none). A category may be a number (a class label). Any other type (a number, dict or list in a text field,
    a list of non-strings) is a DataError naming the row (`where`: file and line), the field and the column."""
    value = values.get(column)
    if hasattr(value, "tolist"):  # numpy scalars and arrays (pandas, parquet) -> Python values
        value = value.tolist()
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas
        return None
    if isinstance(value, str):
        return value.strip()
    if field == "category" and isinstance(value, (int, float)):
        return str(value)
    several = multi_reference and field == "response"
    if several and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()] or None
    kind = type(value).__name__
    if isinstance(value, list):
        kind = f"list of {', '.join(sorted({type(v).__name__ for v in value}))}" if value else "empty list"
    raise DataError(f"{where}: field {field!r} (column {column!r}) is a {kind}; allowed: a string"
                    + (" or a list of strings (several references)" if several else ""))


def normalize_rows(
    raw_rows: Iterable[RawRow],
    *,
    field_map: dict[str, str],
    max_chars: int,
    template: str,
    id_prefix: str,
    prompts_only: bool = False,
    multi_reference: bool = False,
) -> tuple[list[dict], ValidationReport]:
    """Map source columns to our fields and drop bad rows, counting each reason. A value of the wrong type in a
    field is a DataError (`_field_value`), not a bad row.

    `prompts_only` (an unlabeled prompt pool): a row needs only an instruction, and its response is "" (a
    response column in the source is ignored). `multi_reference` (eval sets): a response may be a list of
    strings, kept as a list (several references; max_chars applies to the longest)."""
    required = ("instruction",) if prompts_only else REQUIRED
    report = ValidationReport()
    rows: list[dict] = []
    for raw in raw_rows:
        report.total += 1
        values = raw.values
        if "__bad__" in values:
            report.add_bad(values["__bad__"], raw.where)
            continue
        row = {f: _field_value(values, f, field_map.get(f, f), raw.where, multi_reference)
               for f in FIELDS if not (prompts_only and f == "response")}
        missing = [f for f in required if not row[f]]
        if missing:  # named by the file's column (field_map: our field -> its column) as well as ours
            report.add_bad("missing or empty field(s) " + ", ".join(
                f"{f!r}" + (f" (column {field_map[f]!r})" if field_map.get(f, f) != f else "") for f in missing),
                raw.where)
            continue
        row = {f: row.get(f) or "" for f in FIELDS}
        response = row["response"] if isinstance(row["response"], list) else [row["response"]]
        if len(format_prompt(row, template)) + max(map(len, response)) > max_chars:
            report.add_bad(f"longer than data.max_chars={max_chars}", raw.where)
            continue
        row["id"] = str(values.get("id") or f"{id_prefix}-{report.total - 1:06d}")
        rows.append(row)
        report.kept += 1
    return rows, report


def check_report(report: ValidationReport, max_bad_fraction: float, what: str) -> None:
    if report.kept == 0:
        raise DataError(f"{what}: no valid rows ({report.total} read; bad: {report.bad}; e.g. {report.examples[:3]})")
    if report.bad_fraction > max_bad_fraction:
        raise DataError(
            f"{what}: {report.total - report.kept} of {report.total} rows are bad "
            f"({report.bad_fraction:.1%} > data.max_bad_fraction={max_bad_fraction}); "
            f"reasons: {report.bad}; first: {'; '.join(report.examples[:3])}")
