"""The unlabeled prompt pool: the built-in generator's prompts, a prompts-only file, the `unlabeled` split that
`prepare` writes, and transfer sets over those prompts (issue 15: the scenario distillation exists for)."""

from __future__ import annotations

import collections
import json

import pytest

from kd_core.config import ConfigError, load_config, parse_config
from kd_core.data.builtin import FAMILIES, UNLABELED_ID_PREFIX, generate_builtin, generate_unlabeled
from kd_core.data.template import prompt_key
from kd_core.errors import DataError
from kd_core.io import read_jsonl
from kd_core.run import RunPaths
from tests.conftest import REPO, tiny_params, write_params

PINNED = REPO / "data/eval/builtin_pinned.jsonl"


def _keys(rows: list[dict]) -> set[tuple[str, str]]:
    return {prompt_key(r) for r in rows}


# ----------------------------------------------------------------------------------------------- generator
def test_pool_is_deterministic_distinct_and_disjoint_from_labeled_and_eval_prompts():
    labeled = generate_builtin(3000, seed=0)
    held_out = _keys(labeled) | _keys(read_jsonl(PINNED))
    pool = generate_unlabeled(2000, seed=0, exclude=held_out)
    assert pool == generate_unlabeled(2000, seed=0, exclude=held_out)
    assert len(pool) == len(_keys(pool)) == 2000  # each prompt once
    assert not _keys(pool) & held_out
    assert all(r["response"] == "" and r["category"] in FAMILIES for r in pool)
    assert [r["id"] for r in pool[:2]] == [f"{UNLABELED_ID_PREFIX}000000", f"{UNLABELED_ID_PREFIX}000001"]
    # the same families as the labeled rows; those with few distinct prompts run out (all 32 brainstorming
    # prompts are among 3000 labeled rows), the others keep roughly their weight
    shares = collections.Counter(r["category"] for r in pool)
    assert shares["brainstorming"] == 0 and min(shares[f] for f in ("arithmetic", "closed_qa", "rewrite")) > 300
    other_seed = generate_unlabeled(2000, seed=1, exclude=held_out)
    assert sum(a["instruction"] == b["instruction"] for a, b in zip(pool, other_seed)) < 100


def test_pool_refuses_more_prompts_than_the_families_have(monkeypatch):
    import kd_core.data.builtin.generate as gen

    # brainstorming alone has 32 distinct prompts (6 lists x 4 templates + 4 combos x 2 templates)
    monkeypatch.setattr(gen, "FAMILIES", {"brainstorming": FAMILIES["brainstorming"]})
    assert len(generate_unlabeled(32, seed=0)) == 32
    with pytest.raises(ValueError, match="only 32 new distinct prompts"):
        generate_unlabeled(33, seed=0)
    with pytest.raises(ValueError, match="non-negative int"):
        generate_unlabeled(-1)


