"""The champion rule: which registered student version holds the alias `champion` (`tracking.champion`).

Versions are compared only on identical prompts: the eval set named by `metric` (`<set>/<name>`) is the pinned
set, and each version's lineage holds the hash of the prompts it was evaluated on (`kd.eval_prompts.<set>`). Among the
versions evaluated on this run's prompts, the best by `metric` (max or min) takes the alias when it is better
than the current champion by more than `min_delta` and, with `significance` set, when a paired bootstrap over
those prompts gives p < significance. A champion evaluated on other prompts is not compared: the alias stays
and the decision says why. The decision is a pure function of the versions' rows (`registry.version_rows`) and
a paired test; MLflow is read and written through `kd_core.tracking` only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

from kd_core.config import ChampionRule, PipelineConfig


def pinned_set(rule: ChampionRule) -> str:
    """The eval set the champion metric is read on (`test/rougeL_sampled_mean` -> `test`)."""
    return rule.metric.split("/", 1)[0]


def prompts_tag(set_name: str) -> str:
    return f"kd.eval_prompts.{set_name}"


def prompts_hash(rows: list[dict]) -> str:
    """What identifies the prompts a model was evaluated on: ids, prompt texts and references, in order."""
    key = [[r.get("id"), r.get("instruction"), r.get("context"), r.get("reference")] for r in rows]
    return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:16]


def is_better(new: float, old: float | None, mode: str, min_delta: float) -> bool:
    """`new` beats `old` by more than `min_delta` in the direction of `mode` (any value beats no value)."""
    if old is None:
        return True
    return new > old + min_delta if mode == "max" else new < old - min_delta


def decide(rows: list[dict], rule: ChampionRule, paired_test: Callable[[str, str], dict | None],
           pinned_hash: str | None = None) -> dict:
    """The champion decision over registered version rows ({version, run_id, metrics, aliases, tags}).

    `pinned_hash`: the hash of this run's prompts of the pinned set; only versions tagged with it compete
    (None: every version, as for metrics that are not per eval set). Returns {"moved": bool, "version": ...,
    "reason" | "metric"/"value", "paired_test"?}; `paired_test(old_run, new_run)` returns a paired bootstrap
    result ({p_value, ...}) or None when the versions share too few prompts.
    """
    key = rule.metric
    tag = prompts_tag(pinned_set(rule))
    comparable = [r for r in rows if pinned_hash is None or r.get("tags", {}).get(tag) == pinned_hash]
    scored = [r for r in comparable if key in r["metrics"]]
    if not scored:
        return {"moved": False, "reason": f"no version has metric {rule.metric!r} on this run's prompts"}
    current = next((r for r in rows if "champion" in r["aliases"]), None)
    if current is not None and current not in comparable:
        return {"moved": False, "version": current["version"],
                "reason": f"champion v{current['version']} was evaluated on other {pinned_set(rule)!r} prompts than "
                          f"this run's: not compared (re-evaluate it, or pin a fixed eval set in "
                          f"tracking.champion.metric)"}
    best = (max if rule.mode == "max" else min)(scored, key=lambda r: r["metrics"][key])
    old = current["metrics"].get(key) if current else None
    if current is not None and current["version"] == best["version"]:
        return {"moved": False, "version": best["version"], "reason": "already champion"}
    if not is_better(best["metrics"][key], old, rule.mode, rule.min_delta):
        return {"moved": False, "version": current["version"] if current else None,
                "reason": f"best {best['metrics'][key]:.4g} not better than {old} by > {rule.min_delta}"}
    decision = {"moved": True, "version": best["version"], "metric": rule.metric, "value": best["metrics"][key]}
    if rule.significance is not None and current is not None:
        test = paired_test(current["run_id"], best["run_id"])
        if test is None or test["p_value"] >= rule.significance:
            return {"moved": False, "version": current["version"], "paired_test": test,
                    "reason": f"not significant at p < {rule.significance}"}
        decision["paired_test"] = test
    return decision


def paired_registry_test(old_run: str, new_run: str, seed: int, set_name: str) -> dict | None:
    """Paired bootstrap of two registered versions' per-prompt sampled ROUGE-L on the prompts both were
    evaluated on (the `eval/<set>.jsonl` artifacts of their register runs); None when either has none."""
    from kd_core.evaluation.compare import prompt_scores
    from kd_core.evaluation.stats import paired_on_common_ids
    from kd_core.tracking import runs

    scores = []
    for run_id in (old_run, new_run):
        with runs.downloaded_artifact(run_id, f"eval/{set_name}.jsonl") as local:
            if local is None:  # an older version without per-prompt scores
                return None
            scores.append(prompt_scores(local))
    return paired_on_common_ids(scores[0], scores[1], seed=seed)


def update_champion(cfg: PipelineConfig, pinned_hash: str | None = None) -> dict:
    """Move alias `champion` of the student model to the best version by the rule in params, among the
    versions evaluated on the prompts hashed `pinned_hash`."""
    from kd_core.tracking import registry

    rule = cfg.tracking.champion
    rows = registry.version_rows(cfg.tracking.registered_model)
    decision = decide(rows, rule, lambda old, new: paired_registry_test(old, new, cfg.seed, pinned_set(rule)),
                      pinned_hash)
    if decision["moved"]:
        registry.set_alias(cfg.tracking.registered_model, "champion", decision["version"])
    return decision
