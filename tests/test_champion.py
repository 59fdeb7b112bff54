"""The champion rule (kd_core/tracking/champion.py): the decision as a pure function, and on a real sqlite MLflow store
with fake registered versions (runs with metrics, per-prompt artifacts and tags)."""

from __future__ import annotations

import json

import pytest

from kd_core.config import ChampionRule, parse_config
from kd_core.tracking.champion import decide, paired_registry_test, prompts_hash, prompts_tag, update_champion
from tests.conftest import tiny_params

TAG = prompts_tag("test")


def _row(version: int, value: float | None, *, champion: bool = False, prompts: str | None = "h1") -> dict:
    return {"version": version, "run_id": f"run{version}", "metrics": {} if value is None else {"test/m": value},
            "aliases": ["champion"] if champion else [], "tags": {TAG: prompts} if prompts else {}}


def _never(*_):
    raise AssertionError("the paired test must not run")


def test_first_champion_is_the_best_version():
    rule = ChampionRule(metric="test/m")
    d = decide([_row(1, 3.0), _row(2, 5.0), _row(3, 4.0)], rule, _never, "h1")
    assert d == {"moved": True, "version": 2, "metric": "test/m", "value": 5.0}


def test_min_mode_and_min_delta():
    rule = ChampionRule(metric="test/m", mode="min", min_delta=0.5)
    rows = [_row(1, 3.0, champion=True), _row(2, 2.6)]
    d = decide(rows, rule, _never, "h1")
    assert not d["moved"] and d["version"] == 1 and "not better than 3.0 by > 0.5" in d["reason"]
    rows.append(_row(3, 2.4))  # better by 0.6
    assert decide(rows, rule, _never, "h1") == {"moved": True, "version": 3, "metric": "test/m", "value": 2.4}


def test_already_champion_and_no_metric():
    rule = ChampionRule(metric="test/m")
    assert decide([_row(1, 3.0, champion=True), _row(2, 1.0)], rule, _never, "h1") == \
        {"moved": False, "version": 1, "reason": "already champion"}
    d = decide([_row(1, None)], rule, _never, "h1")
    assert not d["moved"] and "no version has metric 'test/m'" in d["reason"]


@pytest.mark.parametrize("p_value, moved", [(0.01, True), (0.2, False), (None, False)])
def test_significance_branch(p_value, moved):
    rule = ChampionRule(metric="test/m", significance=0.05)
    calls = []

    def paired(old_run, new_run):
        calls.append((old_run, new_run))
        return None if p_value is None else {"p_value": p_value, "mean_diff": 1.0}
    d = decide([_row(1, 3.0, champion=True), _row(2, 5.0)], rule, paired, "h1")
    assert calls == [("run1", "run2")]
    assert d["moved"] is moved
    if moved:
        assert d["version"] == 2 and d["paired_test"]["p_value"] == p_value
    else:
        assert d["version"] == 1 and "not significant at p < 0.05" in d["reason"]


def test_versions_on_other_prompts_are_not_compared():
    rule = ChampionRule(metric="test/m")
    rows = [_row(1, 9.0, champion=True, prompts="old"), _row(2, 5.0, prompts="h1"), _row(3, 50.0, prompts=None)]
    d = decide(rows, rule, _never, "h1")
    assert not d["moved"] and d["version"] == 1
    assert "champion v1 was evaluated on other 'test' prompts than this run's" in d["reason"]
    # no champion yet: only the versions on this run's prompts compete (v3 has no prompts tag: an older version)
    rows[0]["aliases"] = []
    assert decide(rows, rule, _never, "h1")["version"] == 2


def test_prompts_hash_depends_on_the_prompts_not_the_scores():
    a = [{"id": "1", "instruction": "x", "context": "", "reference": "y", "rougeL_sampled_mean": 3.0}]
    b = [dict(a[0], rougeL_sampled_mean=9.0)]
    assert prompts_hash(a) == prompts_hash(b)
    assert prompts_hash(a) != prompts_hash([dict(a[0], instruction="z")])


# ----------------------------------------------------------------------------------------------- real store
def _fake_version(client, name: str, value: float, per_prompt: list[dict], prompts: str) -> int:
    import mlflow

    with mlflow.start_run() as run:
        mlflow.log_metric("test/rougeL_sampled_mean", value)
        mlflow.log_text("".join(json.dumps(r) + "\n" for r in per_prompt), "eval/test.jsonl")
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    v = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                    tags={TAG: prompts})
    return int(v.version)


def test_update_champion_on_a_real_store_with_the_paired_test(project, tmp_path, monkeypatch):
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    temporary = tmp_path / "system-tmp"  # where the per-prompt scores are downloaded to: empty again afterwards
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    params = tiny_params()
    params["tracking"]["champion"] = {"metric": "test/rougeL_sampled_mean", "min_delta": 0.0, "significance": 0.05}
    cfg = parse_config(params)
    mlflow.set_experiment("champion-test")
    client = MlflowClient()
    ids = [str(i) for i in range(40)]
    base = [{"id": i, "rougeL_sampled_mean": 10.0 + (k % 5)} for k, i in enumerate(ids)]
    v1 = _fake_version(client, "kd-student", 12.0, base, "h")
    assert update_champion(cfg, "h") == {"moved": True, "version": v1, "metric": "test/rougeL_sampled_mean",
                                         "value": 12.0}
    assert int(client.get_model_version_by_alias("kd-student", "champion").version) == v1
    # slightly better on average but not on the prompts: the alias stays
    noisy = [{"id": i, "rougeL_sampled_mean": r["rougeL_sampled_mean"] + (3.0 if k % 2 else -2.8)}
             for k, (i, r) in enumerate(zip(ids, base))]
    v2 = _fake_version(client, "kd-student", 12.1, noisy, "h")
    d = update_champion(cfg, "h")
    assert not d["moved"] and d["version"] == v1 and d["paired_test"]["p_value"] >= 0.05
    # better on every prompt: it moves, with the paired test in the decision
    better = [{"id": i, "rougeL_sampled_mean": r["rougeL_sampled_mean"] + 2.0} for i, r in zip(ids, base)]
    v3 = _fake_version(client, "kd-student", 14.0, better, "h")
    d = update_champion(cfg, "h")
    assert d["moved"] and d["version"] == v3 and d["paired_test"]["p_value"] < 0.05
    assert d["paired_test"]["mean_diff"] == pytest.approx(2.0)
    assert int(client.get_model_version_by_alias("kd-student", "champion").version) == v3
    assert v2 == v1 + 1
    assert list(temporary.iterdir()) == []  # MLflow's own download folders stayed (two per paired test)


def test_paired_registry_test_without_per_prompt_scores_is_none(project):
    import mlflow

    mlflow.set_experiment("champion-test")
    with mlflow.start_run() as a:
        pass
    with mlflow.start_run() as b:
        mlflow.log_text('{"id": "1", "rougeL_sampled_mean": 1.0}\n', "eval/test.jsonl")
    assert paired_registry_test(a.info.run_id, b.info.run_id, seed=0, set_name="test") is None