# ----------------------------------------------------------------------------------------------- config
def _error(params: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    return str(err.value)


def test_unlabeled_settings_are_validated():
    p = tiny_params(transfer_sets={"gen": {"source": "teacher", "prompts": "unlabeled"}})
    assert "transfer_sets.gen.prompts: 'unlabeled' needs unlabeled prompts: set data.builtin_unlabeled" in _error(p)
    p["data"]["builtin_unlabeled"] = 50
    assert parse_config(p).transfer_sets["gen"].prompts == "unlabeled"
    p = tiny_params(transfer_sets={"unlabeled": {"source": "teacher"}})
    assert "transfer_sets.unlabeled: reserved name" in _error(p)
    p = tiny_params()
    p["data"].update(source="file", path="data/x.jsonl", builtin_unlabeled=10)
    assert "data.builtin_unlabeled: only with source 'builtin'" in _error(p)
    p = tiny_params()
    p["data"]["unlabeled"] = {"path": "data/p.jsonl", "hub_name": "some/set"}
    assert "give exactly one of path (a local file) or hub_name" in _error(p)
    p["data"]["unlabeled"] = {"path": "data/p.jsonl", "field_map": {"response": "answer"}}
    assert "unknown field(s) ['response'] (allowed: category, context, instruction)" in _error(p)


def test_the_transfer_stage_depends_on_the_unlabeled_split_that_prepare_writes():
    from kd_core.pipeline.dag import expand, producers

    p = tiny_params(transfer_sets={"gen": {"source": "teacher", "prompts": "both"}})
    p["data"]["builtin_unlabeled"] = 50
    nodes = {n.name: n for n in expand(parse_config(p))}
    assert "runs/tiny/data/unlabeled.jsonl" in nodes["transfer@gen"].deps
    assert nodes["prepare"] in producers(nodes["transfer@gen"], list(nodes.values()))
    assert "runs/tiny/data/unlabeled.jsonl" in nodes["prepare"].outs


# ----------------------------------------------------------------------------------------------- prepare
def _write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_prepare_writes_the_unlabeled_split_disjoint_from_labeled_and_eval_prompts(project):
    from kd_core.stages.prepare import prepare

    would_be = generate_unlabeled(60, seed=0, exclude=_keys(generate_builtin(240, seed=0)))
    held = [dict(r, response="an answer", id=f"held-{i}") for i, r in enumerate(would_be[:10])]
    _write_jsonl(project / "data/eval/held.jsonl", held)
    params = tiny_params()
    params["data"].update(builtin_unlabeled=60, eval_sets={"held": {"path": "data/eval/held.jsonl"}})
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    summary = prepare(cfg, paths)
    pool = read_jsonl(paths.split("unlabeled"))
    labeled = [r for split in ("train", "val", "test") for r in read_jsonl(paths.split(split))]
    assert len(pool) == summary["unlabeled"]["rows"] == 60 and len(_keys(pool)) == 60
    assert not _keys(pool) & (_keys(labeled) | _keys(held))
    assert _keys(would_be[10:]) < _keys(pool)  # the eval set's prompts were skipped, the rest of the stream kept

    cfg = parse_config(tiny_params(run_dir="runs/no-pool"))
    prepare(cfg, RunPaths.of(cfg))  # no pool configured: the split exists (a DVC out) and is empty
    assert RunPaths.of(cfg).split("unlabeled").read_text() == ""


def test_a_prompts_only_file_loads_and_its_bad_rows_name_file_line_and_field(project):
    from kd_core.stages.prepare import prepare

    labeled = generate_builtin(240, seed=0)[0]
    rows = [{"prompt": "tell me a joke", "input": "", "answer": "ignored"},
            {"prompt": "summarise this", "input": "a long text", "category": "summary"},
            {"prompt": labeled["instruction"], "input": labeled["context"]},  # a labeled prompt: held out
            {"prompt": "tell me  a joke"}]                                   # the first one again
    _write_jsonl(project / "data/prompts.jsonl", rows)
    params = tiny_params()
    params["data"]["unlabeled"] = {"path": "data/prompts.jsonl", "field_map": {"instruction": "prompt", "context": "input"}}
    cfg = load_config(write_params(project, params))
    summary = prepare(cfg, RunPaths.of(cfg))
    pool = read_jsonl(RunPaths.of(cfg).split("unlabeled"))
    assert pool == [
        {"instruction": "tell me a joke", "context": "", "response": "", "category": "", "id": "unlabeled-000000"},
        {"instruction": "summarise this", "context": "a long text", "response": "", "category": "summary",
         "id": "unlabeled-000001"}]
    assert summary["unlabeled"]["source"]["held_out_or_repeated"] == 2

    _write_jsonl(project / "data/prompts.jsonl", [*rows[:2], {"input": "no prompt"}, rows[0]])
    params["data"]["max_bad_fraction"] = 0.0
    cfg = load_config(write_params(project, params))
    with pytest.raises(DataError, match=r"data\.unlabeled \(data/prompts.jsonl\): 1 of 4 rows are bad .* "
                                        r"data/prompts.jsonl:3: missing or empty field\(s\) 'instruction'"):
        prepare(cfg, RunPaths.of(cfg))
    (project / "data/prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"data/prompts.jsonl:2: malformed JSON"):
        prepare(cfg, RunPaths.of(cfg))


# ----------------------------------------------------------------------------------------------- transfer
def test_transfer_sets_over_unlabeled_prompts_have_the_right_rows(project):
    from kd_core.stages.prepare import prepare
    from kd_core.stages.train_teacher import train_teacher
    from kd_core.stages.transfer import transfer

    params = tiny_params(transfer_sets={
        "augmented": {"source": "teacher", "prompts": "unlabeled", "strategy": "augment", "max_new_tokens": 6},
        "answers": {"source": "teacher", "prompts": "both", "n_samples": 2, "max_new_tokens": 6}})
    params["data"]["builtin_unlabeled"] = 40
    cfg = load_config(write_params(project, params))
    paths = RunPaths.of(cfg)
    prepare(cfg, paths)
    train_teacher(cfg, paths)
    train, pool = read_jsonl(paths.split("train")), read_jsonl(paths.split("unlabeled"))
    by_id = {r["id"]: r for r in [*train, *pool]}

    def check_generated(rows: list[dict], set_name: str, sources: list[dict], n_samples: int, info: dict) -> None:
        source_ids = {r["id"] for r in sources}
        assert len(rows) == n_samples * len(sources) - info["empty_generations"] and rows
        for row in rows:
            prompt_id, _, tail = row["id"].partition("~")
            assert prompt_id in source_ids and tail in {f"{set_name}{k}" for k in range(n_samples)}
            assert row["response"] and row["generated_by"] == "teacher"
            assert prompt_key(row) == prompt_key(by_id[prompt_id]) and row["category"] == by_id[prompt_id]["category"]

    info = transfer(cfg, paths, "augmented")
    rows = read_jsonl(paths.split("augmented"))
    assert rows[: len(train)] == train  # the labeled rows with their references, then the teacher's answers
    check_generated(rows[len(train):], "augmented", pool, 1, info)
    assert info["labeled_rows"] == len(train) and info["prompts"] == info["unlabeled_prompts"] == len(pool)

    info = transfer(cfg, paths, "answers")
    check_generated(read_jsonl(paths.split("answers")), "answers", [*train, *pool], 2, info)
    assert info["labeled_rows"] == 0 and info["prompts"] == len(train) + len(pool)
