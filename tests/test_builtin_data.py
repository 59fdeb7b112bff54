"""Tests for the built-in, seed-generated instruction data set (kd_core.data.builtin)."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys

import pytest

from kd_core.data.builtin import (
    BRAINSTORM_LISTS,
    FAMILIES,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    build_world,
    generate_builtin,
    open_qa_key,
    brainstorm_distributions,
    valid_answers,
)

KEYS = {"instruction", "context", "response", "category", "id"}
EXPECTED_SHARE = {"open_qa": 0.25, "closed_qa": 0.15, "arithmetic": 0.15,
                  "classification": 0.15, "rewrite": 0.15, "brainstorming": 0.15}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate_builtin(600, seed=0)


@pytest.fixture(scope="module")
def big() -> list[dict]:
    return generate_builtin(2500, seed=0)


def by_category(rows: list[dict], category: str) -> list[dict]:
    out = [r for r in rows if r["category"] == category]
    assert out, f"no {category} rows"
    return out


def words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", s)


# ---------------------------------------------------------------- determinism

def test_same_seed_same_rows():
    assert generate_builtin(300, seed=7) == generate_builtin(300, seed=7)


def test_different_seed_different_rows():
    a, b = generate_builtin(300, seed=0), generate_builtin(300, seed=1)
    assert a != b
    same = sum(x["instruction"] == y["instruction"] for x, y in zip(a, b))
    assert same < 30


def test_deterministic_across_processes():
    # A fresh interpreter with a different hash seed must produce the same rows.
    code = ("import json; from kd_core.data.builtin import generate_builtin; "
            "print(json.dumps(generate_builtin(200, seed=3)))")
    outs = []
    for hash_seed in ("1", "12345"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
                              cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1] == generate_builtin(200, seed=3)


def test_zero_and_invalid_n():
    assert generate_builtin(0) == []
    with pytest.raises(ValueError):
        generate_builtin(-1)


# -------------------------------------------------------------- schema, mix

def test_schema_and_types(rows):
    assert len(rows) == 600
    for i, r in enumerate(rows):
        assert set(r) == KEYS
        assert all(isinstance(r[k], str) for k in KEYS)
        assert r["instruction"].strip() and r["response"].strip()
        assert r["category"] in FAMILIES
        assert r["id"] == f"builtin-{i:06d}"
        for k in ("instruction", "context", "response"):
            assert r[k].isascii() and r[k] == r[k].lower(), (k, r)
            assert r[k] == r[k].strip() and "  " not in r[k] and "\n" not in r[k]
    assert len({r["id"] for r in rows}) == len(rows)


def test_families_registry():
    assert set(FAMILIES) == set(EXPECTED_SHARE)
    for name, fam in FAMILIES.items():
        assert fam.name == name
        assert fam.doc and "\n" not in fam.doc
        assert fam.weight == pytest.approx(EXPECTED_SHARE[name])


def test_all_categories_present_with_proportions(rows):
    counts = collections.Counter(r["category"] for r in rows)
    assert set(counts) == set(EXPECTED_SHARE)
    for cat, share in EXPECTED_SHARE.items():
        assert abs(counts[cat] / len(rows) - share) < 0.02, (cat, counts[cat])


def test_rows_are_shuffled_across_families(rows):
    # Not blocks of one family: many category changes between consecutive rows.
    changes = sum(a["category"] != b["category"] for a, b in zip(rows, rows[1:]))
    assert changes > 0.6 * len(rows)
    first_100 = collections.Counter(r["category"] for r in rows[:100])
    assert len(first_100) == len(FAMILIES)


def test_length_bounds(big):
    for r in big:
        assert len(r["instruction"].split()) <= 15, r
        assert len(r["context"].split()) <= 25, r
        assert len(r["response"].split()) <= 10, r


def test_mean_lengths_are_short(big):
    mean = {k: sum(len(r[k].split()) for r in big) / len(big)
            for k in ("instruction", "context", "response")}
    assert mean["instruction"] <= 10 and mean["context"] <= 8 and mean["response"] <= 3


def test_context_usage(big):
    assert all(r["context"] for r in by_category(big, "closed_qa"))
    for cat in ("open_qa", "arithmetic", "rewrite", "brainstorming"):
        assert all(r["context"] == "" for r in by_category(big, cat)), cat


# ------------------------------------------------------ reference correctness

def solve_arithmetic(instruction: str) -> int:
    a, b = (int(x) for x in re.findall(r"\d+", instruction))
    if re.match(r"subtract (\d+) from (\d+)", instruction):
        return b - a
    if "minus" in instruction or " - " in instruction:
        return a - b
    assert "plus" in instruction or " + " in instruction or instruction.startswith("add") \
        or "sum" in instruction, instruction
    return a + b


def test_arithmetic_answers(big):
    rs = by_category(big, "arithmetic")
    for r in rs:
        assert r["response"] == str(solve_arithmetic(r["instruction"])), r
        assert all(int(x) <= 99 for x in re.findall(r"\d+", r["instruction"]))
        assert int(r["response"]) >= 0
    ops = collections.Counter("sub" if ("minus" in r["instruction"] or "subtract" in r["instruction"]
                                        or " - " in r["instruction"]) else "add" for r in rs)
    assert ops["add"] > 0.3 * len(rs) and ops["sub"] > 0.3 * len(rs)
    assert any(int(x) >= 10 for r in rs for x in re.findall(r"\d+", r["instruction"]))
    assert any(all(int(x) < 10 for x in re.findall(r"\d+", r["instruction"])) for r in rs)


def test_rewrite_answers(big):
    kinds = collections.Counter()
    for r in by_category(big, "rewrite"):
        prompt, _, items = r["instruction"].partition(": ")
        items = items.split()
        assert 3 <= len(items) <= 5, r
        if "reverse" in prompt:
            kinds["reverse"] += 1
            assert r["response"].split() == items[::-1], r
        elif "alphabetical" in prompt:
            kinds["alpha"] += 1
            assert r["response"].split() == sorted(items), r
        else:
            kinds["sort"] += 1
            nums = [int(x) for x in items]
            assert [int(x) for x in r["response"].split()] == sorted(nums), r
        assert r["response"].split() != items, r  # never a no-op (already sorted input)
    assert kinds["reverse"] and kinds["sort"] and kinds["alpha"]


def test_classification_answers(big):
    kinds = collections.Counter()
    for r in by_category(big, "classification"):
        ins, ctx, resp = r["instruction"], r["context"], r["response"]
        if "even" in ins and "odd" in ins:
            kinds["parity"] += 1
            (n,) = (int(x) for x in re.findall(r"\d+", ins))
            assert resp == ("odd" if n % 2 else "even"), r
        elif "review" in ins:
            kinds["sentiment"] += 1
            ws = words(ctx)
            has_pos = any(w in POSITIVE_WORDS for w in ws)
            has_neg = any(w in NEGATIVE_WORDS for w in ws)
            assert has_pos != has_neg, r
            expected = "positive" if has_pos and "not" not in ws else "negative"
            assert resp == expected, r
        else:
            kinds["group"] += 1
            (true_group,) = [g for g, items in BRAINSTORM_LISTS.items()
                             if any(w in items for w in words(ins))]
            assert resp == true_group and resp in words(ins), r
    assert kinds["parity"] and kinds["sentiment"] and kinds["group"]
    labels = collections.Counter(r["response"] for r in big if "review" in r["instruction"])
    assert labels["positive"] > 0.2 * sum(labels.values())
    assert labels["negative"] > 0.2 * sum(labels.values())


def test_brainstorm_lists_are_disjoint():
    all_items = [x for items in BRAINSTORM_LISTS.values() for x in items]
    assert len(all_items) == len(set(all_items))


def test_closed_qa_answer_in_context(big):
    for r in by_category(big, "closed_qa"):
        ctx = words(r["context"])
        assert r["response"] in ctx, r
        # The question is about someone (or some city) that the context mentions.
        subject = [w for w in words(r["instruction"]) if w.removesuffix("'s") in ctx or w in ctx]
        assert subject, r


def test_closed_qa_distractors(big):
    # Two-person contexts must offer a wrong candidate of the same kind.
    two = [r for r in by_category(big, "closed_qa") if r["context"].count(".") == 2]
    assert len(two) > 0.3 * len(by_category(big, "closed_qa"))


def test_open_qa_consistent_within_and_across_n(big):
    world = build_world(0)
    answers: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for rows in (big, generate_builtin(600, seed=0), generate_builtin(123, seed=0)):
        for r in by_category(rows, "open_qa"):
            key = open_qa_key(r["instruction"])
            assert key is not None, r
            answers[key].add(r["response"])
            assert r["response"] == world.answer(*key)
    assert all(len(v) == 1 for v in answers.values())


def test_open_qa_world_independent_of_n():
    assert build_world(0) == build_world(0)
    assert build_world(0) != build_world(1)
    facts = {(f.entity, f.attribute): f.answer for f in build_world(0).facts}
    for n in (50, 400, 1000):
        for r in generate_builtin(n, seed=0):
            if r["category"] == "open_qa":
                assert facts[open_qa_key(r["instruction"])] == r["response"]


def test_world_shape():
    world = build_world(0)
    assert len(set(world.entities)) == len(world.entities) >= 30
    capitals = [f.answer for f in world.facts if f.attribute == "capital"]
    assert len(set(capitals)) == len(capitals)
    assert not set(capitals) & set(world.entities)
    assert len(world.facts) == len({(f.entity, f.attribute) for f in world.facts})
    for f in world.facts:
        assert re.fullmatch(r"[a-z]+", f.entity) and re.fullmatch(r"[a-z]+", f.answer)


def test_open_qa_paraphrases_and_coverage(big):
    world = build_world(0)
    rs = by_category(big, "open_qa")
    seen = collections.Counter(open_qa_key(r["instruction"]) for r in rs)
    # Facts are cycled: at n=2500 every fact is asked at least twice.
    assert len(seen) == len(world.facts)
    assert min(seen.values()) >= 2
    templates_per_key = collections.defaultdict(set)
    for r in rs:
        templates_per_key[open_qa_key(r["instruction"])].add(r["instruction"])
    assert sum(len(v) > 1 for v in templates_per_key.values()) > 0.5 * len(templates_per_key)


def test_open_qa_test_split_facts_seen_in_training(big):
    # A random 90/10 split: (nearly) every test fact occurs in the training part.
    import random
    rs = list(big)
    random.Random(0).shuffle(rs)
    train, test = rs[: int(0.9 * len(rs))], rs[int(0.9 * len(rs)):]
    train_keys = {open_qa_key(r["instruction"]) for r in train if r["category"] == "open_qa"}
    test_keys = [open_qa_key(r["instruction"]) for r in test if r["category"] == "open_qa"]
    assert sum(k in train_keys for k in test_keys) >= 0.97 * len(test_keys)


def test_brainstorming_reference_is_valid(big):
    rs = by_category(big, "brainstorming")
    for r in rs:
        va = valid_answers(r)
        assert va is not None and len(va) >= 8 and len(set(va)) == len(va)
        assert r["response"] in va, r
    # Answers vary for the same instruction (several valid answers).
    per_instr = collections.defaultdict(set)
    for r in rs:
        per_instr[r["instruction"]].add(r["response"])
    assert max(len(v) for v in per_instr.values()) >= 4
    # Skewed draw: the first listed item is the most frequent single answer.
    fruit = collections.Counter(r["response"] for r in rs if r["response"] in BRAINSTORM_LISTS["fruit"])
    assert fruit.most_common(1)[0][0] == BRAINSTORM_LISTS["fruit"][0]


def test_brainstorm_distributions_are_what_the_generator_draws(big):
    """Each distribution sums to 1 over exactly the valid answers, and the generated references follow it: the
    rank of each drawn item (single lists and both halves of a combination) against p(rank) by chi-square, with a
    uniform-rank control that the same test must reject."""
    from scipy.stats import chisquare

    dists = brainstorm_distributions()
    for instruction, dist in dists.items():
        assert sum(dist.values()) == pytest.approx(1.0)
        assert list(dist) == valid_answers({"category": "brainstorming", "instruction": instruction})
    single = dists["name a fruit."]
    assert list(single) == list(BRAINSTORM_LISTS["fruit"])
    assert single["apple"] / single["banana"] == pytest.approx(2.0)  # weights 1/(rank+1)
    assert dists["give a color and a fruit."]["blue apple"] == pytest.approx(
        dists["name a color."]["blue"] * single["apple"])
    rank = {item: r for items in BRAINSTORM_LISTS.values() for r, item in enumerate(items)}
    counts = collections.Counter(rank[word] for r in by_category(big, "brainstorming")
                                 for word in r["response"].split())
    observed = [counts[r] for r in range(8)]
    n = sum(observed)
    assert n >= 300
    expected = [n * p for p in single.values()]
    assert chisquare(observed, expected).pvalue > 1e-3
    assert chisquare(observed, [n / 8] * 8).pvalue < 1e-6


def test_valid_answers_none_for_single_answer_rows(rows):
    for r in rows:
        if r["category"] != "brainstorming":
            assert valid_answers(r) is None
    with pytest.raises(ValueError):
        valid_answers({"category": "brainstorming", "instruction": "name a planet."})


def test_valid_answers_derived_from_instruction_only(rows):
    r = by_category(rows, "brainstorming")[0]
    stripped = {"instruction": r["instruction"], "category": "brainstorming"}
    assert valid_answers(stripped) == valid_answers(r)
    combo = {"instruction": "give a color and an animal.", "category": "brainstorming"}
    assert "blue whale" in valid_answers(combo)
    assert len(valid_answers(combo)) == len(BRAINSTORM_LISTS["color"]) * len(BRAINSTORM_LISTS["animal"])
