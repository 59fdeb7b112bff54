"""Pins the built-in data set to the bytes the single-module generator produced before the
split into kd_core/data/builtin/{world,families,generate}.py (hashes computed from that code)."""

from __future__ import annotations

import hashlib
import json

import pytest

import kd_core.data.builtin as builtin
from kd_core.data.builtin import FAMILIES, build_world, generate_builtin


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("n, seed, digest", [
    (300, 0, "b4d563fd3e28308f9ac35a6603d0bdb0763b341e6008cb1455c8658928ef295f"),
    (500, 7, "f190cd9006e1b1686340438554f12899a23e763d51a372e5828b5986aab9d69b"),
])
def test_rows_match_pre_split_hash(n, seed, digest):
    assert _sha256(generate_builtin(n, seed)) == digest


def test_world_matches_pre_split_hash():
    facts = [[f.entity, f.attribute, f.answer] for f in build_world(3).facts]
    assert _sha256([facts]) == "b85f552974ef843749d4b389b3a442aed75c487774276fabc746637c7e93a73a"


def test_public_names_still_importable_from_package():
    for name in builtin.__all__:
        assert hasattr(builtin, name), name


def test_family_doc_is_first_docstring_line():
    assert FAMILIES["open_qa"].doc == (
        "A memorised fact about the seed's fictional world, asked without context.")
    assert str(FAMILIES["arithmetic"]) == (
        "Single/two-digit addition and subtraction (non-negative results).")
